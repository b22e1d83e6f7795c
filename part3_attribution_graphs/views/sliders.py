"""What the dashboard's sliders need to prune the graph again in the page exactly as `prune` does.

`prune(result, node_t, edge_t)` keeps the nodes `prune_nodes` keeps at `node_t` (a prefix of the
nodes ranked by influence over the full graph), then runs `prune_edges` on the adjacency among them.
For every `node_t` up to the result's own node threshold, those nodes are among the ones kept at that
threshold (the candidates), so the page needs: each candidate's rank, the running share of influence
at each rank (as `prune_nodes` computes it, in the adjacency's precision), the logit weights, and
every edge among the candidates (the full adjacency, not only the edges that survived pruning).

Numbers are written as the shortest decimal that reads back as the same float32, so the page can
recover the exact values `prune` works with (`Math.fround`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pruning import check_threshold, compute_influence, n_to_cross

__all__ = ["SliderGraph", "slider_graph", "float32_list"]


@dataclass
class SliderGraph:
    """The candidates for re-pruning in the page (graph indices throughout)."""

    node_threshold: float  # the node slider's maximum: the result's own node threshold
    candidates: list[int]  # sorted: nodes `prune_nodes` keeps at node_threshold, logits included
    ranks: dict[int, int]  # non-logit candidate -> its place in prune_nodes' influence order
    shares: list[float]  # running share of influence at each rank, len(ranks) of them
    n_ranked: int  # how many non-logit nodes the full graph has (n_to_cross's cap)
    logit_weights: dict[int, float]  # logit node -> its weight (where influence starts)
    edges: list[tuple[int, int, float]]  # (source, target, weight): every nonzero adjacency entry


def float32_list(values: torch.Tensor) -> list[float]:
    """Each value as the shortest float that rounds to the same float32 (exact, and short in JSON)."""
    arr = values.detach().cpu().to(torch.float32).numpy().ravel()
    return [float(str(x)) for x in arr]  # numpy prints a float32 as its shortest decimal


def slider_graph(result, default_node_threshold: float = 0.8) -> SliderGraph:
    """The candidate nodes and edges for the page's sliders (see the module docstring)."""
    A = result.adjacency_matrix.detach().cpu()
    weights = result.logit_weights.detach().cpu()
    n, n_logits = A.shape[0], weights.shape[0]
    threshold = check_threshold(
        "node_threshold", result.settings.get("node_threshold", default_node_threshold)
    )
    # prune_nodes' ranking and n_to_cross's running shares, by the same tensor operations (so the same
    # float32 numbers; the browser test checks the page against `prune` itself).
    influence = compute_influence(A, weights, result.graph.n_layers)[: n - n_logits]
    order = influence.argsort(descending=True)
    ranked = influence[order]
    k = n_to_cross(ranked, threshold)
    total = ranked.sum()
    shares = float32_list((ranked.cumsum(0) / total)[:k]) if total > 0 else [0.0] * k
    top = order[:k].tolist()
    logits = list(range(n - n_logits, n))
    candidates = sorted(top + logits)
    cand = torch.tensor(candidates, dtype=torch.long)
    sub = A[cand][:, cand]
    targets, sources = torch.nonzero(sub, as_tuple=True)
    values = float32_list(sub[targets, sources])
    edges = [(candidates[s], candidates[t], w) for s, t, w in zip(sources.tolist(), targets.tolist(), values)]
    return SliderGraph(
        node_threshold=threshold,
        candidates=candidates,
        ranks={g: r for r, g in enumerate(top)},
        shares=shares,
        n_ranked=n - n_logits,
        logit_weights=dict(zip(logits, float32_list(weights))),
        edges=edges,
    )
