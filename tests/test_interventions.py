"""Interventions measure what the graph predicts: exactly, where the replacement model is linear.

With every active latent a node and attention patterns and norm scales frozen, the local replacement
model is linear apart from the JumpReLU gates. So (1) with every other latent held, scaling a latent
by (1 + eps) moves each target by eps times its direct effect, for any eps; (2) with the latents live,
by eps times its total effect, as long as no gate opens or closes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hook_count, need

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.interventions import (
    CleanRun,
    PredictedEffects,
    ablation_effects,
    clean_run,
    demeaned_logit,
    intervene,
    intervene_generate,
    predicted_effects,
    run_with_latent_set,
)
from part3_attribution_graphs.nodes import NodeType
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is **large")
EVERY_LATENT = 10**6
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
SOURCE_LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def graphs(toy_world, toy_world_f64):
    """Both precisions: (model, transcoders, result with every active latent a node, tokens)."""
    out = {}
    for model, tcs in (toy_world, toy_world_f64):
        result = attribute(model, tcs, PROMPT, start_posn=START_POSN, top_k=EVERY_LATENT, batch_size=256)
        out[model.cfg.dtype] = (model, tcs, result, model.to_tokens(PROMPT))
    return out


def targets_of(result):
    """Index tensors of the latent targets (layer, pos, feature) and the logit targets (token ids)."""
    nodes = result.graph.nodes
    lat = [i for i, n in enumerate(nodes) if n.node_type == NodeType.LATENT]
    logit = [i for i, n in enumerate(nodes) if n.node_type == NodeType.LOGIT]
    where = torch.tensor([(nodes[i].layer, nodes[i].ctx_idx, nodes[i].feature) for i in lat])
    return lat, logit, where, [nodes[i].feature for i in logit]


def readings(out, result) -> torch.Tensor:
    """What every latent and logit target reads, in node order: pre-activations, then demeaned logits."""
    _, _, where, token_ids = targets_of(result)
    acts = torch.stack([out.activations[layer] for layer in sorted(out.activations)])
    pre = acts[where[:, 0], where[:, 1], where[:, 2]]
    logits = torch.stack([demeaned_logit(out.logits, t)[0] for t in token_ids])
    return torch.cat([pre, logits.to(pre.dtype)])


def flips(out, clean) -> int:
    return sum(int(((out.activations[k] > 0) != (clean.activations[k] > 0)).sum()) for k in clean.activations)


def rel_err(measured: torch.Tensor, predicted: torch.Tensor) -> float:
    return ((measured.double() - predicted.double()).abs().max() / predicted.double().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_direct_effect_is_exact_with_downstream_latents_held(graphs, dtype):
    model, tcs, result, tokens = graphs[dtype]
    nodes = result.graph.nodes
    lat, logit, _, _ = targets_of(result)
    n_layers = model.cfg.n_layers
    settings = dict(constrained_layers=range(n_layers), apply_activation_function=False)
    clean = readings(intervene(model, tcs, tokens, [], **settings), result)
    sources = [
        max((i for i in lat if nodes[i].layer == layer), key=lambda i: nodes[i].activation)
        for layer in SOURCE_LAYERS
    ]
    direct = predicted_effects(result, sources).direct[:, lat + logit]
    for j, s in enumerate(sources):
        n = nodes[s]
        for eps in (1.0, -1.0):  # the held model is linear: doubling and ablating are both exact
            out = intervene(
                model, tcs, tokens, [(n.layer, n.ctx_idx, n.feature, (1 + eps) * n.activation)], **settings
            )
            err = rel_err((readings(out, result) - clean) / eps, direct[j])
            assert err < TOL[dtype], (n.layer, eps, err)
            print(f"direct {dtype} layer {n.layer} eps {eps}: residual {err:.2e}")
    assert direct[:, -len(logit) :].abs().max() > 0  # the sources do reach the logits


def safe_sources(model, tcs, result, tokens, grid):
    """Per source layer, a latent and the largest eps in `grid` whose scaling crosses no JumpReLU threshold.

    Candidates come in order of the margin the graph predicts (how far eps can go before an active latent
    closes); each is then checked on the model, where inactive latents, which the graph cannot see, may open.
    """
    nodes = result.graph.nodes
    lat, _, where, _ = targets_of(result)
    clean = intervene(model, tcs, tokens, [])
    pre = readings(intervene(model, tcs, tokens, [], apply_activation_function=False), result)[: len(lat)]
    thresholds = torch.stack([tcs[layer].threshold for layer in sorted(tcs)])[where[:, 0], where[:, 2]]
    room = (pre - thresholds).to(result.adjacency_matrix.dtype)
    chosen = []
    for layer in SOURCE_LAYERS:
        mine = [i for i in lat if nodes[i].layer == layer]
        total = predicted_effects(result, mine).total[:, lat]
        margin = (room / total.abs().clamp(min=1e-30)).min(dim=1).values
        for k in margin.argsort(descending=True).tolist()[:20]:
            n = nodes[mine[k]]
            for eps in (e for e in grid if abs(e) < margin[k]):
                out = intervene(
                    model, tcs, tokens, [(n.layer, n.ctx_idx, n.feature, (1 + eps) * n.activation)]
                )
                if flips(out, clean) == 0:
                    chosen.append((mine[k], eps))
                    break
            if len(chosen) > SOURCE_LAYERS.index(layer):
                break
    return chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_total_effect_is_exact_while_no_threshold_is_crossed(graphs, dtype):
    model, tcs, result, tokens = graphs[dtype]
    nodes = result.graph.nodes
    lat, logit, _, _ = targets_of(result)
    clean = readings(intervene(model, tcs, tokens, [], apply_activation_function=False), result)
    # float32 round-off is ~1e-6 of the readings, so it needs an eps of 0.1 or more for 1e-4; float64 does
    # not.
    grid = (1.0, -0.5, 0.5, 0.2, -0.2, 0.1, -0.1) if dtype == torch.float32 else (0.1, 1e-2, 1e-3)
    checked = safe_sources(model, tcs, result, tokens, grid)
    assert [nodes[s].layer for s, _ in checked] == list(SOURCE_LAYERS)
    effects = predicted_effects(result, [s for s, _ in checked])
    for j, (s, eps) in enumerate(checked):
        n = nodes[s]
        out = intervene(
            model,
            tcs,
            tokens,
            [(n.layer, n.ctx_idx, n.feature, (1 + eps) * n.activation)],
            apply_activation_function=False,
        )
        measured = (readings(out, result) - clean) / eps
        err = rel_err(measured, effects.total[j, lat + logit])
        assert err < TOL[dtype], (n.layer, eps, err)
        print(f"total {dtype} layer {n.layer} eps {eps}: residual {err:.2e}")
        if n.layer < 2:  # paths through other latents matter: total and direct really differ
            assert rel_err(measured, effects.direct[j, lat + logit]) > 100 * TOL[dtype]


def test_predicted_effects_shapes_and_closed_form(graphs):
    _, _, result, _ = graphs[torch.float64]
    A, nodes = result.adjacency_matrix, result.graph.nodes
    lat = [i for i, n in enumerate(nodes) if n.node_type == NodeType.LATENT]
    sources = [lat[0], lat[len(lat) // 2]]
    effects = predicted_effects(result, sources)
    assert isinstance(effects, PredictedEffects)
    assert effects.direct.shape == effects.total.shape == (2, len(nodes))
    torch.testing.assert_close(effects.direct, A[:, sources].T)
    # Path by path: total = sum over k of M^k A[:, s], with M the edges per unit activation change.
    gain = torch.tensor(
        [1 / n.activation if n.node_type == NodeType.LATENT else 0.0 for n in nodes], dtype=A.dtype
    )
    M, term, total = A * gain, A[:, sources], torch.zeros_like(A[:, sources])
    for _ in range(result.graph.n_layers + 2):
        total, term = total + term, M @ term
    assert term.abs().max() == 0  # every path has been counted
    torch.testing.assert_close(effects.total, total.T, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="effects are predicted for latents"):
        predicted_effects(result, [0])


# ------------------------------------------------------------------------------ the engine's modes


def test_no_intervention_reproduces_the_model_in_every_mode(toy_world):
    model, tcs = toy_world
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        want = model(tokens)
    for kw in (
        {},
        {"freeze_attention": False},
        {"hold_errors": False, "freeze_attention": False},
        {"constrained_layers": range(4)},
    ):
        torch.testing.assert_close(intervene(model, tcs, tokens, [], **kw).logits, want, rtol=1e-5, atol=1e-5)


def test_run_with_latent_set_is_the_engine_in_live_mode(toy_world):
    """The exercise's one-latent edit equals `intervene` with the real MLPs and everything live."""
    model, tcs = toy_world
    tokens = model.to_tokens(PROMPT)
    before = hook_count(model)
    for layer, pos, latent, value in ((1, 7, 3, 0.0), (2, 10, 17, 4.0)):
        got = run_with_latent_set(model, tcs[layer], tokens, pos, latent, value)
        want = intervene(
            model, tcs, tokens, [(layer, pos, latent, value)], freeze_attention=False, hold_errors=False
        ).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert hook_count(model) == before


