"""Normalisation, influence (Neumann series) and the two pruning stages."""

from __future__ import annotations

import numbers

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "check_threshold",
    "normalize_matrix",
    "compute_influence",
    "prune_nodes",
    "prune_edges",
    "prune_graph",
    "n_to_cross",
]


def check_threshold(name: str, value: float) -> float:
    """`value` as a float if it is a fraction in (0, 1], else a ValueError; numpy scalars and one-element
    torch tensors are accepted, bools are not."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(
            f"{name} must be a fraction in (0, 1] (e.g. 0.8 keeps 80% of the influence), got {value!r}."
        )
    return float(value)


def normalize_matrix(adjacency_matrix: Float[Tensor, "n_nodes n_nodes"]) -> Float[Tensor, "n_nodes n_nodes"]:
    """|A| with each row divided by its sum (rows of zeros stay zero)."""
    abs_matrix = adjacency_matrix.abs()
    return abs_matrix / abs_matrix.sum(dim=1, keepdim=True).clamp(min=1e-8)


def compute_influence(
    adjacency_matrix: Float[Tensor, "n_nodes n_nodes"],
    logit_weights: Float[Tensor, " n_logit_nodes"],
    n_layers: int,
) -> Float[Tensor, " n_nodes"]:
    """Total (direct and indirect) influence of each node on the probability-weighted logit nodes.

    With `w` the logit weights placed on the last nodes and `B` the row-normalised |A|, this is
    `w B + w B^2 + ...`. Every path goes up at least one layer per edge, so paths have at most
    n_layers + 1 edges and the series stops after that many terms (B is nilpotent).
    """
    B = normalize_matrix(adjacency_matrix)
    v = torch.zeros(B.shape[0], dtype=B.dtype, device=B.device)
    v[B.shape[0] - logit_weights.shape[0] :] = logit_weights.to(B.dtype)
    influence = torch.zeros_like(v)
    for _ in range(n_layers + 1):
        v = v @ B
        influence = influence + v
    return influence


def n_to_cross(sorted_desc: Float[Tensor, " n"], threshold: float) -> int:
    """How many of these (descending) scores it takes for their running share to reach `threshold`."""
    total = sorted_desc.sum()
    if total <= 0:
        return sorted_desc.numel()
    share = sorted_desc.cumsum(0) / total
    # Round-off can leave the last share a hair below 1: never ask for more than there is.
    return min(int((share < threshold).sum()) + 1, sorted_desc.numel())


def prune_nodes(
    adjacency_matrix: Float[Tensor, "n_nodes n_nodes"],
    logit_weights: Float[Tensor, " n_logit_nodes"],
    n_layers: int,
    threshold: float = 0.8,
) -> tuple[Int[Tensor, " n_kept"], Float[Tensor, "n_kept n_kept"]]:
    """Keep the fewest non-logit nodes whose influence adds up to `threshold` of the total, plus all logits.

    Returns:
        kept_indices: sorted indices into the input ordering.
        pruned_matrix: the adjacency matrix restricted to those nodes.
    """
    check_threshold("node_threshold", threshold)
    n, n_logits = adjacency_matrix.shape[0], logit_weights.shape[0]
    influence = compute_influence(adjacency_matrix, logit_weights, n_layers)[: n - n_logits]
    order = influence.argsort(descending=True)
    keep = order[: n_to_cross(influence[order], threshold)]
    logits = torch.arange(n - n_logits, n, device=adjacency_matrix.device)
    kept = torch.cat([keep, logits]).sort().values
    return kept, adjacency_matrix[kept][:, kept]


def prune_edges(
    adjacency_matrix: Float[Tensor, "n_nodes n_nodes"],
    logit_weights: Float[Tensor, " n_logit_nodes"],
    n_layers: int,
    threshold: float = 0.85,
) -> tuple[Int[Tensor, " n_kept"], Float[Tensor, "n_kept n_kept"]]:
    """Keep the highest-scoring edges up to `threshold` of the total score, then drop orphaned nodes.

    An edge i -> j scores `B[j, i] * (influence[j] + logit_weight[j])`, B the row-normalised |A|:
    the share of j's input that comes from i, times how much j matters. Logit nodes are always kept.

    Returns:
        kept_indices: sorted indices into the input ordering.
        pruned_matrix: the input matrix with dropped edges zeroed, restricted to the kept nodes.
    """
    check_threshold("edge_threshold", threshold)
    n, n_logits = adjacency_matrix.shape[0], logit_weights.shape[0]
    importance = compute_influence(adjacency_matrix, logit_weights, n_layers)
    importance[n - n_logits :] += logit_weights.to(importance.dtype)
    scores = normalize_matrix(adjacency_matrix) * importance[:, None]

    flat = scores.flatten().sort(descending=True).values
    cutoff = flat[n_to_cross(flat, threshold) - 1]
    edges = adjacency_matrix * ((scores >= cutoff) & (scores > 0))

    nonzero = edges != 0
    has_edge = nonzero.any(dim=0) | nonzero.any(dim=1)
    has_edge[n - n_logits :] = True
    kept = torch.where(has_edge)[0]
    return kept, edges[kept][:, kept]


def prune_graph(
    adjacency_matrix: Float[Tensor, "n_nodes n_nodes"],
    logit_weights: Float[Tensor, " n_logit_nodes"],
    n_layers: int,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.85,
) -> tuple[Int[Tensor, " n_kept"], Float[Tensor, "n_kept n_kept"]]:
    """Node pruning, then edge pruning on what is left; indices refer to the original ordering."""
    kept_nodes, node_pruned = prune_nodes(adjacency_matrix, logit_weights, n_layers, node_threshold)
    kept_after_edges, final = prune_edges(node_pruned, logit_weights, n_layers, edge_threshold)
    return kept_nodes[kept_after_edges], final
