"""Hand-made graphs (influence and pruning) and the checks the pruning tests share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..nodes import GraphNodes
from ..result import AttributionResult
from .compare import _tensor
from .messages import _Fail, _fmt

# --------------------------------------------------------------------------------------------------
# Hand-made graphs (influence and pruning) and checks shared by the pruning tests
# --------------------------------------------------------------------------------------------------


def _graph_from_edges(n: int, edges: dict[tuple[int, int], float]) -> Tensor:
    """A[target, source] from {(source, target): weight}."""
    A = torch.zeros(n, n)
    for (src, tgt), weight in edges.items():
        A[tgt, src] = weight
    return A


def _chain() -> tuple[Tensor, Tensor, int]:
    """embedding -> latent -> logit: two edges (one negative), one layer."""
    return _graph_from_edges(3, {(0, 1): 2.0, (1, 2): -3.0}), torch.tensor([0.5]), 1


def _zero_row_graph() -> tuple[Tensor, Tensor, int]:
    """Node 2 is a latent with no inputs (an all-zero row) that still feeds later nodes."""
    edges = {(0, 3): -2.0, (2, 3): 1.0, (3, 4): 1.0, (2, 4): 3.0, (1, 4): 0.5}
    return _graph_from_edges(5, edges), torch.tensor([0.8]), 2


def _two_logit_graph() -> tuple[Tensor, Tensor, int]:
    edges = {
        (0, 2): 1.0,
        (1, 2): -2.0,
        (2, 3): 1.5,
        (1, 3): 0.5,
        (3, 4): 2.0,
        (2, 4): -1.0,
        (2, 5): 1.0,
        (0, 5): 0.25,
    }
    return _graph_from_edges(6, edges), torch.tensor([0.6, 0.3]), 2


def _tie_graph() -> tuple[Tensor, Tensor, int]:
    """Four sources into one logit with shares 1/8, 1/2, 1/8, 1/4: exact in floating point, so threshold 0.75
    is reached exactly after two of them."""
    return _graph_from_edges(5, {(0, 4): 1.0, (1, 4): 4.0, (2, 4): -1.0, (3, 4): 2.0}), torch.tensor([1.0]), 1


def _orphan_graph() -> tuple[Tensor, Tensor, int]:
    """Two embeddings, two layer-0 latents, one layer-1 latent, one logit; at threshold 0.6 edge pruning drops
    every edge of node 1 and node 3, and keeping the edges into the logit needs its weight added back."""
    edges = {
        (0, 2): 4.0,
        (1, 2): 1.0,
        (1, 3): 1.0,
        (2, 4): 3.0,
        (3, 4): 1.0,
        (4, 5): 6.0,
        (2, 5): 1.0,
        (3, 5): 1.0,
    }
    return _graph_from_edges(6, edges), torch.tensor([1.0]), 2


def _robust_threshold(scores: Tensor, target: float) -> float:
    """A threshold near `target` that sits half-way between two cumulative shares, with clear gaps around it.

    Rounding differences between two correct implementations then cannot change what is kept.
    """
    s = scores.detach().double().flatten().cpu()
    s = s[s > 0].sort(descending=True).values
    if s.numel() < 3:
        return target
    share = s.cumsum(0) / s.sum()
    cross = int((share < target).sum())  # index of the item that crosses `target`
    order = sorted(range(1, s.numel() - 1), key=lambda k: abs(k - cross))
    for k in order:  # keep items 0..k
        if (s[k] - s[k + 1]) > 1e-3 * s[k] and s[k] / s.sum() > 1e-4:
            return float((share[k - 1] + share[k]) / 2)
    return target


def _prune_check(kept: Any, pruned: Any, A: Tensor, w: Tensor, what: str) -> tuple[list[int], Tensor]:
    """Type checks shared by both pruning tests."""
    if isinstance(kept, (list, tuple)):
        raise _Fail(f"kept_indices{what} should be a 1-D integer tensor, got a {type(kept).__name__}.")
    kept = _tensor(kept, f"kept_indices{what}", device=A.device, floating=False)
    if kept.dim() != 1:
        raise _Fail(f"kept_indices{what} should be 1-D, got shape {tuple(kept.shape)}.")
    pruned = _tensor(pruned, f"pruned_matrix{what}", device=A.device)
    k = kept.numel()
    if tuple(pruned.shape) != (k, k):
        raise _Fail(
            f"pruned_matrix{what} has shape {tuple(pruned.shape)}, expected ({k}, {k}): restrict both rows "
            "and columns to the kept nodes, A[kept][:, kept]."
        )
    n, n_logits = A.shape[0], w.shape[0]
    got = kept.tolist()
    if not set(range(n - n_logits, n)) <= set(got):
        raise _Fail(
            f"logit nodes must always be kept{what}: indices {list(range(n - n_logits, n))} should be in "
            f"kept_indices, got {_fmt(got)}."
        )
    return got, pruned


def _hand_made_result(
    graph: GraphNodes,
    logit_weights: Tensor,
    *,
    kept: Tensor | None = None,
    pruned: Tensor | None = None,
    adjacency: Tensor | None = None,
) -> AttributionResult:
    """A complete `AttributionResult` for a graph built here: every field is there (a learner who reads
    the wrong one gets its value, and a message about it, never an AttributeError about a stand-in).

    Give `adjacency` (all nodes; `pruned` defaults to it restricted to `kept`) or `pruned` (the kept nodes;
    the full matrix is it placed at `kept`, zeros elsewhere). `kept` defaults to every node."""
    n = len(graph.nodes)
    kept = torch.arange(n) if kept is None else kept
    if adjacency is None:
        adjacency = torch.zeros(n, n, dtype=pruned.dtype)
        adjacency[kept[:, None], kept[None, :]] = pruned
    if pruned is None:
        pruned = adjacency[kept][:, kept]
    return AttributionResult(
        graph=graph,
        adjacency_matrix=adjacency,
        kept_indices=kept,
        pruned_matrix=pruned,
        prompt="",
        str_tokens=[""] * graph.seq_len,
        logit_weights=logit_weights,
        influence=torch.zeros(n, dtype=adjacency.dtype),
        settings={},
        world=None,  # built here, not by attribute: no world recorded
    )
