"""Figures for the pruning section: a random layered DAG before and after each pruning stage, and the
cumulative influence curve."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .palette import EDGE_NEGATIVE, EDGE_POSITIVE, NODE_FILL, NODE_STROKE

__all__ = ["random_layered_dag", "demo_pruning", "plot_cumulative_influence"]

PruneFn = Callable[..., tuple[Tensor, Tensor]]


def random_layered_dag(
    n_nodes: int = 30,
    n_logit_nodes: int = 3,
    edge_probability: float = 0.15,
    n_layers: int = 4,
    seed: int = 43,
) -> tuple[Float[Tensor, "n n"], Float[Tensor, " n_logit"], list[int]]:
    """A random DAG shaped like an attribution graph.

    The `n_nodes - n_logit_nodes` ordinary nodes are spread over `n_layers` layers, the logit nodes sit
    on top; an edge can only go from a lower layer to a higher one, and exists with
    `edge_probability`. Every logit gets at least one input so no logit is trivially cut off.

    Returns:
        A: adjacency matrix with `A[target, source]` the (signed, normal) edge weight.
        logit_weights: probabilities of the logit nodes (descending, summing to < 1).
        layer_of: the layer of each node (`n_layers` for logits).
    """
    if n_logit_nodes < 1 or n_nodes <= n_logit_nodes:
        raise ValueError(
            f"need 1 <= n_logit_nodes < n_nodes, got n_nodes={n_nodes}, n_logit_nodes={n_logit_nodes}"
        )
    if not 0 <= edge_probability <= 1:
        raise ValueError(f"edge_probability must be in [0, 1], got {edge_probability}")
    gen = torch.Generator().manual_seed(seed)
    n_inner = n_nodes - n_logit_nodes
    n_layers = max(1, min(n_layers, n_inner))
    # Near-equal layer sizes, in node order, so that nodes are topologically sorted.
    layer_of = [int(i * n_layers / n_inner) for i in range(n_inner)] + [n_layers] * n_logit_nodes
    layers = torch.tensor(layer_of)
    allowed = layers[:, None] > layers[None, :]  # [target, source]
    mask = (torch.rand(n_nodes, n_nodes, generator=gen) < edge_probability) & allowed
    for t in range(n_inner, n_nodes):
        if not mask[t].any():
            mask[t, int(torch.randint(n_inner, (1,), generator=gen))] = True
    A = torch.randn(n_nodes, n_nodes, generator=gen) * mask
    probs = torch.rand(n_logit_nodes + 1, generator=gen).softmax(0)[:n_logit_nodes]
    return A, probs.sort(descending=True).values, layer_of


def _as_index_tensor(x, n: int, what: str) -> Int[Tensor, " k"]:
    """The learner's kept indices as a 1-D long tensor, with a clear error if they are not usable."""
    try:
        t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x))
    except Exception as err:
        raise ValueError(f"{what}: could not read the kept indices ({type(x).__name__}): {err}") from err
    if t.dtype == torch.bool:  # a mask is a fine answer too
        if t.numel() != n:
            raise ValueError(f"{what}: got a boolean mask of length {t.numel()}, expected {n}.")
        t = t.nonzero().flatten()
    t = t.flatten()
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"{what}: kept indices must be integers, got {t.tolist()[:8]}...")
        t = t.round()
    t = t.long()
    if t.numel() and (t.min() < 0 or t.max() >= n):
        raise ValueError(
            f"{what}: kept indices must be in [0, {n}), got min {int(t.min())}, max {int(t.max())}."
        )
    if t.unique().numel() != t.numel():
        raise ValueError(f"{what}: kept indices contain duplicates.")
    return t


def _call_pruner(
    fn: PruneFn, A: Tensor, logit_weights: Tensor, n_layers: int, threshold: float, what: str
) -> tuple[Tensor, Tensor]:
    """Run a learner's pruning function and check that it returned (kept_indices, pruned_matrix)."""
    out = fn(A.clone(), logit_weights.clone(), n_layers, threshold)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(
            f"{what} should return (kept_indices, pruned_matrix), got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
        )
    kept = _as_index_tensor(out[0], A.shape[0], what)
    pruned = torch.as_tensor(
        np.asarray(out[1].detach().cpu() if isinstance(out[1], Tensor) else out[1]), dtype=A.dtype
    )
    k = kept.numel()
    if pruned.shape != (k, k):
        raise ValueError(
            f"{what} kept {k} nodes, so pruned_matrix should be ({k}, {k}); got {tuple(pruned.shape)}."
        )
    return kept, pruned


