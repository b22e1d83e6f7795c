"""The planted world: its facts as data, its shipped files, what the model learnt, and its recipe.

Speed (load time, training time) is measured by the tools, not here: `tools.train_planted` reports its
seconds in `meta.json`, and the README's planted-world section gives them.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from part3_attribution_graphs.tools import ground_truth, train_planted
from part3_attribution_graphs.views.examples import feature_examples, make_toy_example_data
from part3_attribution_graphs.worlds import planted

# What the shortened recipe (seed 0) reaches on the training prompts (chance: 1 in 365): measured
# 2026-12-04 on the redesigned world, copy 100% and opposite 32% after 120 steps; the floors leave a margin.
SHORT_MODEL_STEPS, SHORT_TC_STEPS = 120, 30
SHORT_RUN_MIN_ACCURACY = {"copy/train": 0.9, "opposite/train": 0.2}
MAX_FVU = 0.1  # the shipped transcoders' fraction of variance unexplained, per layer
MAX_L0 = 30  # latents firing per token, on average


# ------------------------------------------------------------------------------------------ the facts


def test_facts_are_consistent_with_the_tables():
    groups, members = planted.planted_groups(), planted.planted_members()
    assert len(groups) == 8 and all(len(a) == len(planted.ATTRIBUTES) for a in groups.values())
    assert Counter(members.values()) == dict.fromkeys(groups, 3)
    for f in planted.planted_facts("two_hop"):
        assert f.intermediate == members[f.entity] and f.answer == groups[f.intermediate][f.attribute]
        assert f.entity in f.prompt and f.attribute in f.prompt
    for f in planted.planted_facts("single_hop"):
        assert f.answer == " " + members[f.entity]
    for f in planted.planted_facts("group_attribute"):
        assert f.answer == groups[f.entity][f.attribute]
    for f in planted.planted_facts("copy"):
        assert f.answer == " " + f.entity and f.entity in f.prompt
    # Every mechanism has training prompts; two-hop, opposite and copy hold some out.
    for mech in planted.MECHANISMS:
        assert planted.planted_facts(mech, "train"), mech
    for mech in ("two_hop", "opposite", "copy"):
        assert planted.planted_facts(mech, "heldout"), mech
    # A held-out two-hop question is never also a training one.
    train = {f.prompt for f in planted.planted_facts(split="train")}
    assert not train & {f.prompt for f in planted.planted_facts(split="heldout")}


def test_every_land_holds_out_different_attributes_across_its_towns():
    """Strict held-out composition: each town has one held-out two-hop question, and a land's three
    towns hold out three different attributes, so each held-out attribute of a land was learnt through its
    other towns."""
    held: dict[str, list[str]] = {}
    for f in planted.planted_facts("two_hop", "heldout"):
        held.setdefault(f.intermediate, []).append(f.attribute)
    assert set(held) == set(planted.planted_groups())
    for land, attributes in held.items():
        assert len(attributes) == 3 and len(set(attributes)) == 3, (land, attributes)
    trained = {(f.intermediate, f.attribute) for f in planted.planted_facts("two_hop", "train")}
    assert all((land, a) in trained for land, attrs in held.items() for a in attrs)


def test_every_town_is_one_token_named_first():
    """The town is one token at `TOWN_POSN` in every single- and two-hop prompt (where the land is
    planted)."""
    tok = planted.make_planted_tokenizer()
    for f in planted.planted_facts("two_hop") + planted.planted_facts("single_hop"):
        assert tok.tokenize(f.prompt)[planted.TOWN_POSN - 1] == f.entity  # tokenize() leaves out <bos>


def test_unknown_words_are_named_not_turned_into_unk(planted_world):
    """A word the world does not have ('Paris', a town in lower case) is an error naming it, before any
    forward pass; it used to become <unk> silently."""
    from part3_attribution_graphs.attribution import attribute
    from part3_attribution_graphs.interventions import intervene
    from part3_attribution_graphs.worlds.gemma import format_prompt

    model, transcoders = planted_world
    with pytest.raises(ValueError, match="'Paris'"):
        attribute(model, transcoders, format_prompt("What is the capital of Paris?", "Answer:"))
    town = next(iter(planted.planted_members()))
    with pytest.raises(ValueError, match=repr(town.lower())):
        intervene(model, transcoders, format_prompt(f"{town.lower()}. Which land is it in?"), [])
    with pytest.raises(ValueError, match="'Paris'"):
        model.to_tokens("Paris")
    assert planted.make_planted_tokenizer()(planted.planted_facts()[0].prompt).input_ids


def test_every_prompt_and_answer_is_in_the_vocabulary():
    tok = planted.make_planted_tokenizer()
    for f in planted.planted_facts():
        ids = tok(f.prompt + f.answer).input_ids
        assert tok.unk_token_id not in ids, f.prompt
        assert len(tok(f.answer, add_special_tokens=False).input_ids) == 1, f.answer
    assert tok.tokenize(planted.planted_facts()[0].prompt)[:3] == ["<start_of_turn>", "user", "\n"]


def test_bad_filters_are_named():
    with pytest.raises(ValueError, match="two_hop"):
        planted.planted_facts("twohop")
    with pytest.raises(ValueError, match="heldout"):
        planted.planted_facts(split="test")


# ------------------------------------------------------------------------------------- shipped files


def test_shipped_world_loads_without_training(monkeypatch):
    """The world comes from the shipped files, bit for bit, and loading runs no optimiser."""

    def no_training(*args, **kwargs):
        raise AssertionError("loading the planted world trained something")

    monkeypatch.setattr(torch.optim.AdamW, "__init__", no_training)
    monkeypatch.setattr(torch.optim.Adam, "__init__", no_training)
    model, transcoders = planted.load_planted_world()
    folder = planted.planted_data_dir()
    state = load_file(str(folder / "model.safetensors"))
    params = dict(model.named_parameters())
    assert state and all(torch.equal(params[k], v) for k, v in state.items())
    tc_state = load_file(str(folder / "transcoders.safetensors"))
    assert torch.equal(transcoders[2].W_enc, tc_state["2.W_enc"])
    # The unembedding is tied to the embedding, as Gemma's is.
    torch.testing.assert_close(model.W_U, model.W_E.T / model.cfg.d_model**0.5)
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 10 * 2**20, f"the shipped files take {total / 2**20:.1f} MB (at most 10)"


def test_load_refuses_another_vocabulary(tmp_path):
    folder = planted.planted_data_dir()
    for name in ("model.safetensors", "transcoders.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    meta = json.loads((folder / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="retrain"):
        planted.load_planted_world(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="train_planted"):
        planted.load_planted_world(data_dir=tmp_path / "nowhere")


def _copy_world(tmp_path):
    folder = planted.planted_data_dir()
    for name in ("model.safetensors", "transcoders.safetensors", "meta.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    return tmp_path


def test_load_names_a_truncated_or_corrupt_file(tmp_path):
    world = _copy_world(tmp_path)
    data = (world / "transcoders.safetensors").read_bytes()
    (world / "transcoders.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="transcoders.safetensors"):
        planted.load_planted_world(data_dir=world)
    (world / "transcoders.safetensors").write_bytes(data)
    (world / "meta.json").write_text("")
    with pytest.raises(ValueError, match="meta.json"):
        planted.load_planted_world(data_dir=world)


def test_load_checks_layer_order_and_finiteness(tmp_path):
    from safetensors.torch import save_file

    world = _copy_world(tmp_path)
    state = load_file(str(world / "transcoders.safetensors"))
    swapped = {(f"{1 - int(k[0])}" + k[1:] if k[0] in "01" else k): v for k, v in state.items()}
    save_file(swapped, str(world / "transcoders.safetensors"))
    with pytest.raises(ValueError, match="layer 0"):
        planted.load_planted_world(data_dir=world)
    bad = dict(state)
    bad["2.W_dec"] = bad["2.W_dec"].clone()
    bad["2.W_dec"][0, 0] = float("nan")
    save_file(bad, str(world / "transcoders.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        planted.load_planted_world(data_dir=world)


def test_planted_functions_go_through_the_guard(planted_world):
    """Another world's model, a bad threshold, facts without a land: clear errors, the model left clean."""
    from part3_attribution_graphs.guard import ENTRY_POINTS
    from part3_attribution_graphs.toy import make_toy_world

    model, transcoders = planted_world
    for name in ("planted_accuracy", "land_latents", "latent_activations"):
        assert f"part3_attribution_graphs.worlds.planted.{name}" in ENTRY_POINTS, name
    toy_model, toy_tcs = make_toy_world()
    with pytest.raises(ValueError, match="another world"):
        planted.land_latents(toy_model, toy_tcs)
    with pytest.raises(ValueError, match="another world"):
        planted.planted_accuracy(toy_model)
    with pytest.raises(ValueError, match="max_out"):
        planted.land_latents(model, transcoders, max_out=float("nan"))
    with pytest.raises(ValueError, match="land"):
        planted.land_latents(model, transcoders, planted.planted_facts("opposite"))
    with pytest.raises(ValueError, match="templates"):
        planted.land_latents(
            model, transcoders, planted.planted_facts("two_hop") + planted.planted_facts("single_hop")
        )
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_model_answers_every_mechanism(planted_world):
    """At least 95% top-1 on each mechanism's training prompts and on its held-out ones."""
    model, _ = planted_world
    acc = planted.planted_accuracy(model)
    assert set(acc) == {f"{f.mechanism}/{f.split}" for f in planted.planted_facts()}
    low = {k: v for k, v in acc.items() if v < 0.95}
    assert not low, f"below 95%: {low}"


