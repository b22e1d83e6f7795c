"""What the dashboard's sliders need to prune the graph again in the page exactly as `prune` does.

`prune(result, node_t, edge_t)` keeps the nodes `prune_nodes` keeps at `node_t` (a prefix of the
nodes ranked by influence over the full graph), then runs `prune_edges` on the adjacency among them.
For every `node_t` up to the slider's maximum (1.0, every node with influence, unless the page-size
budget stops it lower), those nodes are among the ones kept at that maximum (the candidates), so the
page needs: each candidate's rank, the running share of influence at each rank (as `prune_nodes`
computes it, in the adjacency's precision), the logit weights, and every edge among the candidates.

The edge cut is where float32 round-off decides: at 1.0 it falls among scores of ~1e-8 whose order and
running share depend on torch's summation order, which the page cannot repeat. So the page gets the cut
itself: for every node-slider step (each distinct set of kept nodes) and every edge-slider step, the
float32 score `prune_edges` cuts at, and the few edges where the page's float64 scores would fall on the
other side of it (or within round-off of it) with their float32 verdict.

Numbers are written as the shortest decimal that reads back as the same float32, so the page can
recover the exact values `prune` works with (`Math.fround`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pruning import check_threshold, compute_influence, n_to_cross, normalize_matrix

__all__ = ["SliderGraph", "slider_graph", "float32_list", "STEPS", "EDGE_BUDGET"]

# The sliders' steps, in hundredths: 0.05 to 1.00 (the page's range inputs use the same).
STEPS = range(5, 101)
# The most candidate edges a page carries (about 26 bytes each in the page: ~10 MB at the cap). Above it
# the node slider stops at the largest step whose candidates fit (and never below the result's own
# node threshold).
EDGE_BUDGET = 400_000
# Edges whose float64 score lies this close (relative) to a cut get their float32 verdict shipped: the
# page's float64 sums differ from numpy's by ~1e-15 relative.
NEAR = 1e-9


@dataclass
class SliderGraph:
    """The candidates for re-pruning in the page (graph indices throughout)."""

    node_threshold: float  # the node slider's maximum
    own_threshold: float  # the node threshold the result was pruned with (where the slider starts)
    candidates: list[int]  # sorted: nodes `prune_nodes` keeps at node_threshold, logits included
    ranks: dict[int, int]  # non-logit candidate -> its place in prune_nodes' influence order
    shares: list[float]  # running share of influence at each rank, len(ranks) of them
    n_ranked: int  # how many non-logit nodes the full graph has (n_to_cross's cap)
    logit_weights: dict[int, float]  # logit node -> its weight (where influence starts)
    edges: list[tuple[int, int, float]]  # (source, target, weight): every nonzero adjacency entry
    # Per number of ranked nodes kept (one per distinct node-slider step): {"cut": the float32 cutoff
    # per edge step (STEPS order), "keep"/"drop": {step: [positions in `edges`]}} (see the docstring).
    cuts: dict[int, dict] = field(default_factory=dict)


def float32_list(values: torch.Tensor) -> list[float]:
    """Each value as the shortest float that rounds to the same float32 (exact, and short in JSON)."""
    arr = values.detach().cpu().to(torch.float32).numpy().ravel()
    return [float(str(x)) for x in arr]  # numpy prints a float32 as its shortest decimal


def _node_max(
    ranked: torch.Tensor, order: torch.Tensor, A: torch.Tensor, n_logits: int, floor: float
) -> float:
    """The largest slider step (not below `floor`) whose candidate nodes hold at most EDGE_BUDGET edges."""
    n = A.shape[0]
    nonzero = A != 0
    logits = torch.arange(n - n_logits, n)
    best = floor
    for step in reversed(STEPS):
        t = step / 100
        if t <= floor:
            break
        cand = torch.cat([order[: n_to_cross(ranked, t)], logits])
        if int(nonzero[cand][:, cand].sum()) <= EDGE_BUDGET:
            best = t
            break
    return best


def _edge_cuts(
    A: torch.Tensor, weights: torch.Tensor, n_layers: int, kept: torch.Tensor, keys: torch.Tensor
) -> dict:
    """`prune_edges`' cutoff on the adjacency among `kept` at every edge step, and the edges whose float64
    score (the page's) would disagree with their float32 verdict or lie within NEAR of the cut."""
    sub = A[kept][:, kept]
    n, n_logits = sub.shape[0], weights.shape[0]
    # prune_edges' own tensor operations, so the same float32 numbers.
    importance = compute_influence(sub, weights, n_layers)
    importance[n - n_logits :] += weights.to(importance.dtype)
    scores = normalize_matrix(sub) * importance[:, None]
    flat = scores.flatten().sort(descending=True).values
    # The page's computation, in float64 from the float32 weights.
    sub64 = sub.to(torch.float64)
    w64 = weights.to(torch.float32).to(torch.float64)
    imp64 = compute_influence(sub64, w64, n_layers)
    imp64[n - n_logits :] += w64
    abs64 = sub64.abs()
    b64 = abs64 / abs64.sum(dim=1, keepdim=True).clamp(min=float(torch.tensor(1e-8, dtype=torch.float32)))
    scores64 = b64 * imp64[:, None]
    targets, sources = torch.nonzero(sub, as_tuple=True)
    s32, s64 = scores[targets, sources], scores64[targets, sources]
    where = torch.searchsorted(keys, kept[sources] * A.shape[0] + kept[targets])  # positions in `edges`
    # n_to_cross(flat, t) at every step, its running share computed once (the same operations; the share
    # never falls, so the count of shares below t is a search, with t in float32 as torch compares it).
    steps = torch.tensor([step / 100 for step in STEPS], dtype=torch.float32)
    total = flat.sum()
    if total > 0:
        below = torch.searchsorted(flat.cumsum(0) / total, steps)
        crossed = (below + 1).clamp(max=flat.numel())
    else:
        crossed = torch.full_like(steps, flat.numel(), dtype=torch.long)
    cuts = flat[crossed - 1]  # (steps,)
    # Only where a cut lies between an edge's two scores (or within NEAR of them) can the verdicts differ:
    # find those (edge, step) pairs by searching the cuts (they fall as the step rises), then check them.
    c64 = cuts.to(torch.float64)
    s32d = s32.to(torch.float64)
    lo, hi = torch.minimum(s32d, s64), torch.maximum(s32d, s64)
    lo, hi = lo - NEAR * lo.abs(), hi + NEAR * hi.abs()
    ascending = c64.flip(0)
    first = torch.searchsorted(ascending, lo)
    last = torch.searchsorted(ascending, hi, right=True)
    counts = last - first
    edge_k = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    offsets = torch.arange(edge_k.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    step_k = c64.numel() - 1 - (first[edge_k] + offsets)  # back to the steps' order
    c = c64[step_k]
    want = (s32[edge_k] >= cuts[step_k]) & (s32[edge_k] > 0)  # prune_edges' verdict
    page = (s64[edge_k] >= c) & (s64[edge_k] > 0)  # the page's, from its float64 score
    near = (s64[edge_k] - c).abs() <= NEAR * c.abs()
    keep, drop = {}, {}
    for which, mask in ((keep, want & (near | ~page)), (drop, ~want & (near | page))):
        for e, q in zip(where[edge_k[mask]].tolist(), step_k[mask].tolist()):
            which.setdefault(str(STEPS[q]), []).append(e)
    for which in (keep, drop):
        for k in which:
            which[k].sort()
    return {"cut": float32_list(cuts), "keep": keep, "drop": drop}


def slider_graph(result, default_node_threshold: float = 0.8) -> SliderGraph:
    """The candidate nodes and edges for the page's sliders, and the edge cuts (see the module docstring)."""
    A = result.adjacency_matrix.detach().cpu()
    weights = result.logit_weights.detach().cpu()
    n, n_logits = A.shape[0], weights.shape[0]
    own = check_threshold("node_threshold", result.settings.get("node_threshold", default_node_threshold))
    # prune_nodes' ranking and n_to_cross's running shares, by the same tensor operations (so the same
    # float32 numbers; the browser test checks the page against `prune` itself).
    influence = compute_influence(A, weights, result.graph.n_layers)[: n - n_logits]
    order = influence.argsort(descending=True)
    ranked = influence[order]
    threshold = _node_max(ranked, order, A, n_logits, own)
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
    # Edges in (source, target) order, so an edge's position is found by its key `source * n + target`.
    keys = torch.tensor([s * n + t for s, t, _ in edges], dtype=torch.long)
    by_key = keys.argsort()
    edges, keys = [edges[q] for q in by_key.tolist()], keys[by_key]
    cuts: dict[int, dict] = {}
    logit_idx = torch.arange(n - n_logits, n)
    for step in STEPS:
        if step / 100 > threshold:
            break
        kk = n_to_cross(ranked, step / 100)
        if kk not in cuts:
            kept = torch.cat([order[:kk], logit_idx]).sort().values  # as prune_nodes orders them
            cuts[kk] = _edge_cuts(A, weights, result.graph.n_layers, kept, keys)
    return SliderGraph(
        node_threshold=threshold,
        own_threshold=own,
        candidates=candidates,
        ranks={g: r for r, g in enumerate(top)},
        shares=shares,
        n_ranked=n - n_logits,
        logit_weights=dict(zip(logits, float32_list(weights))),
        edges=edges,
        cuts=cuts,
    )
