"""Autograder tests for the interventions exercises: `test_run_with_latent_set`, `test_predicted_effects`.

Built on the shared harness (`tests.py`): same worlds, failure messages and hook bookkeeping.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .interventions import predicted_effects as _ref_predicted_effects
from .interventions import run_with_latent_set as _ref_run_with_latent_set
from .nodes import GraphNodes, NodeInfo, NodeType
from .tests import (
    _check_unchanged,
    _close,
    _diagnose,
    _Fail,
    _hook_state,
    _items,
    _new_hooks,
    _public_test,
    _remove_new_hooks,
    _run,
    _tensor,
    _World,
    _worst,
)

__all__ = ["test_run_with_latent_set", "test_predicted_effects"]


# --------------------------------------------------------------------------------------------------
# run_with_latent_set
# --------------------------------------------------------------------------------------------------


def _edited_logits(w: _World, tc: Any, hook_name: str, change: Tensor, positions: slice | int) -> Tensor:
    """The logits with `change` added at `hook_name` and these positions (to reproduce known mistakes)."""

    def add(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        x[:, positions] += change.to(x.dtype)
        return x

    with torch.no_grad(), w.model.hooks(fwd_hooks=[(hook_name, add)]):
        return w.model(w.tokens)


@torch.no_grad()
def _replaced_logits(w: _World, tc: Any, position: int, latent: int, value: float) -> Tensor:
    """The logits when the MLP output at `position` is replaced by the transcoder's output (error dropped)."""

    def replace(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        mlp_in = w.cache[tc.cfg.metadata.hook_name][0, position].to(tc.dtype)
        acts = tc.encode(mlp_in)
        acts[latent] = value
        x[:, position] = (tc.decode(acts) + (mlp_in @ tc.W_skip.T if tc.W_skip is not None else 0)).to(x.dtype)
        return x

    with torch.no_grad(), w.model.hooks(fwd_hooks=[(tc.cfg.metadata.hook_name_out, replace)]):
        return w.model(w.tokens)


@torch.no_grad()
def _latent_set_mistakes(w: _World, tc: Any, position: int, latent: int, value: float) -> list:
    clean = float(tc.encode(w.cache[tc.cfg.metadata.hook_name][0, position].to(tc.dtype))[latent])
    W = tc.W_dec[latent].detach()
    right = (value - clean) * W
    out_name, in_name = tc.cfg.metadata.hook_name_out, tc.cfg.metadata.hook_name
    layer = out_name.split(".")[1]
    seq = w.tokens.shape[1]
    return [
        ("your change cancels out: the logits are the clean ones. If you recompute the error from the edited "
         "transcoder output (mlp_out - tc(...)), it absorbs the edit; hold the error at its clean value by adding "
         "(value - a) * W_dec[latent] to the MLP output", lambda: w.logits),
        ("you add value * W_dec[latent]; to SET the activation, add the difference (value - a) * W_dec[latent], "
         "where a is the latent's clean activation at that position",
         lambda: _edited_logits(w, tc, out_name, value * W, position)),
        ("you changed the MLP output at every position; change only `position` (mlp_out[:, position])",
         lambda: _edited_logits(w, tc, out_name, right, slice(None))),
        ("you changed the wrong position (off by one?): index the sequence axis with `position` itself",
         lambda: _edited_logits(w, tc, out_name, right, position - 1)),
        ("you changed the wrong position (off by one?): index the sequence axis with `position` itself",
         lambda: _edited_logits(w, tc, out_name, right, (position + 1) % seq)),
        ("you edit the MLP's input (mlp.hook_in); the decoder writes into the MLP's output: hook "
         "transcoder.cfg.metadata.hook_name_out (hook_mlp_out)", lambda: _edited_logits(w, tc, in_name, right, position)),
        ("you edit the residual stream before the MLP (hook_resid_mid), so the MLP reads your change too; the "
         "decoder writes into the MLP's output: hook transcoder.cfg.metadata.hook_name_out (hook_mlp_out)",
         lambda: _edited_logits(w, tc, f"blocks.{layer}.hook_resid_mid", right, position)),
        ("you replaced the MLP output by the transcoder's output, which drops the error (what the transcoder "
         "misses); keep it: add only the change of the transcoder's output to the MLP output",
         lambda: _replaced_logits(w, tc, position, latent, value)),
    ]


@torch.no_grad()
def _latent_set_cases(w: _World) -> list[tuple[str, int, int, int, float]]:
    """(label, layer, position, latent, value): a steer up, a silent latent switched on, and an ablation."""
    n, seq = w.n_layers, w.tokens.shape[1]
    cases = []
    # Steering first: with value 0, adding the value and cancelling the edit look the same.
    for label, layer, pos, kind in (("steering a latent to 3x its activation", n - 1, w.start_posn + 1, "steer"),
                                    ("switching on a silent latent", 0, seq - 1, "silent"),
                                    ("ablating the most active latent", n // 2, seq - 2, "ablate")):
        tc = w.transcoders[layer]
        acts = tc.encode(w.cache[tc.cfg.metadata.hook_name][0, pos].to(tc.dtype))
        top = int(acts.argmax())
        if kind == "ablate":
            cases.append((label, layer, pos, top, 0.0))
        elif kind == "steer":
            cases.append((label, layer, pos, top, 3 * float(acts[top])))
        else:
            cases.append((label, layer, pos, int(acts.argmin()), 2 * float(acts.max())))
    return cases


@_public_test("run_with_latent_set")
def _test_run_with_latent_set(fn: Any, w: _World) -> None:
    """Logits with one latent set (ablated, steered, switched on), errors held, and no hook left behind."""
    model = w.model
    for label, layer, pos, latent, value in _latent_set_cases(w):
        tc = w.transcoders[layer]
        state = _hook_state(model)
        try:
            got = _run(fn, model, tc, w.tokens, pos, latent, value,
                       what=f"run_with_latent_set(model, transcoders[{layer}], tokens, {pos}, {latent}, {value:.3g})")
            left = _new_hooks(model, state)
        finally:
            _remove_new_hooks(model, state)
        if left:
            raise _Fail(f"run_with_latent_set left {left} hook(s) on the model, which would edit every later forward "
                        "pass: add the hook with `with model.hooks(fwd_hooks=[(name, fn)]):` (or remove it in a "
                        "`finally:` block).")
        expected = _ref_run_with_latent_set(model, tc, w.tokens, pos, latent, value)
        got = _tensor(got, "The logits you returned", shape=tuple(expected.shape), device=w.device,
                      nan_hint="Is the new activation finite?")
        if not _close(got, expected, w.tol):
            hint = _diagnose(got, _latent_set_mistakes(w, tc, pos, latent, value), w.tol)
            raise _Fail(f"{label} (layer {layer}, position {pos}, latent {latent}, value {value:.3g}): "
                        + (hint or f"the logits differ from the reference, {_worst(got, expected, 'logits')}."))


# --------------------------------------------------------------------------------------------------
# predicted_effects
# --------------------------------------------------------------------------------------------------


def _hand_result() -> SimpleNamespace:
    """emb -> a (act 2) -> b (act 0.5) -> d (act 1.5) -> logit, with error nodes and a side latent c (act 4)."""
    L, E = NodeType.LATENT, NodeType.MLP_ERROR
    nodes = [NodeInfo(NodeType.EMBEDDING, "E", 0, 7), NodeInfo(L, 0, 0, 3, activation=2.0), NodeInfo(E, 0, 0, 0),
             NodeInfo(L, 1, 0, 5, activation=0.5), NodeInfo(L, 1, 0, 9, activation=4.0), NodeInfo(E, 1, 0, 0),
             NodeInfo(L, 2, 0, 1, activation=1.5), NodeInfo(E, 2, 0, 0), NodeInfo(NodeType.LOGIT, "L", 0, 11)]
    A = torch.zeros(9, 9, dtype=torch.float64)
    for (t, s), v in {(1, 0): 1.5, (3, 0): -0.5, (3, 1): 0.8, (3, 2): 0.3, (4, 1): -1.2, (4, 2): 2.0,
                      (6, 1): 0.3, (6, 3): 0.9, (6, 4): -0.6, (6, 5): 0.2,
                      (8, 0): 0.1, (8, 1): 0.4, (8, 2): -0.7, (8, 3): 1.1, (8, 4): 0.25, (8, 5): -0.2, (8, 6): 1.3,
                      (8, 7): 0.5}.items():
        A[t, s] = v
    return SimpleNamespace(adjacency_matrix=A, graph=GraphNodes(nodes=nodes, seq_len=1, n_layers=3))


def _effects_variant(result: Any, idx: list[int], mode: str) -> Tensor:
    A, nodes = result.adjacency_matrix, result.graph.nodes
    latent = torch.tensor([n.node_type == NodeType.LATENT for n in nodes], device=A.device)
    acts = torch.tensor([float(n.activation) for n in nodes], dtype=A.dtype, device=A.device)
    safe = torch.where(latent, acts, torch.ones_like(acts))
    gain = {"no_division": latent.to(A.dtype), "times_activation": acts * latent}.get(mode, latent / safe)
    M, cols = A * gain, A[:, idx]
    if mode == "per_unit_activation":
        cols = cols / safe[idx]
    if mode == "one_step":
        return (cols + M @ cols).T
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - M, cols).T


_TOTAL_MISTAKES = (
    ("direct", "your total effect is the direct effect: downstream latents respond too, and their responses compose "
               "along paths. Solve x = A[:, s] + M x, i.e. x = (I - M)^-1 A[:, s]"),
    ("no_division", "divide each latent's column of A by its activation: an edge is for the latent's whole "
                    "activation a_u, so a change d of it moves a target by A[t, u] * d / a_u"),
    ("times_activation", "you multiplied the latent columns by the activations; divide them: A[t, u] / a_u is the "
                         "edge per unit change of u's activation"),
    ("one_step", "you counted paths of one or two edges only: longer paths count too; solve the linear system "
                 "(or sum M^k A[:, s] until it vanishes)"),
    ("per_unit_activation", "effects are per unit epsilon (scaling a_s by 1 + epsilon adds epsilon * a_s * W_dec), "
                            "so the source's column A[:, s] is used as it is, not divided by a_s"),
)


def _effects_case(fn: Any, result: Any, idx: list[int], tol: float, label: str) -> None:
    A_before = result.adjacency_matrix.clone()
    out = _run(fn, result, list(idx), what=f"predicted_effects(result, {idx[:4]}{'...' if len(idx) > 4 else ''})")
    direct, total = _items(out, 2, "predicted_effects")
    _check_unchanged(A_before, result.adjacency_matrix, "result.adjacency_matrix")
    ref = _ref_predicted_effects(result, idx)
    n_nodes = A_before.shape[0]
    for name, got, want in (("direct", direct, ref.direct), ("total", total, ref.total)):
        if isinstance(got, Tensor) and tuple(got.shape) == (n_nodes, len(idx)) != tuple(want.shape):
            raise _Fail(f"{label}: `{name}` has shape {tuple(got.shape)}; return one row per source: "
                        f"shape (len(node_indices), n_nodes) = {tuple(want.shape)} (transpose it).")
        got = _tensor(got, f"{label}: `{name}`", shape=tuple(want.shape))
        if _close(got, want, tol):
            continue
        if name == "direct":
            hint = _diagnose(got, [(text, lambda m=mode: _effects_variant(result, idx, m))
                                   for mode, text in _TOTAL_MISTAKES if mode == "per_unit_activation"], tol)
            raise _Fail(f"{label}: " + (hint or f"the direct effect is the source's column of A, A[:, s], "
                                                f"{_worst(got, want, 'direct')}."))
        candidates = [(text, (lambda: ref.direct) if mode == "direct" else
                       (lambda m=mode: _effects_variant(result, idx, m))) for mode, text in _TOTAL_MISTAKES]
        hint = _diagnose(got, candidates, tol)
        raise _Fail(f"{label}: " + (hint or f"the total effect differs, {_worst(got, want, 'total')}."))


@_public_test("predicted_effects")
def _test_predicted_effects(fn: Any, w: _World) -> None:
    """Direct and total effects on a hand-made graph and on the toy (or your) graph, one row per source."""
    hand = _hand_result()
    _effects_case(fn, hand, [1], 1e-10, "a hand-made chain (emb -> a -> b -> d -> logit)")
    _effects_case(fn, hand, [3, 1, 4], 1e-10, "the hand-made chain, three sources")
    result = SimpleNamespace(adjacency_matrix=w.adjacency, graph=w.graph)
    latents = [i for i, n in enumerate(w.graph.nodes) if n.node_type == NodeType.LATENT]
    by_layer = {}
    for i in latents:
        by_layer.setdefault(w.graph.nodes[i].layer, i)
    _effects_case(fn, result, list(by_layer.values()), w.tol, w.name)


# The public names the notebook calls.
test_run_with_latent_set = _test_run_with_latent_set
test_predicted_effects = _test_predicted_effects