def _dag_figure(
    A_full_shape: int,
    positions: np.ndarray,
    layer_of: list[int],
    n_logit: int,
    kept: Tensor,
    matrix: Tensor,
    title: str,
) -> go.Figure:
    """Draw the kept nodes and the edges of `matrix` (indexed like `kept`); dropped nodes are faint."""
    kept_list = kept.tolist()
    kept_set = set(kept_list)
    fig = go.Figure()
    M = matrix.detach().cpu()
    max_abs = float(M.abs().max()) if M.numel() else 0.0
    n_edges = int((M != 0).sum())
    if max_abs > 0:
        # Edges grouped by sign and by one of three widths: a handful of traces, not one per edge.
        groups: dict[tuple[bool, int], tuple[list, list]] = {}
        tgt, src = torch.nonzero(M, as_tuple=True)
        for t, s in zip(tgt.tolist(), src.tolist()):
            w = float(M[t, s])
            key = (w > 0, min(2, int(3 * abs(w) / max_abs)))
            xs, ys = groups.setdefault(key, ([], []))
            a, b = kept_list[s], kept_list[t]
            xs += [positions[a, 0], positions[b, 0], None]
            ys += [positions[a, 1], positions[b, 1], None]
        for (positive, width), (xs, ys) in sorted(groups.items()):
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    hoverinfo="skip",
                    showlegend=False,
                    line=dict(color=EDGE_POSITIVE if positive else EDGE_NEGATIVE, width=1 + 1.5 * width),
                    opacity=0.35 + 0.2 * width,
                )
            )
    n = A_full_shape
    colours = [NODE_FILL["logit"] if i >= n - n_logit else NODE_FILL["latent"] for i in range(n)]
    for is_kept in (False, True):
        idx = [i for i in range(n) if (i in kept_set) == is_kept]
        if not idx:
            continue
        fig.add_trace(
            go.Scatter(
                x=positions[idx, 0],
                y=positions[idx, 1],
                mode="markers+text",
                text=[str(i) for i in idx],
                textposition="middle center",
                textfont=dict(size=9),
                marker=dict(
                    size=18,
                    color=[colours[i] for i in idx] if is_kept else "#f3f4f6",
                    line=dict(width=1, color=NODE_STROKE["latent"] if is_kept else "#d1d5db"),
                ),
                opacity=1.0 if is_kept else 0.5,
                name="kept" if is_kept else "pruned",
                hovertext=[f"node {i}, layer {layer_of[i] if i < n - n_logit else 'logit'}" for i in idx],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title=f"{title}<br><sub>{len(kept_list)} / {n} nodes, {n_edges} edges</sub>",
        xaxis=dict(visible=False),
        yaxis=dict(
            title="layer",
            tickmode="array",
            tickvals=sorted(set(layer_of)),
            ticktext=[str(v) for v in sorted(set(layer_of))[:-1]] + ["logits"],
        ),
        width=520,
        height=480,
        plot_bgcolor="white",
        margin=dict(l=50, r=20, t=70, b=20),
        legend=dict(orientation="h", y=-0.02),
    )
    return fig


def demo_pruning(
    prune_nodes: PruneFn,
    prune_edges: PruneFn,
    n_nodes: int = 30,
    n_logit_nodes: int = 3,
    edge_probability: float = 0.15,
    seed: int = 43,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.8,
    n_layers: int = 4,
    show: bool = False,
) -> list[go.Figure]:
    """Prune a random layered DAG with your `prune_nodes` then `prune_edges`, and draw each stage.

    Both functions are called as `fn(adjacency_matrix, logit_weights, n_layers, threshold)` and must
    return `(kept_indices, pruned_matrix)`; `prune_edges` gets the node-pruned matrix, and its kept
    indices refer to that smaller matrix.

    Returns:
        Three figures: the original graph, after node pruning, after edge pruning. Pruned nodes are
        drawn faint in place. `show=True` also shows them.
    """
    A, logit_weights, layer_of = random_layered_dag(n_nodes, n_logit_nodes, edge_probability, n_layers, seed)
    n_layers_used = max(layer_of[:-n_logit_nodes]) + 1

    # Node positions: layer up the y axis, nodes of a layer spread along x.
    positions = np.zeros((n_nodes, 2))
    for layer in sorted(set(layer_of)):
        members = [i for i, lay in enumerate(layer_of) if lay == layer]
        for k, i in enumerate(members):
            positions[i] = (k - (len(members) - 1) / 2, layer)

    kept1, pruned1 = _call_pruner(prune_nodes, A, logit_weights, n_layers_used, node_threshold, "prune_nodes")
    kept2_local, pruned2 = _call_pruner(
        prune_edges, pruned1, logit_weights, n_layers_used, edge_threshold, "prune_edges"
    )
    kept2 = kept1[kept2_local]

    figs = [
        _dag_figure(n_nodes, positions, layer_of, n_logit_nodes, torch.arange(n_nodes), A, "Original graph"),
        _dag_figure(
            n_nodes,
            positions,
            layer_of,
            n_logit_nodes,
            kept1,
            pruned1,
            f"After node pruning (threshold {node_threshold})",
        ),
        _dag_figure(
            n_nodes,
            positions,
            layer_of,
            n_logit_nodes,
            kept2,
            pruned2,
            f"After edge pruning (threshold {edge_threshold})",
        ),
    ]
    if show:
        for fig in figs:
            fig.show()
    return figs


def plot_cumulative_influence(influence: Float[Tensor, " n_nodes"], threshold: float = 0.8) -> go.Figure:
    """Share of total influence covered by the k most influential nodes, against k, with the threshold
    marked."""
    infl = torch.as_tensor(influence).detach().double().cpu().flatten().clamp(min=0)
    sorted_infl = infl.sort(descending=True).values
    total = float(sorted_infl.sum())
    cum = (sorted_infl.cumsum(0) / total).numpy() if total > 0 else np.ones(len(sorted_infl))
    n_needed = int((cum < threshold).sum()) + 1 if total > 0 else len(cum)
    n_needed = min(n_needed, len(cum))
    fig = go.Figure(
        go.Scatter(
            x=np.arange(1, len(cum) + 1),
            y=cum,
            mode="lines",
            name="cumulative influence",
            line=dict(color=EDGE_POSITIVE),
        )
    )
    fig.add_hline(
        y=threshold,
        line_dash="dash",
        line_color="#dc2626",
        annotation_text=f"{threshold:.0%} threshold",
        annotation_position="bottom right",
    )
    fig.add_vline(
        x=n_needed,
        line_dash="dot",
        line_color="#6b7280",
        annotation_text=f"{n_needed} nodes",
        annotation_position="top left",
    )
    fig.update_layout(
        title="Cumulative node influence",
        xaxis_title="Number of nodes kept (by influence)",
        yaxis_title="Fraction of total influence",
        yaxis=dict(range=[0, 1.02]),
        width=700,
        height=420,
        plot_bgcolor="white",
    )
    return fig
