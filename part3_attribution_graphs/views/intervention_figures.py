"""Figures for the interventions section: predicted against measured effects, and a steering sweep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

__all__ = ["plot_predicted_vs_measured", "plot_steering_sweep"]


def plot_predicted_vs_measured(
    runs: Mapping[str, tuple[Float[Tensor, " n"], Float[Tensor, " n"]]],
    labels: Sequence[str],
    title: str = "Ablating the most influential latents: change of the top logit",
) -> go.Figure:
    """One scatter per run (name -> (predicted, measured)), with the y = x line the graph promises."""
    fig = go.Figure()
    values = [float(v) for p, m in runs.values() for v in (*p.tolist(), *m.tolist())]
    lo, hi = min(values + [0.0]), max(values + [0.0])
    pad = 0.05 * (hi - lo or 1.0)
    fig.add_trace(
        go.Scatter(
            x=[lo - pad, hi + pad],
            y=[lo - pad, hi + pad],
            mode="lines",
            name="y = x",
            line={"color": "grey", "dash": "dash"},
        )
    )
    for name, (predicted, measured) in runs.items():
        fig.add_trace(
            go.Scatter(
                x=predicted.tolist(),
                y=measured.tolist(),
                mode="markers",
                name=name,
                text=list(labels),
                hovertemplate="%{text}<br>predicted %{x:.3f}<br>measured %{y:.3f}",
                marker={"size": 10},
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="predicted by the graph (total effect)",
        yaxis_title="measured in the model",
        width=650,
        height=500,
    )
    return fig


def plot_steering_sweep(
    scales: Sequence[float],
    predicted: Sequence[float],
    measured: Mapping[str, Sequence[float]],
    title: str = "Steering one latent: change of the top logit",
) -> go.Figure:
    """The graph's straight line against the measured curves, over activation scales (1 = clean)."""
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=list(scales),
            y=list(predicted),
            mode="lines",
            name="predicted (graph)",
            line={"color": "grey", "dash": "dash"},
        )
    )
    for name, values in measured.items():
        fig.add_trace(
            go.Scatter(x=list(scales), y=list(values), mode="lines+markers", name=f"measured ({name})")
        )
    fig.update_layout(
        title=title,
        xaxis_title="activation, as a multiple of its clean value",
        yaxis_title="change of the top logit (demeaned)",
        width=650,
        height=450,
    )
    return fig
