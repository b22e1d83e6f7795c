"""Figures for the case study: the strongest path, which latents carry which group, how often the
interventions that test the hypothesis succeed, and each question's results side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

__all__ = ["plot_path", "plot_group_latents", "plot_intervention_rates", "plot_question_results"]


def plot_path(labels: Sequence[str], shares: Sequence[float], title: str = "The strongest path") -> go.Figure:
    """A path as a chain of nodes, left to right; each edge as thick as its share of its target's input."""
    n = len(labels)
    fig = go.Figure()
    for k, share in enumerate(shares):
        fig.add_trace(
            go.Scatter(
                x=[k, k + 1],
                y=[0, 0],
                mode="lines",
                line={"width": 2 + 30 * float(share), "color": "rgba(70, 110, 200, 0.6)"},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_annotation(x=k + 0.5, y=0.12, text=f"{100 * float(share):.0f}%", showarrow=False)
    fig.add_trace(
        go.Scatter(
            x=list(range(n)),
            y=[0] * n,
            mode="markers+text",
            marker={"size": 26, "color": "white", "line": {"width": 2, "color": "rgb(40, 60, 120)"}},
            text=list(labels),
            textposition="bottom center",
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=title + " (edge labels: the share of the target's input from the source)",
        xaxis={"visible": False, "range": [-0.6, n - 0.4]},
        yaxis={"visible": False, "range": [-0.5, 0.3]},
        width=max(500, 190 * n),
        height=260,
        plot_bgcolor="white",
    )
    return fig


def plot_group_latents(
    rates: Float[Tensor, "n_groups n_latents"],
    groups: Sequence[str],
    latents: Sequence[str],
    title: str = "How often each latent fires, by group",
) -> go.Figure:
    """A heatmap of firing rates: one row per group, one column per latent (a diagonal is what we hope)."""
    fig = go.Figure(
        go.Heatmap(
            z=rates.tolist(),
            x=list(latents),
            y=list(groups),
            zmin=0,
            zmax=1,
            colorscale="Blues",
            colorbar={"title": "fires on"},
            hovertemplate="%{y} prompts<br>latent %{x}<br>fires on %{z:.0%}<extra></extra>",
        )
    )
    many = len(latents) > 40  # then the names only on hover
    fig.update_layout(
        title=title,
        xaxis={"title": "latent (layer/position/index)", "tickangle": -45, "showticklabels": not many},
        yaxis={"autorange": "reversed"},
        width=min(1000, max(500, 160 + 28 * len(latents))),
        height=420,
    )
    return fig


def plot_intervention_rates(
    rates: Mapping[str, Mapping[str, tuple[float, int]]],
    title: str = "Does the hypothesis survive intervention?",
) -> go.Figure:
    """Grouped bars: for each test (e.g. "ablation: answer gone"), one bar per model (frozen, live), with
    the share of prompts where it worked and the number of prompts."""
    fig = go.Figure()
    modes = sorted({mode for by_mode in rates.values() for mode in by_mode})
    for mode in modes:
        tests = [test for test in rates if mode in rates[test]]
        fig.add_trace(
            go.Bar(
                name=mode,
                x=tests,
                y=[rates[test][mode][0] for test in tests],
                text=[f"{100 * rates[test][mode][0]:.0f}% of {rates[test][mode][1]}" for test in tests],
                textposition="outside",
            )
        )
    fig.update_layout(
        title=title,
        barmode="group",
        yaxis={"title": "share of prompts", "range": [0, 1.15], "tickformat": ".0%"},
        width=650,
        height=420,
    )
    return fig


def plot_question_results(
    questions: Sequence[str],
    results: Mapping[str, Sequence[float]],
    title: str = "Every held-out question",
) -> go.Figure:
    """A grid: one row per question, one column per measure (each a share in [0, 1], or a yes/no as 1/0),
    so that the questions where the graph and the interventions disagree stand out."""
    names = list(results)
    if any(len(results[name]) != len(questions) for name in names):
        raise ValueError("Each measure needs one value per question.")
    z = [[float(results[name][q]) for name in names] for q in range(len(questions))]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=list(questions),
            zmin=0,
            zmax=1,
            colorscale="Blues",
            colorbar={"title": "share / yes"},
            hovertemplate="%{y}<br>%{x}: %{z:.2f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        yaxis={"autorange": "reversed"},
        width=200 + 150 * len(names),
        height=max(300, 120 + 18 * len(questions)),
    )
    return fig