def test_ablation_effects_are_the_total_effect_and_one_intervention_each(graphs):
    """The lesson's experiment: predicted = -total effect on the top logit, measured = one ablation each."""
    model, tcs, result, tokens = graphs[torch.float64]
    nodes = result.graph.nodes
    lat = [i for i, n in enumerate(nodes) if n.node_type == NodeType.LATENT]
    top = sorted(lat, key=lambda i: -float(result.influence[i]))[:3]
    logit = result.graph.node_range_dict["L"][0]
    predicted, measured = ablation_effects(model, tcs, result, top, freeze_attention=False)
    torch.testing.assert_close(predicted, -predicted_effects(result, top).total[:, logit])
    token = nodes[logit].feature
    clean = demeaned_logit(intervene(model, tcs, tokens, [], freeze_attention=False).logits, token)
    n = nodes[top[1]]
    ablated = intervene(model, tcs, tokens, [(n.layer, n.ctx_idx, n.feature, 0.0)], freeze_attention=False)
    assert measured[1].item() == pytest.approx(
        (demeaned_logit(ablated.logits, token) - clean).item(), abs=1e-12
    )
    assert (measured != 0).all()


class PassCounter:
    """Counts the model's forward passes (a raw torch hook on the embedding, which TransformerLens leaves
    alone)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.embed.register_forward_hook(self.count)

    def count(self, *args) -> None:
        self.n += 1

    def __enter__(self) -> PassCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"freeze_attention": False},
        {"freeze_norms": False},
        {"hold_errors": False, "freeze_attention": False},
        {"constrained_layers": range(2), "apply_activation_function": False},
    ],
    ids=["frozen", "live", "patterns-only", "real-mlps", "constrained"],
)
def test_a_clean_run_gives_what_the_prompt_gives(toy_world, kw):
    """Passing a CleanRun in place of the prompt changes nothing but the number of forward passes."""
    model, tcs = toy_world
    clean = clean_run(model, tcs, PROMPT)
    for edits in ([], [(1, 7, 3, 0.0)], [(0, 5, 1, 2.5), (2, 10, 17, 4.0), (3, 12, 8, 0.0)]):
        with PassCounter(model) as passes:
            reused = intervene(model, tcs, clean, edits, **kw)
        assert passes.n == 1
        fresh = intervene(model, tcs, PROMPT, edits, **kw)
        assert torch.equal(reused.logits, fresh.logits)
        assert reused.activations.keys() == fresh.activations.keys()
        assert all(torch.equal(reused.activations[k], fresh.activations[k]) for k in fresh.activations)


def test_ablation_effects_make_one_clean_pass_per_sweep(graphs):
    """n latents: one clean pass, one baseline and n ablations (it used to be two passes per run); the
    measured effects are exactly those of separate `intervene` calls on the prompt."""
    model, tcs, result, tokens = graphs[torch.float32]
    top = sorted(
        (i for i, n in enumerate(result.graph.nodes) if n.node_type == NodeType.LATENT),
        key=lambda i: -float(result.influence[i]),
    )[:4]
    with PassCounter(model) as passes:
        _, measured = ablation_effects(model, tcs, result, top, freeze_attention=False)
    assert passes.n == len(top) + 2
    token = result.graph.nodes[result.graph.node_range_dict["L"][0]].feature
    base = demeaned_logit(intervene(model, tcs, tokens, [], freeze_attention=False).logits, token)
    one_by_one = []
    for i in top:
        n = result.graph.nodes[i]
        out = intervene(model, tcs, tokens, [(n.layer, n.ctx_idx, n.feature, 0.0)], freeze_attention=False)
        one_by_one.append(float(demeaned_logit(out.logits, token) - base))
    assert torch.equal(measured, torch.tensor(one_by_one, dtype=measured.dtype))


def test_a_clean_run_of_another_world_is_refused(toy_world, toy_world_f64):
    model, tcs = toy_world
    other_model, other_tcs = toy_world_f64
    clean = clean_run(model, tcs, PROMPT)
    assert isinstance(clean, CleanRun) and "tokens=" in repr(clean) and "W_enc" not in repr(clean)
    before = hook_count(model)
    with pytest.raises(ValueError, match="another model"):
        intervene(other_model, other_tcs, clean, [])
    with pytest.raises(ValueError, match="without the transcoders you pass for layers"):
        intervene(model, {**tcs, 1: other_tcs[1]}, clean, [])
    with pytest.raises(ValueError, match="position 999 is outside the prompt"):
        intervene(model, tcs, clean, [(1, 999, 3, 0.0)])
    assert hook_count(model) == before
    partial = {layer: tc for layer, tc in tcs.items() if layer != 2}  # a subset of its transcoders is fine
    torch.testing.assert_close(
        intervene(model, partial, clean, [(1, 7, 3, 0.0)]).logits,
        intervene(model, partial, PROMPT, [(1, 7, 3, 0.0)]).logits,
    )


def test_intervene_generate_without_interventions_is_greedy_decoding(toy_world):
    model, tcs = toy_world
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        seq = tokens
        for _ in range(3):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = model.tokenizer.decode(seq[0, tokens.shape[1] :].tolist())
    assert intervene_generate(model, tcs, PROMPT, [], max_new_tokens=3, freeze_attention=False) == want
    steered = intervene_generate(model, tcs, PROMPT, [(2, tokens.shape[1] - 1, 5, 50.0)], max_new_tokens=3)
    assert isinstance(steered, str)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "bad, message",
    [
        ((1, 5, 10**6, 0.0), "latent 1000000 is out of range"),
        ((1, 999, 3, 0.0), "position 999 is outside the prompt"),
        ((1, -1, 3, 0.0), "position -1 is outside the prompt"),
        ((7, 5, 3, 0.0), "no transcoder at layer 7"),
        ((2, 5, 3, 0.0), "no transcoder at layer 2"),
        ((1, 5, 3, float("nan")), "set a finite number"),
        ((1, 5, 3, float("inf")), "set a finite number"),
        ((1, 5, 3), "each intervention is (layer, position, latent, value)"),
    ],
)
def test_bad_input_is_refused_and_leaves_no_hook(toy_world, bad, message):
    model, tcs = toy_world
    partial = {layer: tc for layer, tc in tcs.items() if layer != 2}
    before = hook_count(model)
    for fn in (intervene, intervene_generate):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            fn(model, partial, PROMPT, [(0, 5, 1, 0.0), bad])
        assert hook_count(model) == before


def test_a_failure_inside_the_forward_pass_leaves_no_hook(toy_world, monkeypatch):
    model, tcs = toy_world
    before = hook_count(model)
    calls = {"n": 0}
    encode = tcs[2].encode

    def encode_then_fail(x):
        calls["n"] += 1
        if calls["n"] > 1:  # the clean pass works; the intervention pass fails half-way through the model
            raise RuntimeError("boom")
        return encode(x)

    monkeypatch.setattr(tcs[2], "encode", encode_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        intervene(model, tcs, PROMPT, [(0, 5, 1, 0.0)])
    assert hook_count(model) == before


def test_bad_prompt_and_constraints(toy_world):
    model, tcs = toy_world
    for bad in ("", torch.zeros(2, 5, dtype=torch.long), torch.zeros(5)):
        with pytest.raises(ValueError, match="prompt"):
            intervene(model, tcs, bad, [])
    with pytest.raises(ValueError, match="constrained_layers"):
        intervene(model, tcs, PROMPT, [], constrained_layers=[9])
    with pytest.raises(ValueError, match="max_new_tokens"):
        intervene_generate(model, tcs, PROMPT, [], max_new_tokens=-1)


# ------------------------------------------------------------------------------ circuit-tracer


CT_MODES = {
    # name: (our keywords, circuit-tracer's keywords). The settings that make the two compute the same thing:
    # circuit-tracer runs the real MLPs (hold_errors=False) and its freeze_attention freezes patterns only.
    "direct (all layers constrained)": (dict(constrained_layers=range(4)), dict(constrained_layers=range(4))),
    "frozen patterns": (dict(freeze_norms=False, hold_errors=False), dict(freeze_attention=True)),
    "live": (dict(freeze_attention=False, hold_errors=False), dict(freeze_attention=False)),
}


@pytest.mark.crosscheck
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", list(CT_MODES))
@pytest.mark.parametrize("apply_fn", [True, False], ids=["acts", "pre"])
def test_same_as_circuit_tracer_feature_intervention(toy_world, mode, apply_fn):
    need("circuit_tracer")
    from part3_attribution_graphs.tools.crosscheck import ct_replacement_model

    model, tcs = toy_world
    ct_model = ct_replacement_model(model, tcs, start_posn=0)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        acts = {
            layer: tc.encode(c)
            for layer, tc in tcs.items()
            for c in [
                model.run_with_cache(tokens, names_filter=tc.cfg.metadata.hook_name)[1][
                    tc.cfg.metadata.hook_name
                ][0]
            ]
        }
    # (circuit-tracer takes 1-D token ids.) Ablate the most active latent at three positions in three layers,
    # and steer one up 3x.
    edits = []
    for layer, pos in ((0, 6), (1, 9), (2, 12)):
        f = int(acts[layer][pos].argmax())
        edits.append((layer, pos, f, 0.0))
    f = int(acts[1][15].argmax())
    edits.append((1, 15, f, 3 * float(acts[1][15, f])))
    ours_kw, ct_kw = CT_MODES[mode]
    ours = intervene(model, tcs, tokens, edits, apply_activation_function=apply_fn, **ours_kw)
    ct_logits, ct_acts = ct_model.feature_intervention(
        tokens[0], edits, apply_activation_function=apply_fn, **ct_kw
    )
    clean = model(tokens)
    assert rel_err(ct_logits - clean, ours.logits - clean) < 1e-4  # the change, not just the logits
    assert rel_err(ours.logits, ct_logits) < 1e-5
    for layer in range(4):
        assert rel_err(ours.activations[layer], ct_acts[layer]) < 1e-5, layer


def test_cli_stores_predicted_and_measured_ablations(tmp_path, capsys):
    import json

    from part3_attribution_graphs.__main__ import main

    summary = main(["--interventions", "2", "--no-dashboard", "--out", str(tmp_path)])
    nodes = json.loads((tmp_path / "nodes.json").read_text())["nodes"]
    ablated = [n for n in nodes if "ablation" in n]
    assert len(ablated) == 2 and all(n["node_type"] == "latent" for n in ablated)
    top = sorted((n for n in nodes if n["node_type"] == "latent"), key=lambda n: -n["influence"])[:2]
    assert [n["node_id"] for n in ablated] == sorted(
        [n["node_id"] for n in top], key=lambda i: [n["node_id"] for n in nodes].index(i)
    )
    for n in ablated:
        assert set(n["ablation"]) == {"predicted", "measured_frozen", "measured_live"}
        assert n["ablation"]["predicted"] != 0 and n["ablation"]["measured_live"] != 0
    assert set(summary["interventions"]) == {"frozen", "live"}
