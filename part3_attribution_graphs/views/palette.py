"""One palette for every view of a graph (the dashboard, the explorer and the pruning figures), and how
they print a token.

Keys of `NODE_FILL`/`NODE_STROKE` are `NodeType` values; the dashboard receives the same colours as
CSS variables, so a node kind looks the same in a plotly figure and in the page.
"""

from __future__ import annotations

__all__ = [
    "NODE_FILL",
    "NODE_STROKE",
    "NODE_NAMES",
    "EDGE_POSITIVE",
    "EDGE_NEGATIVE",
    "ACTIVATION_RGB",
    "css_variables",
    "edge_rgba",
    "shown_token",
]

# Fill and outline of each node kind (NodeType values).
NODE_FILL = {"embedding": "#a7d3a6", "latent": "#f6c177", "mlp_error": "#d1d5db", "logit": "#c4b5fd"}
NODE_STROKE = {"embedding": "#2f6f2e", "latent": "#a05a00", "mlp_error": "#6b7280", "logit": "#5b21b6"}
# What a learner reads for each kind (legends, tooltips).
NODE_NAMES = {"embedding": "embedding", "latent": "latent", "mlp_error": "MLP error", "logit": "logit"}

EDGE_POSITIVE = "#2563eb"
EDGE_NEGATIVE = "#dc2626"
# Shading of a token by a latent's activation: rgba(ACTIVATION_RGB, alpha).
ACTIVATION_RGB = "34, 160, 70"


def edge_rgba(positive: bool, alpha: float) -> str:
    """An edge colour with opacity, as plotly takes it."""
    hex_ = (EDGE_POSITIVE if positive else EDGE_NEGATIVE).lstrip("#")
    r, g, b = (int(hex_[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha:.2f})"


def css_variables() -> str:
    """The palette as CSS custom properties on :root (the page's stylesheet uses only these)."""
    lines = [
        f"--{kind.replace('_', '-')}-fill: {NODE_FILL[kind]}; --{kind.replace('_', '-')}-stroke: "
        f"{NODE_STROKE[kind]};"
        for kind in NODE_FILL
    ]
    lines += [f"--edge-pos: {EDGE_POSITIVE}; --edge-neg: {EDGE_NEGATIVE}; --act-rgb: {ACTIVATION_RGB};"]
    return ":root { " + " ".join(lines) + " }"


def shown_token(token: str) -> str:
    """A token as every view prints it: newlines as ⏎, tabs as →."""
    return token.replace("\n", "\u23ce").replace("\t", "\u2192")