def test_accuracy_counts_wrong_answers(planted_world):
    """The accuracy is computed, not assumed: facts with a wrong answer score 0."""
    model, _ = planted_world
    facts = planted.planted_facts("opposite", "train")[:6]
    wrong = [planted.PlantedFact(f.prompt, " Zed", f.mechanism, f.split) for f in facts]
    assert planted.planted_accuracy(model, wrong) == {"opposite/train": 0.0}


@torch.no_grad()
def test_shipped_transcoders_reconstruct_sparsely(planted_world):
    model, transcoders = planted_world
    tokens = planted.example_corpus()
    mask = (tokens != model.tokenizer.pad_token_id) & (torch.arange(tokens.shape[1]) > 0)
    _, cache = model.run_with_cache(tokens)
    for layer, tc in transcoders.items():
        x = cache[f"blocks.{layer}.mlp.hook_in"][mask]
        y = cache[f"blocks.{layer}.hook_mlp_out"][mask]
        out = tc(x)  # SAELens' forward: decode(encode(x)) plus the skip
        fvu = float(((out - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        l0 = float((tc.encode(x) > 0).sum(-1).float().mean())
        assert fvu < MAX_FVU, f"layer {layer}: FVU {fvu:.3f}"
        assert 1 <= l0 <= MAX_L0, f"layer {layer}: L0 {l0:.1f}"


# ------------------------------------------------------------------------------------------ the recipe


def test_short_recipe_is_deterministic_and_learns(tmp_path):
    """Two shortened runs, one seed: the same bits; the result loads and reaches the stated accuracy."""
    torch.set_num_threads(1)
    runs = [train_planted.train_world(0, SHORT_MODEL_STEPS, SHORT_TC_STEPS) for _ in range(2)]
    (m1, t1, meta1), (m2, t2, _) = runs
    assert m1.keys() == m2.keys() and t1.keys() == t2.keys()
    assert all(torch.equal(m1[k], m2[k]) for k in m1) and all(torch.equal(t1[k], t2[k]) for k in t1)
    train_planted.write_world(tmp_path / "world", m1, t1, meta1)
    model, _ = planted.load_planted_world(data_dir=tmp_path / "world")
    acc = planted.planted_accuracy(model)
    low = {k: acc[k] for k, floor in SHORT_RUN_MIN_ACCURACY.items() if acc[k] < floor}
    assert not low, f"after {SHORT_MODEL_STEPS} steps: {low} (all: {acc})"
    layers = meta1["transcoders"]["per_layer"]
    assert set(layers) == {"0", "1", "2", "3"} and all(
        {"l0", "fvu", "dead_latents"} <= set(v) for v in layers.values()
    )


def test_answer_rows_are_the_positions_that_predict_each_answer(planted_world):
    """The transcoders' extra copies are of the right rows: each is the MLP input where the prompt ends."""
    model, _ = planted_world
    _, text = train_planted.corpus(0)
    facts = planted.planted_facts()
    rows = train_planted._answer_rows(text)
    x, _ = train_planted.collect_activations(model, text)[1]
    picks = [0, 1, len(facts) // 2, len(facts) - 1]
    _, cache = model.run_with_cache(
        model.to_tokens([facts[i].prompt for i in picks]), names_filter="blocks.1.mlp.hook_in"
    )
    for k, i in enumerate(picks):
        n = len(model.to_str_tokens(facts[i].prompt))  # the prompts differ in length: padded at the end
        torch.testing.assert_close(x[rows[i]], cache["blocks.1.mlp.hook_in"][k, n - 1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x[rows[0]], x[rows[0] + 1])  # a row further on is another position


def test_two_hop_answers_share_their_land_and_attribute_parts(planted_world):
    """The embedding of each two-hop answer is nearer its land's other answers, and its attribute's other
    lands' answers, than the rest (`train_planted.ANSWER_PARTS`)."""
    model, _ = planted_world
    groups = planted.planted_groups()
    ids = {(g, a): model.to_single_token(w) for g, attrs in groups.items() for a, w in attrs.items()}
    E = torch.nn.functional.normalize(model.W_E[list(ids.values())], dim=1)
    cos = E @ E.T
    keys = list(ids)
    same_land = torch.tensor([[k[0] == j[0] and k != j for j in keys] for k in keys])
    same_attr = torch.tensor([[k[1] == j[1] and k != j for j in keys] for k in keys])
    neither = torch.tensor([[k[0] != j[0] and k[1] != j[1] for j in keys] for k in keys])
    assert cos[same_land].mean() > cos[same_attr].mean() > cos[neither].mean() + 0.1


def test_write_world_writes_its_three_files_and_keeps_the_folders_others(tmp_path):
    out = tmp_path / "world"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")  # not the recipe's: stays (tests/test_reliability.py)
    train_planted.write_world(out, {"a": torch.zeros(2)}, {"0.b": torch.ones(1)}, {"k": 1})
    assert sorted(p.name for p in out.iterdir()) == [
        train_planted.MANIFEST,
        "meta.json",
        "model.safetensors",
        "notes.txt",
        "transcoders.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary folder left behind


# ------------------------------------------------------------------------------- ground truth and views


def test_land_latents_follow_the_fixed_rule_on_training_prompts_only(planted_world):
    """Recomputed independently: each land latent fires on >= MIN_IN of its land's training prompts and
    <= MAX_OUT of the others'; held-out prompts play no part (passing them or not gives the same latents)."""
    model, transcoders = planted_world
    facts = planted.planted_facts("two_hop")
    found = planted.land_latents(model, transcoders, facts)
    assert found == planted.land_latents(model, transcoders, planted.planted_facts("two_hop", "train"))
    train = planted.planted_facts("two_hop", "train")
    _, cache = model.run_with_cache(model.to_tokens([f.prompt for f in train]))
    for land, latents in found.items():
        mine = torch.tensor([f.intermediate == land for f in train])
        for layer, pos, k in latents:
            tc = transcoders[layer]
            pre = cache[f"blocks.{layer}.mlp.hook_in"][:, pos] @ tc.W_enc[:, k] + tc.b_enc[k]
            fired = (pre > tc.threshold[k]) & (pre > 0)
            assert fired[mine].float().mean() >= planted.MIN_IN
            assert fired[~mine].float().mean() <= planted.MAX_OUT


def test_each_land_has_one_to_ten_latents_at_the_planted_site(planted_world):
    model, transcoders = planted_world
    found = planted.land_latents(model, transcoders)
    at_site = {land: [x for x in v if (x[0], x[1]) == planted.LAND_SITE] for land, v in found.items()}
    assert all(1 <= len(v) <= 10 for v in at_site.values()), {k: len(v) for k, v in at_site.items()}


def _held_out_two_hop(model, transcoders):
    """`(facts, land latents by the fixed rule, indices of the held-out questions the model answers)`."""
    facts = planted.planted_facts("two_hop")
    found = planted.land_latents(model, transcoders, facts)
    right = ground_truth._answered(model, facts)
    return facts, found, [i for i, f in enumerate(facts) if f.split == "heldout" and right[i]]


def test_swapping_the_land_latents_swaps_held_out_answers(planted_world):
    """The planted variable, found by the fixed rule: setting the site's land latents to another land's values
    gives that land's answer on at least 80% of held-out pairs (frozen), random latents of the same count at
    the same site on at most 15%."""
    model, transcoders = planted_world
    facts, found, idx = _held_out_two_hop(model, transcoders)
    pairs = ground_truth._pairs(facts, idx, 1, torch.Generator().manual_seed(0))
    rates = ground_truth.intervention_rates(model, transcoders, facts, idx, pairs, found, modes=("frozen",))
    assert rates["swap/planted/frozen"][0] >= 0.8, rates
    assert rates["swap/random/frozen"][0] <= 0.15, rates


def test_ablating_the_land_latents_takes_held_out_answers_away(planted_world):
    """Setting the site's land latents to 0 removes the answer on at least 80% of held-out questions, frozen
    and live (measured 2026-12-05: 88% / 100%); random latents of the same count at the same site on at most
    15% (measured 0%)."""
    model, transcoders = planted_world
    facts, found, idx = _held_out_two_hop(model, transcoders)
    modes = ("frozen", "live")
    rates = ground_truth.intervention_rates(model, transcoders, facts, idx, [], found, modes=modes)
    for mode in modes:
        assert rates[f"ablation/planted/{mode}"][0] >= 0.8, rates
        assert rates[f"ablation/random/{mode}"][0] <= 0.15, rates


def test_the_strongest_path_mostly_runs_through_the_land(planted_world):
    """`attribute`'s default graph of each held-out question: its strongest path passes through a land
    latent of the question's own land in 19 of 24 (measured 2026-12-05; the aim was 80%, the previous world
    12 of 24), and kept latents are land latents far above the base rate (measured 9.5x)."""
    model, transcoders = planted_world
    facts = planted.planted_facts("two_hop")
    found = planted.land_latents(model, transcoders, facts)
    idx = [i for i, f in enumerate(facts) if f.split == "heldout"]
    scores = ground_truth.graph_scores(model, transcoders, facts, idx, found)
    assert scores["strongest path through the land"][0] >= 0.75, scores
    assert scores["enrichment"][0] >= 4, scores


def test_example_data_comes_from_the_worlds_own_text(planted_world):
    model, transcoders = planted_world
    data = make_toy_example_data(model, transcoders, features_by_layer={0: [0]})
    corpus = planted.example_corpus()
    assert torch.equal(data[0]["tokens"], corpus.int())
    # A land latent's top examples are about its land (its name or one of its towns): measured, 7 of 8
    # lands have a latent at the planted site whose three top examples all are (layer-0 latents also fire
    # elsewhere).
    found = planted.land_latents(model, transcoders)
    members = planted.planted_members()
    about = 0
    for land, latents in found.items():
        names = [land] + [t for t, g in members.items() if g == land]
        for layer, _, latent in (x for x in latents if (x[0], x[1]) == planted.LAND_SITE):
            examples = feature_examples(data[layer], latent, model.tokenizer, n_examples=3)
            assert len(examples) == 3 and all(ex["tokens"][-1] != "<pad>" for ex in examples)
            if all(any(n in "".join(ex["tokens"]) for n in names) for ex in examples):
                about += 1
                break
    assert about >= 6, f"only {about} of 8 lands have a latent whose top examples are about the land"


def test_graph_path_needs_every_link():
    """town embedding -> land latent -> answer logit, on a hand-made pruned graph."""
    from types import SimpleNamespace

    from part3_attribution_graphs.nodes import NodeInfo, NodeType

    nodes = [
        NodeInfo(NodeType.EMBEDDING, "E", 1, 50),
        NodeInfo(NodeType.LATENT, 1, 5, 7),
        NodeInfo(NodeType.LATENT, 2, 5, 8),
        NodeInfo(NodeType.LOGIT, "L", 5, 9),
    ]
    adj = torch.zeros(4, 4)
    adj[1, 0] = adj[2, 1] = adj[3, 2] = 1.0  # emb -> latent 7 -> latent 8 -> logit 9

    def result(a):
        return SimpleNamespace(
            kept_indices=torch.arange(4),
            pruned_matrix=a,
            adjacency_matrix=a,
            graph=SimpleNamespace(nodes=nodes),
        )

    assert ground_truth.graph_has_path(result(adj), [1], {(1, 5, 7)}, 9)
    assert ground_truth.graph_has_path(result(adj), [1], {(2, 5, 8)}, 9)
    assert not ground_truth.graph_has_path(result(adj), [2], {(1, 5, 7)}, 9)  # not from the town
    assert not ground_truth.graph_has_path(result(adj), [1], {(1, 5, 7)}, 10)  # another logit
    cut = adj.clone()
    cut[3, 2] = 0.0
    assert not ground_truth.graph_has_path(result(cut), [1], {(1, 5, 7)}, 9)


def test_every_shipped_planted_file_is_package_data():
    """A wheel holds only what `package-data` names (and its globs skip dot files): every file of the shipped
    world, the recipe's list of written files included, must match a pattern."""
    import fnmatch
    from pathlib import Path

    import tomllib

    import part3_attribution_graphs

    root = Path(part3_attribution_graphs.__file__).parent
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["part3_attribution_graphs"]
    shipped = [p.relative_to(root).as_posix() for p in (root / "worlds" / "planted_data").iterdir()]
    assert ".written-by-train_planted.json" in {Path(p).name for p in shipped}
    # fnmatch's * matches a leading dot, setuptools' glob does not: a pattern covers a dot file only by name.
    missing = [
        p
        for p in shipped
        if not any(
            fnmatch.fnmatch(p, pat) and (not Path(p).name.startswith(".") or "*" not in pat)
            for pat in patterns
        )
    ]
    assert not missing, f"shipped but not in [tool.setuptools.package-data]: {missing}"
