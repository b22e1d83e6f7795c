"""Autograder test for `predicted_effects`: direct and total effects of scaling a latent, per unit epsilon."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..interventions import predicted_effects as _ref_predicted_effects
from ..nodes import GraphNodes, NodeInfo, NodeType
from ..pruning import prune_graph
from ..result import AttributionResult
from .compare import _close, _diagnose, _items, _tensor, _worst
from .handmade import _hand_made_result
from .messages import _Fail
from .running import _public_test, _run
from .worlds import _World

__all__ = ["test_predicted_effects"]


# --------------------------------------------------------------------------------------------------
# predicted_effects
# --------------------------------------------------------------------------------------------------


def _hand_result() -> AttributionResult:
    """emb -> a (act 2) -> b (act 0.5) -> d (act 1.5) -> logit, with error nodes and a side latent c (act
    4)."""
    L, E = NodeType.LATENT, NodeType.MLP_ERROR
    nodes = [
        NodeInfo(NodeType.EMBEDDING, "E", 0, 7),
        NodeInfo(L, 0, 0, 3, activation=2.0),
        NodeInfo(E, 0, 0, 0),
        NodeInfo(L, 1, 0, 5, activation=0.5),
        NodeInfo(L, 1, 0, 9, activation=4.0),
        NodeInfo(E, 1, 0, 0),
        NodeInfo(L, 2, 0, 1, activation=1.5),
        NodeInfo(E, 2, 0, 0),
        NodeInfo(NodeType.LOGIT, "L", 0, 11),
    ]
    A = torch.zeros(9, 9, dtype=torch.float64)
    for (t, s), v in {
        (1, 0): 1.5,
        (3, 0): -0.5,
        (3, 1): 0.8,
        (3, 2): 0.3,
        (4, 1): -1.2,
        (4, 2): 2.0,
        (6, 1): 0.3,
        (6, 3): 0.9,
        (6, 4): -0.6,
        (6, 5): 0.2,
        (8, 0): 0.1,
        (8, 1): 0.4,
        (8, 2): -0.7,
        (8, 3): 1.1,
        (8, 4): 0.25,
        (8, 5): -0.2,
        (8, 6): 1.3,
        (8, 7): 0.5,
    }.items():
        A[t, s] = v
    n_logits = sum(node.node_type == NodeType.LOGIT for node in nodes)
    graph = GraphNodes(nodes=nodes, seq_len=1, n_layers=3)
    return _hand_made_result(graph, torch.full((n_logits,), 1.0 / n_logits, dtype=A.dtype), adjacency=A)


def _effects_variant(result: Any, idx: list[int], mode: str) -> Tensor:
    A, nodes = result.adjacency_matrix, result.graph.nodes
    latent = torch.tensor([n.node_type == NodeType.LATENT for n in nodes], device=A.device)
    acts = torch.tensor([float(n.activation) for n in nodes], dtype=A.dtype, device=A.device)
    safe = torch.where(latent, acts, torch.ones_like(acts))
    gain = {"no_division": latent.to(A.dtype), "times_activation": acts * latent}.get(mode, latent / safe)
    M, cols = (A * gain[:, None] if mode == "rows" else A * gain), A[:, idx]
    if mode == "per_unit_activation":
        cols = cols / safe[idx]
    if mode == "one_step":
        return (cols + M @ cols).T
    if mode == "transposed":
        M = M.T
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    total = torch.linalg.solve(eye - M, cols)
    if mode == "with_source":
        total = total + eye[:, idx]
    return total.T


_TOTAL_MISTAKES = (
    (
        "direct",
        "your total effect is the direct effect: downstream latents respond too, and their responses compose "
        "along paths. Solve x = A[:, s] + M x, i.e. x = (I - M)^-1 A[:, s]. (If you do solve: a "
        "triangular solve reads only one triangle, and (I - M.T) with upper=False leaves only the identity; "
        "M[t, u] = A[t, u] / a_u keeps targets in rows, so I - M itself is lower triangular)",
    ),
    (
        "no_division",
        "divide each latent's column of A by its activation: an edge is for the latent's whole "
        "activation a_u, so a change d of it moves a target by A[t, u] * d / a_u",
    ),
    (
        "times_activation",
        "you multiplied the latent columns by the activations; divide them: A[t, u] / a_u is the "
        "edge per unit change of u's activation",
    ),
    (
        "transposed",
        "you used M.T (or solved from the left): M[t, u] = A[t, u] / a_u has targets in rows and sources "
        "in columns like A, and the changes solve (I - M) x = A[:, s], with M itself",
    ),
    (
        "rows",
        "you divided the ROWS of A (the targets) by the activations; divide each latent's COLUMN, where it "
        "is the source: M[t, u] = A[t, u] / a_u, i.e. A * gain with gain indexed by column",
    ),
    (
        "with_source",
        "your total effect counts the source's own change (a 1 at s): the effects are on the other nodes; "
        "x = (I - M)^-1 A[:, s], with no identity column added",
    ),
    (
        "one_step",
        "you counted paths of one or two edges only: longer paths count too; solve the linear system "
        "(or sum M^k A[:, s] until it vanishes)",
    ),
    (
        "per_unit_activation",
        "effects are per unit epsilon (scaling a_s by 1 + epsilon adds epsilon * a_s * W_dec), "
        "so the source's column A[:, s] is used as it is, not divided by a_s",
    ),
)


_PRUNED = (
    "you used result.pruned_matrix (the kept nodes only, pruned edges zeroed); effects are predicted on the "
    "full graph, result.adjacency_matrix, where node_indices index result.graph.nodes"
)


def _effects_case(fn: Any, result: Any, idx: list[int], tol: float, label: str) -> None:
    A_before = result.adjacency_matrix.clone()
    out = _run(
        fn,
        result,
        list(idx),
        what=f"predicted_effects(result, {idx[:4]}{'...' if len(idx) > 4 else ''})",
        hints=[(IndexError, "out of bounds", _PRUNED), (RuntimeError, "out of bounds", _PRUNED)],
    )
    direct, total = _items(out, 2, "predicted_effects")
    n_kept = len(result.kept_indices)
    if n_kept != A_before.shape[0] and any(
        isinstance(x, Tensor) and x.dim() == 2 and x.shape[-1] == n_kept for x in (direct, total)
    ):
        raise _Fail(f"{label}: your effects have {n_kept} columns, one per kept node: {_PRUNED}.")
    ref = _ref_predicted_effects(result, idx)
    n_nodes = A_before.shape[0]
    for name, got, want in (("direct", direct, ref.direct), ("total", total, ref.total)):
        if isinstance(got, Tensor) and tuple(got.shape) == (n_nodes, len(idx)) != tuple(want.shape):
            raise _Fail(
                f"{label}: `{name}` has shape {tuple(got.shape)}; return one row per source: "
                f"shape (len(node_indices), n_nodes) = {tuple(want.shape)} (transpose it)."
            )
        got = _tensor(got, f"{label}: `{name}`", shape=tuple(want.shape))
        if _close(got, want, tol):
            continue
        if name == "direct":
            hint = _diagnose(
                got,
                [
                    (text, lambda m=mode: _effects_variant(result, idx, m))
                    for mode, text in _TOTAL_MISTAKES
                    if mode == "per_unit_activation"
                ]
                + [
                    (
                        "you took the source's ROW of A, A[s] (the edges INTO it); its direct effects are "
                        "the edges out of it, its column A[:, s]",
                        lambda: A_before[idx],
                    ),
                    (
                        "you took |A|: effects keep their sign (an inhibiting edge lowers its target), so "
                        "use A[:, s] as it is",
                        lambda: A_before.abs()[:, idx].T,
                    ),
                ],
                tol,
            )
            raise _Fail(
                f"{label}: "
                + (
                    hint
                    or f"the direct effect is the source's column of A, A[:, s], "
                    f"{_worst(got, want, 'direct')}."
                )
            )
        candidates = [
            (
                text,
                (lambda: ref.direct)
                if mode == "direct"
                else (lambda m=mode: _effects_variant(result, idx, m)),
            )
            for mode, text in _TOTAL_MISTAKES
        ]
        hint = _diagnose(got, candidates, tol)
        raise _Fail(f"{label}: " + (hint or f"the total effect differs, {_worst(got, want, 'total')}."))


@_public_test("predicted_effects")
def test_predicted_effects(fn: Any, w: _World) -> None:
    """Direct and total effects on a hand-made graph and on the toy (or your) graph, one row per source."""
    hand = _hand_result()
    _effects_case(fn, hand, [1], 1e-10, "a hand-made chain (emb -> a -> b -> d -> logit)")
    _effects_case(fn, hand, [3, 1, 4], 1e-10, "the hand-made chain, three sources")
    kept, pruned = prune_graph(w.adjacency, w.logit_weights, w.n_layers)  # a result as attribute makes it
    result = _hand_made_result(w.graph, w.logit_weights, kept=kept, pruned=pruned, adjacency=w.adjacency)
    latents = [i for i, n in enumerate(w.graph.nodes) if n.node_type == NodeType.LATENT]
    by_layer = {}
    for i in latents:
        by_layer.setdefault(w.graph.nodes[i].layer, i)
    _effects_case(fn, result, list(by_layer.values()), w.tol, w.name)
