"""prune_edges: edges scored by normalised weight times target importance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..pruning import compute_influence, normalize_matrix, prune_edges, prune_nodes
from .compare import _close, _items, _worst
from .handmade import _orphan_graph, _prune_check, _robust_threshold, _tie_graph
from .messages import _Fail, _fmt
from .running import _public_test, _run
from .worlds import _World


def _prune_edges_variant(
    A: Tensor,
    w: Tensor,
    n_layers: int,
    threshold: float,
    *,
    add_logits: bool = True,
    by_target: bool = True,
    strict: bool = False,
    orphans: bool = False,
    zero_dropped: bool = True,
    norm: str = "rows",
    weighted: bool = True,
    above: bool = False,
) -> tuple[list[int], Tensor]:
    n, n_logits = A.shape[0], w.shape[0]
    importance = compute_influence(A.double(), w.double(), n_layers)
    if add_logits:
        importance[n - n_logits :] += w.double()
    if norm == "signed":  # rows divided by their sums of |A|, signs kept
        B = A.double() / A.double().abs().sum(1, keepdim=True).clamp(min=1e-8)
    elif norm == "none":
        B = A.double().abs()
    else:
        B = normalize_matrix(A.double())
    if not weighted:
        importance = torch.ones_like(importance)
    scores = B * (importance[:, None] if by_target else importance[None, :])
    flat = scores.flatten().sort(descending=True).values
    share = flat.cumsum(0) / flat.sum()
    count = min(int((share <= threshold).sum() if strict else (share < threshold).sum()) + 1, flat.numel())
    cutoff = flat[count - 1]
    mask = ((scores > cutoff) if above else (scores >= cutoff)) & (scores > 0)
    edges = A * mask if zero_dropped else A
    nonzero = (A * mask) != 0
    has = nonzero.any(0) | nonzero.any(1)
    has[n - n_logits :] = True
    kept = list(range(n)) if orphans else torch.where(has)[0].tolist()
    return kept, edges[kept][:, kept]


def _prune_edges_case(
    fn: Callable, A: Tensor, w: Tensor, n_layers: int, threshold: float, tol: float, label: str
) -> None:
    what = f" ({label}, threshold={threshold:.6g})"
    A_in, w_in = A.clone(), w.clone()
    out = _run(fn, A_in, w_in, n_layers, threshold, what="prune_edges")
    kept, pruned = _items(out, 2, "prune_edges")
    exp_kept, exp_pruned = prune_edges(A, w, n_layers, threshold)
    exp = exp_kept.tolist()
    got, pruned = _prune_check(kept, pruned, A, w, what)
    variants = [
        (
            "add the logit weights to the logit nodes' influence before scoring edges: otherwise every edge "
            "into a logit node scores 0",
            dict(add_logits=False),
        ),
        (
            "score an edge i -> j with its TARGET's importance: score[j, i] = B[j, i] * importance[j]",
            dict(by_target=False),
        ),
        (
            "you keep one edge too many at an exact tie: stop as soon as the cumulative score reaches the "
            "threshold (>=)",
            dict(strict=True),
        ),
        (
            "keep every edge whose score is at least the cutoff, scores >= cutoff: with > you drop the edge "
            "whose score crosses the threshold (and every edge tied with it)",
            dict(above=True),
        ),
        (
            "remove the nodes left without any edge (orphans) after dropping edges; only logit nodes stay "
            "regardless",
            dict(orphans=True),
        ),
        (
            "score edges by the normalised weights |A| / row sums (normalize_matrix), not the signed ones: a "
            "negative edge matters as much as a positive one",
            dict(norm="signed"),
        ),
        (
            "score edges by the row-normalised |A| (normalize_matrix), not by |A| itself: each target's "
            "incoming weights share its importance",
            dict(norm="none"),
        ),
        (
            "weight each edge's normalised weight by its target's importance (influence, plus the logit "
            "weights on the logit nodes): score[j, i] = B[j, i] * importance[j]",
            dict(weighted=False),
        ),
    ]
    if sorted(got) != exp:
        for hint, kwargs in variants:
            if sorted(got) == _prune_edges_variant(A, w, n_layers, threshold, **kwargs)[0]:
                raise _Fail(f"{hint}{what}.")
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        raise _Fail(
            f"You keep {len(got)} nodes{what}, expected {len(exp)}: missing {_fmt(missing)}, extra "
            f"{_fmt(extra)}."
        )
    if got != exp:
        raise _Fail(f"kept_indices{what} should be sorted in the original node order, got {_fmt(got)}.")
    if not _close(pruned, exp_pruned, tol):
        if _close(pruned, exp_pruned.T, tol):
            raise _Fail(
                f"pruned_matrix{what} is transposed: keep A's layout (row = target, column = source), "
                "edges[kept][:, kept]."
            )
        if _close(pruned, A[exp][:, exp], tol):
            raise _Fail(
                f"Zero out the edges you drop{what}: pruned_matrix should keep only the surviving edges, "
                "restricted to the kept nodes."
            )
        for hint, kwargs in variants[:4]:
            if _close(pruned, _prune_edges_variant(A, w, n_layers, threshold, **kwargs)[1].to(pruned), tol):
                raise _Fail(f"{hint}{what}.")
        raise _Fail(
            f"pruned_matrix{what} differs: it should be A with the dropped edges zeroed, restricted to the "
            f"kept nodes, {_worst(pruned, exp_pruned, 'pruned')}."
        )


@_public_test("prune_edges")
def test_prune_edges(fn: Callable, w: _World) -> None:
    """Edges scored by normalised weight times target importance, kept up to `threshold`; orphans dropped."""
    A, weights = w.adjacency.float(), w.logit_weights.float()
    node_kept, node_pruned = prune_nodes(A, weights, w.n_layers, 0.8)
    for label, M in ((w.name, A), (f"{w.name} after node pruning", node_pruned)):
        importance = compute_influence(M, weights, w.n_layers)
        importance[M.shape[0] - weights.shape[0] :] += weights
        scores = normalize_matrix(M) * importance[:, None]
        _prune_edges_case(fn, M, weights, w.n_layers, _robust_threshold(scores, 0.85), 1e-5, label)
    A, weights, n_layers = _orphan_graph()
    _prune_edges_case(
        fn, A, weights, n_layers, 0.6, 1e-6, "a graph whose pruning leaves orphans, one logit node"
    )
    A, weights, n_layers = _tie_graph()
    _prune_edges_case(fn, A, weights, n_layers, 0.75, 1e-6, "a tie at the threshold")
    del node_kept
