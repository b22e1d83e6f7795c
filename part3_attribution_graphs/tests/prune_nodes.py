"""prune_nodes: the fewest nodes holding the threshold's share of influence."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..pruning import compute_influence, prune_nodes
from .compare import _close, _items, _worst
from .handmade import _prune_check, _robust_threshold, _tie_graph, _two_logit_graph
from .messages import _Fail, _fmt
from .running import _public_test, _run
from .worlds import _World


def _prune_nodes_variant(
    A: Tensor,
    w: Tensor,
    n_layers: int,
    threshold: float,
    *,
    shift: int = 0,
    strict: bool = False,
    ascending: bool = False,
    keep_logits: bool = True,
    by_edges: bool = False,
    by_count: bool = False,
) -> list[int]:
    n, n_logits = A.shape[0], w.shape[0]
    if by_edges:  # each node's direct outgoing edge weight, sum of |A| over its column
        influence = A.double().abs().sum(0)[: n - n_logits]
    else:
        influence = compute_influence(A.double(), w.double(), n_layers)[: n - n_logits]
    order = influence.argsort(descending=not ascending)
    share = influence[order].cumsum(0) / influence.sum()
    count = int((share <= threshold).sum() if strict else (share < threshold).sum()) + 1 + shift
    if by_count:  # a `threshold` fraction of the nodes, whatever their influence
        count = int(threshold * (n - n_logits))
    kept = set(order[: max(count, 0)].tolist())
    if keep_logits:
        kept |= set(range(n - n_logits, n))
    return sorted(kept)


def _prune_nodes_case(
    fn: Callable, A: Tensor, w: Tensor, n_layers: int, threshold: float, tol: float, label: str
) -> None:
    what = f" ({label}, threshold={threshold:.6g})"
    A_in, w_in = A.clone(), w.clone()
    out = _run(fn, A_in, w_in, n_layers, threshold, what="prune_nodes")
    kept, pruned = _items(out, 2, "prune_nodes")
    exp_kept, _ = prune_nodes(A, w, n_layers, threshold)
    exp = exp_kept.tolist()
    got, pruned = _prune_check(kept, pruned, A, w, what)
    if sorted(got) != exp:
        variants = [
            (
                "you stop one node short: keep nodes in order of decreasing influence until the cumulative "
                "share reaches the threshold, including the node that crosses it",
                dict(shift=-1),
            ),
            (
                "you keep one node too many: stop as soon as the cumulative share reaches the threshold "
                "(>=); at an exact tie, the node that lands on it is the last one kept",
                dict(strict=True),
            ),
            (
                "you keep one node too many: stop as soon as the cumulative share reaches the threshold",
                dict(shift=1),
            ),
            ("you kept the least influential nodes: sort by decreasing influence", dict(ascending=True)),
            (
                "you ranked nodes by their direct edge weights (|A| summed over each column); rank them by "
                "influence (compute_influence), which counts every path from the node to the logits",
                dict(by_edges=True),
            ),
            (
                "you kept a `threshold` fraction of the nodes by count; keep nodes, most influential first, "
                "until their cumulative share of the total INFLUENCE reaches the threshold",
                dict(by_count=True),
            ),
        ]
        for hint, kwargs in variants:
            if sorted(got) == _prune_nodes_variant(A, w, n_layers, threshold, **kwargs):
                raise _Fail(f"{hint}{what}.")
        influence = compute_influence(A, w, n_layers)
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        raise _Fail(
            f"You keep {len(got)} nodes{what}, expected {len(exp)}: missing {_fmt(missing)} (influence "
            f"{_fmt(influence[missing])}), extra {_fmt(extra)} (influence {_fmt(influence[extra])})."
        )
    if got != exp:
        raise _Fail(
            f"kept_indices{what} should be sorted in the original node order (torch.sort them), got "
            f"{_fmt(got)}."
        )
    if not _close(pruned, A[exp][:, exp], tol):
        if _close(pruned, A[exp][:, exp].T, tol):
            raise _Fail(
                f"pruned_matrix{what} is transposed: keep A's layout (row = target, column = source), "
                "A[kept][:, kept]."
            )
        raise _Fail(f"pruned_matrix{what} should be A[kept][:, kept], {_worst(pruned, A[exp][:, exp])}.")


@_public_test("prune_nodes")
def test_prune_nodes(fn: Callable, w: _World) -> None:
    """The fewest nodes holding `threshold` of the influence, plus every logit node, in order."""
    A, weights = w.adjacency.float(), w.logit_weights.float()
    influence = compute_influence(A, weights, w.n_layers)[: A.shape[0] - weights.shape[0]]
    for target in (0.8, 0.5):
        _prune_nodes_case(fn, A, weights, w.n_layers, _robust_threshold(influence, target), 1e-5, w.name)
    A, weights, n_layers = _tie_graph()
    _prune_nodes_case(fn, A, weights, n_layers, 0.75, 1e-6, "a tie at the threshold, one logit node")
    A, weights, n_layers = _two_logit_graph()
    _prune_nodes_case(fn, A, weights, n_layers, 0.6, 1e-6, "two logit nodes")
