"""The engine is a complete, exact linear decomposition of the local replacement model.

Edges are checked against `LinearisedModel`, an explicit re-implementation of the frozen model that
shares no code with the attribution path (no hooks, no backward passes).
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch
from conftest import hook_count

from part3_attribution_graphs import attribution as attribution_module
from part3_attribution_graphs.attribution import Batch, attribute, prepare_backward_batches, read_hook_name
from part3_attribution_graphs.checks import ExistingHooksWarning
from part3_attribution_graphs.linear_model import LinearisedModel
from part3_attribution_graphs.nodes import NodeType
from part3_attribution_graphs.pruning import compute_influence, normalize_matrix
from part3_attribution_graphs.replacement import FreezeHooks, TranscoderReplacementHooks
from part3_attribution_graphs.toy import make_toy_world
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is **large")
COUPLET = format_prompt(
    "Write me a short rhyming couplet.", "The sun descends, a golden hue,\nAs evening whispers, soft and"
)
PLANTED_PROMPT = format_prompt("Ambry. What is the fruit of its land?", "Answer:")
EVERY_LATENT = 10**6  # top_k large enough that every active latent becomes a node


def linearised(model, transcoders, prompt):
    freeze = FreezeHooks(model)
    cache = freeze.cache_frozen_values(model.to_tokens(prompt))
    return LinearisedModel(model, transcoders, cache), cache


# ---------------------------------------------------------------- the toy world


def test_toy_world_is_deterministic_and_seeded():
    (m1, t1), (m2, t2), (m3, _) = make_toy_world(0), make_toy_world(0), make_toy_world(1)
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), name
    for layer in t1:
        for name, p in t1[layer].state_dict().items():
            assert torch.equal(p, t2[layer].state_dict()[name]), (layer, name)
    assert not torch.equal(m1.W_E, m3.W_E)


def test_toy_world_has_gemma3_architecture(toy_world):
    model, transcoders = toy_world
    cfg = model.cfg
    assert cfg.use_normalization_before_and_after and cfg.use_qk_norm and cfg.gated_mlp
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert set(cfg.attn_types) == {"local", "global"}
    assert cfg.n_key_value_heads < cfg.n_heads  # grouped-query attention
    # Norm weights far from 1, a non-zero b_dec and a non-symmetric W_skip: bugs must show.
    assert (model.blocks[0].ln2.w - 1).abs().mean() > 0.1
    for tc in transcoders.values():
        assert tc.b_dec.abs().mean() > 0.01
        assert (tc.W_skip - tc.W_skip.T).abs().max() > 0.1 * tc.W_skip.abs().max()
        assert tc.cfg.metadata.hook_name.endswith("mlp.hook_in")
        assert tc.cfg.metadata.hook_name_out.endswith("hook_mlp_out")


def test_toy_tokenizer_matches_gemma_chat_layout(toy_world):
    model, _ = toy_world
    str_tokens = model.to_str_tokens(PROMPT)
    assert str_tokens[:START_POSN] == ["<bos>", "<start_of_turn>", "user", "\n"]
    assert "<unk>" not in str_tokens
    assert str_tokens[-3:] == [" is", " **", "large"]
    assert "<unk>" not in model.to_str_tokens(COUPLET)


def test_toy_transcoders_fire_5_to_20_latents_per_token(toy_world):
    model, transcoders = toy_world
    _, cache = model.run_with_cache(model.to_tokens(COUPLET))
    for layer, tc in transcoders.items():
        l0 = (tc.encode(cache[f"blocks.{layer}.mlp.hook_in"])[0, START_POSN:] > 0).float().sum(-1).mean()
        assert 5 <= l0 <= 20, (layer, l0)


# ---------------------------------------------------------------- the replacement model


def test_replacement_hooks_keep_forward_logits(toy_world):
    model, transcoders = toy_world
    tokens = model.to_tokens(COUPLET)
    before = hook_count(model)
    freeze = FreezeHooks(model)
    cache = freeze.cache_frozen_values(tokens)
    with TranscoderReplacementHooks(model, transcoders, cache), freeze:
        hooked = model(tokens)
    plain = model(tokens)
    diff = (hooked - plain).abs().max().item()
    print(f"max |logit difference| with replacement + freeze hooks: {diff:.2e}")
    assert diff < 1e-5
    assert hook_count(model) == before


def test_mlp_gradient_flows_through_w_skip_transposed(toy_world_f64):
    """d(mlp_out . v)/d(mlp_in) must be W_skip.T v... i.e. v @ W_skip (SAELens' (d_out, d_in) layout).

    In float64 with a seeded v: in float32 an unlucky draw (the global RNG, so whatever ran before) left an
    entry near 0 whose rounding differed by 2.5e-6 between the two summation orders."""
    model, transcoders = toy_world_f64
    tokens = model.to_tokens(PROMPT)
    freeze = FreezeHooks(model)
    cache = freeze.cache_frozen_values(tokens)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layer = 1
    seen = {}

    def keep(x, hook):
        x.retain_grad()
        seen[hook.name] = x

    with (
        TranscoderReplacementHooks(model, transcoders, cache),
        model.hooks(
            fwd_hooks=[(f"blocks.{layer}.mlp.hook_in", keep), (f"blocks.{layer}.hook_mlp_out", keep)]
        ),
    ):
        model(tokens)
        (seen[f"blocks.{layer}.hook_mlp_out"][0, 5] @ v).backward()
    grad_in = seen[f"blocks.{layer}.mlp.hook_in"].grad[0, 5]
    torch.testing.assert_close(grad_in, v @ transcoders[layer].W_skip.detach(), rtol=1e-12, atol=1e-12)
    model.zero_grad(set_to_none=True)


def test_independent_linear_model_reproduces_the_forward_pass(toy_world):
    model, transcoders = toy_world
    lin, cache = linearised(model, transcoders, COUPLET)
    out = lin.forward(*lin.clean_inputs())
    for name, value in out.items():
        torch.testing.assert_close(value.float(), cache[name][0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- completeness


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("top_k", [EVERY_LATENT, 5])
@pytest.mark.parametrize("world", ["toy", "planted"])
def test_graph_is_complete(dtype, rtol, top_k, world, request):
    """Incoming edges + bias terms = what the target reads (pre-activation - b_enc, or demeaned logit).

    With top_k=5 the latents outside the top 5 live in the error node, so the sum still closes. On the
    planted world (trained weights and transcoders) with one of its two-hop questions.
    """
    fixture = f"{world}_world" + ("" if dtype == torch.float32 else "_f64")
    model, transcoders = request.getfixturevalue(fixture)
    prompt = COUPLET if world == "toy" else PLANTED_PROMPT
    result = attribute(model, transcoders, prompt, start_posn=0, top_k=top_k, batch_size=64)
    graph, A = result.graph, result.adjacency_matrix.double()
    assert A.dtype == torch.float64 and result.adjacency_matrix.dtype == dtype
    lin, cache = linearised(model, transcoders, prompt)
    clean, biases = lin.forward(*lin.clean_inputs()), lin.forward(*lin.bias_inputs())
    targets = [i for i, n in enumerate(graph.nodes) if n.node_type in (NodeType.LATENT, NodeType.LOGIT)]
    with torch.no_grad():
        logits = model(model.to_tokens(prompt))[0, -1].double()
    worst = 0.0
    for t in targets:
        node, r = graph.nodes[t], graph.reading_vecs[t].double()
        name = read_hook_name(node.layer)
        value = float(clean[name][node.ctx_idx] @ r)
        bias = float(biases[name][node.ctx_idx] @ r)
        if node.node_type == NodeType.LATENT:  # the reading is the pre-activation minus b_enc
            tc = transcoders[node.layer]
            pre = float(cache[name][0, node.ctx_idx].double() @ tc.W_enc[:, node.feature].detach().double())
            assert abs(pre - value) <= 1e-4 * (1 + abs(pre))
        else:  # the demeaned logit, read through the frozen ln_final
            demeaned = logits[node.feature] - logits.mean()
            assert abs(demeaned - value) <= 1e-4 * (1 + abs(value))
        scale = A[t].abs().sum().item() + abs(bias)
        worst = max(worst, abs(A[t].sum().item() + bias - value) / scale)
    print(f"{dtype}, top_k={top_k}: {len(targets)} targets, worst completeness residual {worst:.2e}")
    assert worst < rtol


# ---------------------------------------------------------------- perturbation


def edge_classes(graph):
    """Every (source, target) pair grouped by the kind of edge it is."""
    classes = defaultdict(list)
    nodes = graph.nodes
    for t, nt in enumerate(nodes):
        if nt.node_type not in (NodeType.LATENT, NodeType.LOGIT):
            continue
        for s in range(t):
            ns = nodes[s]
            if ns.node_type == NodeType.LOGIT:
                continue
            kind = f"{ns.node_type.value}->{nt.node_type.value}"
            if ns.node_type == NodeType.LATENT and nt.node_type == NodeType.LATENT:
                kind += " (same position)" if ns.ctx_idx == nt.ctx_idx else " (across positions)"
            classes[kind].append((s, t))
    return classes


@pytest.mark.parametrize("prompt", [PROMPT, COUPLET])
def test_every_edge_type_matches_a_perturbation_of_the_linear_model(prompt, toy_world_f64):
    model, transcoders = toy_world_f64
    result = attribute(model, transcoders, prompt, start_posn=START_POSN, batch_size=64)
    graph, A = result.graph, result.adjacency_matrix
    lin, _ = linearised(model, transcoders, prompt)
    classes = edge_classes(graph)
    for kind in [
        "embedding->latent",
        "latent->latent (across positions)",
        "latent->latent (same position)",
        "mlp_error->latent",
        "latent->logit",
        "embedding->logit",
        "mlp_error->logit",
    ]:
        assert classes[kind], f"no {kind} edges to check"
    rng = random.Random(0)
    report = {}
    for kind, pairs in sorted(classes.items()):
        # Prefer the largest edges of the class (non-trivial), plus random ones (incl. zeros from masking).
        by_size = sorted(pairs, key=lambda st: -abs(A[st[1], st[0]].item()))
        sample = by_size[:8] + rng.sample(pairs, min(8, len(pairs)))
        worst = 0.0
        for s, t in sample:
            ns, nt = graph.nodes[s], graph.nodes[t]
            expected = (
                0.0
                if ns.ctx_idx < START_POSN
                else lin.edge_by_perturbation(
                    (ns.layer, ns.ctx_idx),
                    graph.writing_vecs[s],
                    (read_hook_name(nt.layer), nt.ctx_idx),
                    graph.reading_vecs[t],
                )
            )
            scale = A[t].abs().max().item() + 1e-12
            worst = max(worst, abs(A[t, s].item() - expected) / scale)
        report[kind] = worst
        assert worst < 1e-9, (kind, worst)
    assert any(abs(A[t, s]) > 1e-3 for s, t in classes["latent->latent (across positions)"]), (
        "attention never carries a latent's effect to a later position"
    )
    print("worst |edge - perturbation| / row max, by edge type:", {k: f"{v:.1e}" for k, v in report.items()})


def test_batch_size_does_not_change_edges(toy_world):
    model, transcoders = toy_world
    a = attribute(model, transcoders, PROMPT, batch_size=7).adjacency_matrix
    b = attribute(model, transcoders, PROMPT, batch_size=512).adjacency_matrix
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batches_have_named_fields_and_still_unpack(toy_world):
    result = attribute(*toy_world, PROMPT, batch_size=7)
    batches = prepare_backward_batches(result.graph, batch_size=7)
    for b in batches:
        start, nodes, reading, positions, layers = b  # positional use keeps working
        assert isinstance(b, Batch) and b.start == start and b.nodes is nodes and b.layers == layers
        assert torch.equal(b.reading_vecs, result.graph.reading_vecs[start : start + len(nodes)])
        assert b.positions.tolist() == [n.ctx_idx for n in nodes] and len(set(map(str, b.layers))) == 1
    assert (
        sum(len(b.nodes) for b in batches) == len(result.graph) - result.graph.seq_len
    )  # all but embeddings


# ---------------------------------------------------------------- linearity facts


def test_adjacency_structure(toy_world):
    model, transcoders = toy_world
    result = attribute(model, transcoders, COUPLET, batch_size=64)
    graph, A = result.graph, result.adjacency_matrix
    assert torch.count_nonzero(torch.triu(A)) == 0, "edges must go from earlier to later nodes only"
    kinds = [n.node_type for n in graph.nodes]
    readers = torch.tensor([k in (NodeType.LATENT, NodeType.LOGIT) for k in kinds])
    assert torch.count_nonzero(A[~readers]) == 0, "embeddings and error nodes read nothing"
    logits = torch.tensor([k == NodeType.LOGIT for k in kinds])
    assert torch.count_nonzero(A[:, logits]) == 0, "logit nodes write nothing"
    masked = torch.tensor([n.ctx_idx < START_POSN for n in graph.nodes])
    assert torch.count_nonzero(A[:, masked]) == 0, "the masked prefix sends no edges"
    assert not any(n.ctx_idx < START_POSN for n in graph.nodes if n.node_type != NodeType.EMBEDDING)
    # Latent rows are not empty: the graph has substance.
    assert (A[readers].abs().sum(1) > 0).float().mean() > 0.9
    assert len(graph) > 300  # big enough that batching matters


def test_influence_equals_the_inverse_series(toy_world):
    model, transcoders = toy_world
    result = attribute(model, transcoders, COUPLET, batch_size=64)
    A, w = result.adjacency_matrix.double(), result.logit_weights.double()
    n = A.shape[0]
    B = normalize_matrix(A)
    w_full = torch.zeros(n, dtype=torch.float64)
    w_full[n - len(w) :] = w
    eye = torch.eye(n, dtype=torch.float64)
    # Solve x (I - B) = w for x, i.e. (I - B)^T x^T = w^T; I - B is lower triangular with unit diagonal.
    x = torch.linalg.solve_triangular((eye - B).T, w_full.unsqueeze(1), upper=True).squeeze(1)
    torch.testing.assert_close(compute_influence(A, w, model.cfg.n_layers), x - w_full, rtol=1e-9, atol=1e-12)
    assert torch.equal(torch.linalg.matrix_power(B, model.cfg.n_layers + 2), torch.zeros_like(B)), (
        "B nilpotent"
    )


# ---------------------------------------------------------------- hooks and bad input


def test_no_hook_survives_a_call_even_a_failing_one(toy_world, monkeypatch):
    model, transcoders = toy_world
    mine = []

    def my_hook(x, hook):
        mine.append(hook.name)

    model.add_hook("blocks.0.hook_resid_pre", my_hook)  # a learner's own hook must survive
    try:
        before = hook_count(model)
        with pytest.warns(ExistingHooksWarning, match="my_hook"):  # attribute names the learner's hook
            attribute(model, transcoders, PROMPT, batch_size=64)
        assert hook_count(model) == before

        calls = {"n": 0}
        real = attribution_module.setup_attribution

        def fails_on_third_batch(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        monkeypatch.setattr(attribution_module, "setup_attribution", fails_on_third_batch)
        monkeypatch.setattr(attribution_module.TransposedModel, "supports", staticmethod(lambda *a: False))
        with pytest.raises(RuntimeError, match="boom"), pytest.warns(ExistingHooksWarning):  # autograd path
            attribute(model, transcoders, PROMPT, batch_size=16)
        assert hook_count(model) == before

        freeze = FreezeHooks(model)
        freeze.cache_frozen_values(model.to_tokens(PROMPT))
        with pytest.raises(ValueError), freeze:
            raise ValueError("inside the freeze context")
        assert hook_count(model) == before
        mine.clear()
        model(model.to_tokens(PROMPT))
        assert mine == ["blocks.0.hook_resid_pre"]
    finally:
        model.reset_hooks(including_permanent=True)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(node_threshold=0.0), "node_threshold"),
        (dict(node_threshold=1.5), "node_threshold"),
        (dict(edge_threshold=-0.1), "edge_threshold"),
        (dict(edge_threshold=float("nan")), "edge_threshold"),
        (dict(n_output_nodes=0), "n_output_nodes"),
        (dict(n_output_nodes=10**7), "n_output_nodes"),
        (dict(start_posn=200), "start_posn"),
        (dict(prompt=""), "prompt"),
        (dict(prompt="<start_of_turn>user"), "start_posn"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_feature_nodes=-1), "max_feature_nodes"),
    ],
)
def test_bad_input_is_rejected_clearly(kwargs, needle, toy_world):
    model, transcoders = toy_world
    before = hook_count(model)
    args = dict(model=model, transcoders=transcoders, prompt=PROMPT) | kwargs
    with pytest.raises(ValueError, match=needle):
        attribute(**args)
    assert hook_count(model) == before


def test_transcoders_for_another_model_are_rejected(toy_world):
    model, transcoders = toy_world
    with pytest.raises(ValueError, match="one entry per layer"):
        attribute(model, {k: v for k, v in transcoders.items() if k < 3}, PROMPT)
    other_model, other = make_toy_world(0)
    other_model.cfg.d_model = 32  # pretend the transcoders came from a wider model
    with pytest.raises(ValueError, match="d_model"):
        attribute(other_model, other, PROMPT)


# ---------------------------------------------------------------- the two backward engines and the node cap


@pytest.mark.parametrize("top_k,start_posn,batch_size", [(EVERY_LATENT, START_POSN, 64), (2, 0, 7)])
def test_transposed_model_gives_the_autograd_edges(top_k, start_posn, batch_size, toy_world_f64):
    """`attribute`'s written-out backward equals `compute_adjacency_matrix`'s autograd one (float64)."""
    model, transcoders = toy_world_f64
    result = attribute(model, transcoders, COUPLET, start_posn=start_posn, top_k=top_k, batch_size=batch_size)
    tokens = model.to_tokens(COUPLET)
    freeze = FreezeHooks(model)
    tc_hooks = TranscoderReplacementHooks(model, transcoders, freeze.cache_frozen_values(tokens))
    assert attribution_module.TransposedModel.supports(model, freeze)
    batches = attribution_module.prepare_backward_batches(result.graph, batch_size)
    A = attribution_module.compute_adjacency_matrix(
        model, tokens, result.graph, freeze, tc_hooks, batches, start_posn
    )
    assert A.abs().max() > 1
    torch.testing.assert_close(result.adjacency_matrix, A, rtol=0, atol=1e-12 * A.abs().max().item())


def test_transposed_model_handles_one_batch_of_every_layer_and_the_logits(toy_world_f64):
    """`attribute` batches per layer; a batch mixing every layer and the logits must give the same rows."""
    model, transcoders = toy_world_f64
    result = attribute(model, transcoders, PROMPT, start_posn=START_POSN, top_k=3, batch_size=16)
    graph = result.graph
    tokens = model.to_tokens(PROMPT)
    freeze = FreezeHooks(model)
    freeze.cache_frozen_values(tokens)
    positions = torch.tensor([n.ctx_idx for n in graph.nodes])
    one_batch = [(0, graph.nodes, graph.reading_vecs, positions, [n.layer for n in graph.nodes])]
    A = attribution_module.transposed_adjacency_matrix(
        model, graph, freeze, transcoders, one_batch, START_POSN
    )
    torch.testing.assert_close(A, result.adjacency_matrix, rtol=0, atol=1e-12 * A.abs().max().item())


@pytest.mark.parametrize("cap", [0, 40, 200])
def test_node_cap_keeps_the_most_influential_latents_and_stays_complete(cap, toy_world_f64):
    """With `max_feature_nodes`, dropped latents go into the error nodes: edges + biases still = readings."""
    model, transcoders = toy_world_f64
    full = attribute(model, transcoders, COUPLET, start_posn=0, top_k=EVERY_LATENT, batch_size=64)
    capped = attribute(
        model, transcoders, COUPLET, start_posn=0, top_k=EVERY_LATENT, batch_size=64, max_feature_nodes=cap
    )
    graph, A = capped.graph, capped.adjacency_matrix
    latents = [n for n in graph.nodes if n.node_type == NodeType.LATENT]
    n_full = sum(n.node_type == NodeType.LATENT for n in full.graph.nodes)
    assert len(latents) == cap < n_full
    assert len(graph) == len(full.graph) - (n_full - cap)
    assert capped.settings["max_feature_nodes"] == cap
    # Every group's range still holds exactly its nodes, in order.
    for key, (start, end) in graph.node_range_dict.items():
        assert all(n.layer == key for n in graph.nodes[start:end]), key
    assert sum(end - start for start, end in graph.node_range_dict.values()) == len(graph)
    # The kept latents are the ones with the largest estimate.
    tokens = model.to_tokens(COUPLET)
    freeze = FreezeHooks(model)
    tc_hooks = TranscoderReplacementHooks(model, transcoders, freeze.cache_frozen_values(tokens))
    estimate = attribution_module.logit_direct_influence(model, tokens, full.graph, freeze, tc_hooks, 0)
    is_latent = torch.tensor([n.node_type == NodeType.LATENT for n in full.graph.nodes])
    kept = {(n.layer, n.ctx_idx, n.feature) for n in latents}
    kept_est = [
        estimate[i].item()
        for i, n in enumerate(full.graph.nodes)
        if (n.layer, n.ctx_idx, n.feature) in kept and is_latent[i]
    ]
    dropped_est = [
        estimate[i].item()
        for i, n in enumerate(full.graph.nodes)
        if is_latent[i] and (n.layer, n.ctx_idx, n.feature) not in kept
    ]
    assert not kept_est or min(kept_est) >= max(dropped_est)
    # Completeness: each target's incoming edges plus its bias term equal what it reads.
    lin, _ = linearised(model, transcoders, COUPLET)
    clean, biases = lin.forward(*lin.clean_inputs()), lin.forward(*lin.bias_inputs())
    worst = 0.0
    for t, node in enumerate(graph.nodes):
        if node.node_type not in (NodeType.LATENT, NodeType.LOGIT):
            continue
        name, r = read_hook_name(node.layer), graph.reading_vecs[t].double()
        value, bias = float(clean[name][node.ctx_idx] @ r), float(biases[name][node.ctx_idx] @ r)
        worst = max(worst, abs(A[t].sum().item() + bias - value) / (A[t].abs().sum().item() + abs(bias)))
    assert worst < 1e-10
    # The error nodes hold the dropped latents: the same total write per (layer, position) as the full graph.
    torch.testing.assert_close(graph.writing_vecs.sum(0), full.graph.writing_vecs.sum(0))
