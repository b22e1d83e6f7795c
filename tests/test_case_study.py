"""The case study's tools: the strongest path is the best of all paths (checked by enumerating them), a
swap with a prompt's own values changes nothing, and the contrast finds land latents only where the land
can be known."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import hook_count

from part3_attribution_graphs.case_study import (
    GraphScore,
    enrichment,
    group_subspace,
    misleading_question,
    path_shares,
    same_site_control,
    score_graph,
    strongest_path,
    subspace_site,
    subspace_swap,
    swap_group,
)
from part3_attribution_graphs.interventions import intervene
from part3_attribution_graphs.nodes import GraphNodes, NodeInfo, NodeType
from part3_attribution_graphs.worlds.gemma import format_prompt
from part3_attribution_graphs.worlds.planted import land_latents, planted_facts


def random_pruned_graph(seed: int) -> SimpleNamespace:
    """3 embeddings, two layers of 3 latents and an error node each, 2 logits; random signed edges, some
    missing, always forward in node order (as in a real graph); 12 nodes kept of 14."""
    gen = torch.Generator().manual_seed(seed)
    E, L, R, G = NodeType.EMBEDDING, NodeType.LATENT, NodeType.MLP_ERROR, NodeType.LOGIT
    nodes = [NodeInfo(E, "E", p, p) for p in range(3)]
    for layer in range(2):
        nodes += [NodeInfo(L, layer, p, 5 + p, activation=1.0) for p in range(3)] + [NodeInfo(R, layer, 2, 0)]
    nodes += [NodeInfo(G, "L", 2, 50), NodeInfo(G, "L", 2, 51)]
    kept = torch.tensor([i for i in range(len(nodes)) if i not in (4, 9)])  # a latent of each layer pruned
    n = len(kept)
    kinds = [nodes[i].node_type for i in kept.tolist()]
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = A * (torch.rand(n, n, generator=gen) < 0.6)
    A = torch.tril(A, -1)
    for t, kt in enumerate(kinds):  # embeddings and error nodes read nothing; logits are read by nothing
        for s, ks in enumerate(kinds):
            if (
                kt in (E, R)
                or ks == G
                or (kt == L and ks == L and nodes[kept[t]].layer == nodes[kept[s]].layer)
            ):
                A[t, s] = 0
    return SimpleNamespace(
        graph=GraphNodes(nodes=nodes, seq_len=3, n_layers=2), kept_indices=kept, pruned_matrix=A
    )


def all_paths(result) -> list[list[int]]:
    """Every path from an embedding to the top logit through at least one latent (global indices)."""
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type for i in kept]
    A = result.pruned_matrix
    end = kinds.index(NodeType.LOGIT)
    found = []

    def walk(path: list[int]) -> None:
        t = path[-1]
        if t == end:
            if len(path) > 2:
                found.append([kept[k] for k in path])
            return
        for nxt in range(t + 1, len(kept)):
            if A[nxt, t] != 0 and not (kinds[nxt] == NodeType.LOGIT and kinds[t] == NodeType.EMBEDDING):
                walk(path + [nxt])

    for s, kind in enumerate(kinds):
        if kind == NodeType.EMBEDDING:
            walk([s])
    return found


@pytest.mark.parametrize("seed", range(8))
def test_strongest_path_is_the_best_of_all_paths(seed):
    result = random_pruned_graph(seed)
    paths = all_paths(result)
    if not paths:
        with pytest.raises(ValueError, match="no path"):
            strongest_path(result)
        return
    best = max(math.prod(path_shares(result, p)) for p in paths)
    path, strength = strongest_path(result)
    assert path in paths
    assert strength == pytest.approx(best, rel=1e-12)
    assert math.prod(path_shares(result, path)) == pytest.approx(best, rel=1e-12)


def test_a_swap_with_its_own_values_changes_nothing(toy_world):
    model, tcs = toy_world
    prompt = format_prompt("opposite of small?", "large")
    other = format_prompt("opposite of large?", "small")
    clean_run = intervene(model, tcs, prompt, [])
    pos = int((model.to_tokens(prompt) != model.to_tokens(other))[0].nonzero()[0])  # "small" / "large"
    latents = [(layer, pos, int(clean_run.activations[layer][pos].argmax())) for layer in (1, 2)]
    clean = clean_run.logits[0, -1]
    torch.testing.assert_close(swap_group(model, tcs, prompt, prompt, latents), clean)
    assert not torch.allclose(swap_group(model, tcs, prompt, other, latents), clean)
    with pytest.raises(ValueError, match="same length"):
        swap_group(model, tcs, prompt, format_prompt("opposite of small?", "large large"), latents)


def test_land_latents_only_where_the_land_can_be_known():
    """Before the town the land is unknown, and every two-hop prompt reads the same tokens up to the town: no
    latent there may code for a land, whatever its rounding noise."""
    from part3_attribution_graphs.worlds.planted import (
        TOWN_POSN,
        land_latents,
        load_planted_world,
        planted_facts,
    )

    model, tcs = load_planted_world()
    facts = planted_facts("two_hop")
    found = land_latents(model, tcs, facts)
    assert model.to_str_tokens(facts[0].prompt)[TOWN_POSN] == facts[0].entity
    positions = {pos for latents in found.values() for _, pos, _ in latents}
    assert positions and min(positions) >= TOWN_POSN


# --------------------------------------------------------------------------------------------------
# Scoring graphs against the truth, over every held-out question
# --------------------------------------------------------------------------------------------------


def test_score_graph_counts_kept_and_candidate_truth_latents_and_the_path():
    result = random_pruned_graph(0)
    nodes = result.graph.nodes
    latents = [i for i, n in enumerate(nodes) if n.node_type == NodeType.LATENT]
    key = {i: (nodes[i].layer, nodes[i].ctx_idx, nodes[i].feature) for i in latents}
    pruned_away = [i for i in latents if i not in result.kept_indices.tolist()]
    kept = [i for i in latents if i in result.kept_indices.tolist()]
    truth = {"mine": [key[kept[0]], key[pruned_away[0]]], "other": [key[kept[1]]]}
    path = [0, kept[1], kept[2], 12]  # through another group's latent only
    score = score_graph(result, path, 0.25, truth, "mine")
    assert (score.kept, score.kept_truth) == (len(kept), 2)
    assert (score.candidates, score.candidates_truth) == (len(latents), 3)
    assert not score.path_through_own
    assert score_graph(result, [0, kept[0], 12], 0.5, truth, "mine").path_through_own
    precision, base, ratio = enrichment([score, score])
    assert precision == pytest.approx(2 / len(kept))
    assert base == pytest.approx(3 / len(latents))
    assert ratio == pytest.approx(precision / base)


def _score(through: bool, strength: float, kept_truth: int = 1) -> GraphScore:
    return GraphScore(10, kept_truth, 100, 5, through, (0, 1, 2), strength)


def test_misleading_question_is_the_strongest_wrong_path_preferring_one_the_swap_caught():
    scores = [_score(True, 0.9), _score(False, 0.2), _score(False, 0.6), _score(False, 0.4)]
    assert misleading_question(scores) == 2
    assert misleading_question(scores, caught=[True, True, False, True]) == 3
    assert misleading_question(scores, caught=[True, False, False, False]) == 2  # none caught: all wrong ones
    every_path_right = [_score(True, 0.9, 4), _score(True, 0.1, 1), _score(True, 0.5, 3)]
    assert misleading_question(every_path_right) == 1  # the fewest planted latents kept
    with pytest.raises(ValueError, match="one per question"):
        misleading_question(scores, caught=[True])


def test_same_site_control_draws_as_many_other_active_latents_at_each_site():
    gen = torch.Generator().manual_seed(0)
    active = {layer: torch.relu(torch.randn(6, 40, generator=gen)) for layer in range(3)}
    latents = [(0, 2, 5), (0, 2, 7), (2, 4, 1)]
    control = same_site_control(latents, active, random.Random(0))
    assert sorted((layer, pos) for layer, pos, _ in control) == [(0, 2), (0, 2), (2, 4)]
    assert not set(control) & set(latents)
    assert all(active[layer][pos, f] > 0 for layer, pos, f in control)
    assert control == same_site_control(latents, active, random.Random(0))  # seeded: reproducible
    assert len({tuple(same_site_control(latents, active, random.Random(s))) for s in range(5)}) > 1


def test_subspace_site_is_the_lowest_layer_at_its_busiest_position():
    truth = {"a": [(2, 5, 1), (1, 5, 2), (0, 3, 4), (0, 6, 1)], "b": [(3, 5, 9), (0, 3, 4), (0, 3, 8)]}
    assert subspace_site(truth) == (0, 3)
    assert subspace_site({"a": [(2, 5, 1), (1, 5, 2)], "b": [(1, 7, 3)]}) == (1, 5)
    with pytest.raises(ValueError, match="no latents"):
        subspace_site({"a": []})


def test_group_subspace_spans_the_centred_group_means(planted_world):
    model, tcs = planted_world
    facts = planted_facts("two_hop", "train")
    prompts, groups = [f.prompt for f in facts], [f.intermediate for f in facts]
    layer, pos = subspace_site(land_latents(model, tcs))  # where the lands differ
    Q = group_subspace(model, prompts, groups, layer, pos)
    assert Q.shape == (model.cfg.d_model, len(set(groups)) - 1)
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=Q.dtype), atol=1e-5, rtol=0)
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(model.to_tokens(prompts), names_filter=name)
    x = cache[name][:, pos].double()  # computed here, independently
    means = torch.stack([x[[g == name for g in groups]].mean(0) for name in sorted(set(groups))])
    centred = means - means.mean(0)
    Qd = Q.double()
    torch.testing.assert_close(centred @ Qd @ Qd.T, centred, atol=1e-4, rtol=1e-4)


def test_subspace_swap_replaces_only_the_subspace_component(planted_world):
    model, _ = planted_world
    a, b = planted_facts("two_hop", "heldout")[:2]
    layer, pos = 1, len(model.to_str_tokens(a.prompt)) - 1
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(model.cfg.d_model, 3, generator=gen))[0]
    _, cache = model.run_with_cache(
        model.to_tokens([a.prompt, b.prompt]), names_filter=f"blocks.{layer}.hook_resid_post"
    )
    x_a, x_b = cache[f"blocks.{layer}.hook_resid_post"][:, pos]

    def put(resid, hook):  # the expected edit, written out here
        resid = resid.clone()
        resid[:, pos] = x_a - (x_a @ Q) @ Q.T + (x_b @ Q) @ Q.T
        return resid

    want = model.run_with_hooks(
        model.to_tokens(a.prompt), fwd_hooks=[(f"blocks.{layer}.hook_resid_post", put)]
    )
    got = subspace_swap(model, [a.prompt], [b.prompt], Q, layer, pos)
    torch.testing.assert_close(got[0], want[0, -1], atol=1e-4, rtol=1e-4)
    clean = model(model.to_tokens(a.prompt))[0, -1]
    torch.testing.assert_close(subspace_swap(model, [a.prompt], [a.prompt], Q, layer, pos)[0], clean)
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match="one template"):
        subspace_swap(model, [a.prompt], [a.prompt, b.prompt], Q, layer, pos)


def test_the_land_variable_is_swapped_by_its_subspace_and_not_by_a_random_one(planted_world):
    """The model's own land variable (no dictionary): the span of the land means, from training questions,
    swapped at the site the land latents name, moves most held-out answers to the partner land's attribute;
    a random subspace of the same dimension almost none."""
    model, tcs = planted_world
    truth = land_latents(model, tcs)
    train, held = planted_facts("two_hop", "train"), planted_facts("two_hop", "heldout")
    lands = sorted(truth)
    partners = []
    for a in held:
        nxt = lands[(lands.index(a.intermediate) + 1) % len(lands)]
        partners.append(next(f for f in train if f.intermediate == nxt and f.attribute == a.attribute))
    layer, pos = subspace_site(truth)
    Q = group_subspace(model, [f.prompt for f in train], [f.intermediate for f in train], layer, pos)
    want = torch.tensor([model.to_single_token(b.answer) for b in partners])
    rate = (
        (
            subspace_swap(
                model, [a.prompt for a in held], [b.prompt for b in partners], Q, layer, pos
            ).argmax(-1)
            == want
        )
        .float()
        .mean()
    )
    R = torch.linalg.qr(torch.randn(Q.shape, generator=torch.Generator().manual_seed(0), dtype=Q.dtype))[0]
    control = (
        (
            subspace_swap(
                model, [a.prompt for a in held], [b.prompt for b in partners], R, layer, pos
            ).argmax(-1)
            == want
        )
        .float()
        .mean()
    )
    assert rate >= 0.8, f"the land subspace swapped {rate:.0%} of held-out pairs"
    assert control <= 0.2, f"a random subspace swapped {control:.0%}"


def test_the_case_study_tally_calls_the_learners_swap_group():
    """The exercises notebook passes the learner's function: the tally must call `swap_group` itself, not
    redo the swap with `intervene`, or a wrong swap_group would still show the right rates."""
    import ast
    import re
    from pathlib import Path

    source = (Path(__file__).parents[1] / "notebook_source" / "attribution_graphs.md").read_text()
    cell = re.search(r"```python id=case-interventions\n(.*?)```", source, re.S).group(1)
    calls = [
        n.func.id
        for n in ast.walk(ast.parse(cell))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    ]
    assert calls.count("swap_group") >= 2  # the land latents and the random control
    swap_values = [
        n for n in ast.walk(ast.parse(cell)) if isinstance(n, ast.Subscript) and "run_b" in ast.unparse(n)
    ]
    assert not swap_values, "the tally reads B's values itself instead of calling swap_group"


def test_make_graph_draws_town_to_land_latent_to_answer(tmp_path):
    """The default `make graph` page shows the planted mechanism: among the nodes it draws, a latent of the
    question's own land, reached by drawn edges from the town's embedding and reaching the answer's logit,
    labelled from its examples."""
    import json
    import re

    from part3_attribution_graphs import __main__ as cli
    from part3_attribution_graphs.worlds.planted import load_planted_world

    args = cli.settle_arguments(cli.build_parser(), cli.build_parser().parse_args([]))
    prompt = format_prompt(args.user, args.response)
    fact = next(f for f in planted_facts("two_hop") if f.prompt == prompt)
    cli.main(["--out", str(tmp_path / "graph")])
    page = (tmp_path / "graph" / "index.html").read_text()
    data = json.loads(re.search(r'id="dashboard-data">(.*?)</script>', page, re.S).group(1))
    nodes, edges = data["nodes"], data["edges"]
    model, tcs = load_planted_world()
    tokens = model.to_str_tokens(prompt)
    town = {p for p, t in enumerate(tokens) if t.strip() and t.strip() in fact.entity.split()}
    mine = set(land_latents(model, tcs)[fact.intermediate])
    land = [
        k
        for k, n in enumerate(nodes)
        if n["type"] == "latent" and (n["layer"], n["ctx"], n["feature"]) in mine
    ]
    assert land, f"no latent of {fact.intermediate} is drawn"
    succ: dict[int, set[int]] = {}
    for s, t, *_ in edges:
        succ.setdefault(s, set()).add(t)

    def reach(starts: set[int]) -> set[int]:
        seen, todo = set(starts), list(starts)
        while todo:
            for t in succ.get(todo.pop(), ()):
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    from_town = reach({k for k, n in enumerate(nodes) if n["type"] == "embedding" and n["ctx"] in town})
    answer = {k for k, n in enumerate(nodes) if n["type"] == "logit" and n["token"] == fact.answer}
    through = [k for k in land if k in from_town and reach({k}) & answer]
    assert through, f"no drawn path town -> {fact.intermediate} latent -> {fact.answer!r}"
    labels = [data["latents"][nodes[k]["key"]].get("derived", "") for k in through]
    assert all(labels) and not any(label.startswith("fires on") for label in labels)


def test_question_results_grid_has_a_row_per_question_and_a_column_per_measure():
    from part3_attribution_graphs.views.case_study_figures import plot_question_results

    fig = plot_question_results(["q1", "q2"], {"share": [0.25, 1.0], "swap": [True, False]})
    assert list(fig.data[0].y) == ["q1", "q2"] and list(fig.data[0].x) == ["share", "swap"]
    assert [list(row) for row in fig.data[0].z] == [[0.25, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="one value per question"):
        plot_question_results(["q1"], {"share": [0.1, 0.2]})


def test_the_readmes_case_study_figures_are_the_notebooks_outputs():
    """Every figure the README's case-study section quotes ("14 of 24 (58%)", "17.2x") is printed by the
    committed solutions notebook's case study: the README quotes measurements, not hopes."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## The case study: find the mechanism") :]
    section = section[: section.index("\n## ", 5)]
    notebook = json.loads((root / "solutions" / "part3_attribution_graphs_solutions.ipynb").read_text())
    printed = "".join(
        "".join(out.get("text", ""))
        for cell in notebook["cells"]
        if cell["cell_type"] == "code" and str(cell.get("id", "")).startswith("case-")
        for out in cell.get("outputs", [])
    )
    figures = re.findall(r"\d+ of \d+ \(\d+%\)|\d+ of \d+|\d+\.\d+%|\d+\.\d+x", section)
    assert len(figures) >= 8, f"the section quotes too few measured figures: {figures}"
    missing = [f for f in figures if f not in printed]
    assert not missing, f"README figures not printed by the notebook's case study: {missing}"


def test_the_readmes_case_study_table_is_what_its_generator_makes_of_the_notebook():
    """`make readme-case-study` regenerates the README's table from the solutions notebook: the committed
    README holds exactly its output, and rewriting a stale table restores it."""
    import json

    from part3_attribution_graphs.tools.case_study_table import NOTEBOOK, README, case_study_table, with_table

    table = case_study_table(json.loads(NOTEBOOK.read_text()))
    readme = README.read_text()
    assert table in readme, "README's case-study table is stale: run `make readme-case-study`"
    stale = readme.replace(
        table, table.replace("| swap: land latents |", "| swap: land latents | 0 of 24 |x")
    )
    assert with_table(stale, table) == readme
