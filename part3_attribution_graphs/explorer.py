"""An ipywidgets explorer: pick a prompt, move the pruning thresholds, watch the pruned graph change.

Each prompt's adjacency matrix is computed once (the expensive part: one backward pass per batch of
targets) and cached; moving a slider only re-prunes the cached matrix, which takes milliseconds.

    explorer = attribution_explorer(model, transcoders, {"opposites": format_prompt(...)})

The widget logic lives in `AttributionExplorer.update`, which reads the widget values, re-prunes and
rebuilds the figure; tests call it directly, without a browser or a kernel.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Callable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path

import plotly.graph_objects as go
import torch
from sae_lens import HookedSAETransformer
from torch import Tensor

from .attribution import attribute
from .guard import guarded
from .nodes import NodeType
from .pruning import prune_graph
from .replacement import Transcoder
from .result import AttributionResult, PruneFn, prune
from .views.palette import NODE_FILL, NODE_NAMES, NODE_STROKE, edge_rgba, shown_token
from .worlds.gemma import format_prompt

__all__ = ["AttributionExplorer", "attribution_explorer", "graph_figure"]

# The shared palette (views/palette.py), so the explorer and the dashboard colour a graph alike.
NODE_COLOURS = {t: NODE_FILL[t.value] for t in NodeType}


def graph_counts(result: AttributionResult) -> dict[str, int]:
    """Kept nodes by type, kept edges, and the size of the full graph."""
    kept = result.kept_nodes
    counts = {t.value: sum(n.node_type == t for n in kept) for t in NodeType}
    return {
        "nodes": len(result.graph.nodes),
        "kept": len(kept),
        "edges": int((result.pruned_matrix != 0).sum()),
        **counts,
    }


def _row(layer: int | str, n_layers: int) -> int:
    """Vertical position: embeddings at the bottom, then layers, logits on top."""
    return 0 if layer == "E" else n_layers + 1 if layer == "L" else int(layer) + 1


def _label(node, str_tokens: Sequence[str]) -> str:
    tok = shown_token(str_tokens[node.ctx_idx]) if node.ctx_idx < len(str_tokens) else ""
    if node.node_type == NodeType.LATENT:
        return f"latent {node.feature} @ layer {node.layer}, “{tok}”<br>activation {node.activation:.3g}"
    if node.node_type == NodeType.MLP_ERROR:
        return f"MLP error @ layer {node.layer}, “{tok}”"
    if node.node_type == NodeType.LOGIT:
        return f"logit “{shown_token(node.str_token)}” (p = {node.token_prob:.3f})"
    return f"embedding “{shown_token(node.str_token)}” @ position {node.ctx_idx}"


@guarded(result="result")
def graph_figure(result: AttributionResult, title: str = "") -> go.Figure:
    """The pruned graph: tokens along x, layers up y; edges blue (positive) or red (negative)."""
    nodes = result.kept_nodes
    n_layers = result.graph.n_layers
    # Spread the nodes that share a (position, row) cell across that cell's width.
    cells: dict[tuple[int, int], list[int]] = {}
    for k, node in enumerate(nodes):
        cells.setdefault((node.ctx_idx, _row(node.layer, n_layers)), []).append(k)
    xy = torch.zeros(len(nodes), 2)
    for (pos, row), members in cells.items():
        for j, k in enumerate(members):
            xy[k] = torch.tensor([pos + 0.8 * ((j + 0.5) / len(members) - 0.5), row])

    A = result.pruned_matrix.detach().float().cpu()
    targets, sources = torch.nonzero(A, as_tuple=True)
    weights = A[targets, sources]
    relative = weights.double().abs() / (A.abs().max().item() or 1.0)  # as Python floats would divide

    def segments(axis: int, pick: Tensor) -> list[float | None]:
        """source, target, gap (None) for each picked edge: one trace draws them all."""
        ends = zip(xy[sources[pick], axis].tolist(), xy[targets[pick], axis].tolist())
        return [v for pair in ends for v in (*pair, None)]

    fig = go.Figure()
    for positive, name in ((True, "positive edges"), (False, "negative edges")):
        # Three widths, so strong edges stand out without one trace per edge.
        for lo, hi, width in ((0.0, 0.1, 0.6), (0.1, 0.4, 1.5), (0.4, 1.01, 3.0)):
            pick = ((weights > 0) == positive) & (relative >= lo) & (relative < hi)
            if pick.any():
                xs, ys = segments(0, pick), segments(1, pick)
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        mode="lines",
                        hoverinfo="skip",
                        name=name,
                        showlegend=width == 1.5,
                        line=dict(width=width, color=edge_rgba(positive, 0.35 + 0.5 * lo)),
                    )
                )
    for node_type, colour in NODE_COLOURS.items():
        idx = [k for k, n in enumerate(nodes) if n.node_type == node_type]
        if not idx:
            continue
        fig.add_trace(
            go.Scatter(
                x=xy[idx, 0].tolist(),
                y=xy[idx, 1].tolist(),
                mode="markers",
                name=NODE_NAMES[node_type.value],
                marker=dict(size=9, color=colour, line=dict(width=1, color=NODE_STROKE[node_type.value])),
                hovertext=[_label(nodes[k], result.str_tokens) for k in idx],
                hoverinfo="text",
            )
        )
    start = result.settings.get("start_posn", 0)
    positions = list(range(len(result.str_tokens)))
    fig.update_layout(
        title=title,
        plot_bgcolor="white",
        height=260 + 45 * n_layers,
        margin=dict(l=60, r=20, t=50, b=90),
        xaxis=dict(
            tickmode="array",
            tickvals=positions[start:],
            ticktext=[shown_token(t) for t in result.str_tokens[start:]],
            tickangle=-45,
            showgrid=False,
        ),
        yaxis=dict(
            tickmode="array",
            tickvals=list(range(n_layers + 2)),
            ticktext=["emb"] + [f"L{i}" for i in range(n_layers)] + ["logit"],
            showgrid=True,
            gridcolor="#f3f4f6",
            zeroline=False,
        ),
        legend=dict(orientation="h", y=1.02, x=0),
    )
    return fig


class AttributionExplorer:
    """Prompt picker + threshold sliders over cached attribution results.

    Args:
        model, transcoders: the world.
        prompts: `{label: prompt}` (or a list of prompts), already in the chat template.
        results: precomputed results by prompt, to seed the cache: `AttributionResult`s, or paths of results
            saved with `result.save(path)`.
        attribute_fn: computes a result for a new prompt (default: the package's `attribute`).
        prune_fn: re-prunes a cached adjacency matrix (default: `prune_graph`).
        node_threshold, edge_threshold: the sliders' starting values.
        **attribute_kwargs: passed to `attribute_fn` (e.g. `start_posn`, `top_k`, `batch_size`).
    """

    def __init__(
        self,
        model: HookedSAETransformer,
        transcoders: dict[int, Transcoder],
        prompts: Mapping[str, str] | Sequence[str],
        results: Mapping[str, AttributionResult | str | Path] | None = None,
        attribute_fn: Callable[..., AttributionResult] = attribute,
        prune_fn: PruneFn = prune_graph,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.85,
        **attribute_kwargs,
    ):
        import ipywidgets as widgets

        self.model, self.transcoders = model, transcoders
        self.attribute_fn, self.prune_fn, self.attribute_kwargs = attribute_fn, prune_fn, attribute_kwargs
        self.cache: dict[str, AttributionResult] = {
            prompt: r if isinstance(r, AttributionResult) else AttributionResult.load(r)
            for prompt, r in (results or {}).items()
        }
        self.n_attributions = 0  # how many adjacency matrices were computed here (the slow step)
        self.result: AttributionResult | None = None
        self.figure: go.Figure | None = None
        self.counts: dict[str, int] = {}
        if not isinstance(prompts, Mapping):
            prompts = {f"prompt {i + 1}": p for i, p in enumerate(prompts)}
        if not prompts:
            raise ValueError("Give the explorer at least one prompt.")

        self.prompt_picker = widgets.Dropdown(options=list(prompts.items()), description="Prompt")
        self.node_slider = widgets.FloatSlider(
            value=node_threshold,
            min=0.05,
            max=1.0,
            step=0.01,
            description="node thr.",
            continuous_update=False,
        )
        self.edge_slider = widgets.FloatSlider(
            value=edge_threshold,
            min=0.05,
            max=1.0,
            step=0.01,
            description="edge thr.",
            continuous_update=False,
        )
        # Wide boxes with their whole description: a learner types sentences here.
        box = dict(layout=widgets.Layout(width="40em", max_width="100%"), style={"description_width": "7em"})
        self.user_text = widgets.Text(
            placeholder="user turn, e.g. What is the opposite of hot?", description="Your prompt", **box
        )
        self.response_text = widgets.Text(
            placeholder="start of the reply, e.g. The opposite of hot is", description="Reply", **box
        )
        self.add_button = widgets.Button(description="Attribute", button_style="primary")
        self.status = widgets.HTML()
        self.plot = widgets.Output()
        for w in (self.prompt_picker, self.node_slider, self.edge_slider):
            w.observe(self.update, names="value")
        self.add_button.on_click(self.add_prompt)

        class ExplorerBox(widgets.VBox):
            """The explorer's box, with a plain-text form that says what to do where widgets do not run."""

            def __repr__(self) -> str:
                return (
                    "Attribution explorer (a live widget: it needs this notebook's kernel; re-run the cell)"
                )

        self.widget = ExplorerBox(
            [
                self.prompt_picker,
                widgets.HBox([self.node_slider, self.edge_slider]),
                widgets.HBox([widgets.VBox([self.user_text, self.response_text]), self.add_button]),
                self.status,
                self.plot,
            ]
        )

    def result_for(self, prompt: str) -> AttributionResult:
        """The cached result for `prompt`, computing (and caching) its adjacency matrix the first time."""
        if prompt not in self.cache:
            self.status.value = "<i>computing the adjacency matrix...</i>"
            # From a widget event, printed output (the progress bar) has no cell to go to: show it in the
            # plot.
            with self.plot if _in_widget_event() else contextlib.nullcontext():
                result = self.attribute_fn(self.model, self.transcoders, prompt, **self.attribute_kwargs)
            self.cache[prompt] = result
            self.n_attributions += 1
        return self.cache[prompt]

    def update(self, change: object = None, render: bool = True) -> dict[str, int]:
        """Re-prune the selected prompt's cached graph at the sliders' thresholds; returns the counts."""
        full = self.result_for(self.prompt_picker.value)
        self.result = prune(full, self.node_slider.value, self.edge_slider.value, self.prune_fn)
        self.counts = graph_counts(self.result)
        c = self.counts
        self.status.value = (
            f"<b>{c['kept']}</b> of {c['nodes']} nodes kept ({c['latent']} latents, {c['mlp_error']} errors, "
            f"{c['embedding']} embeddings, {c['logit']} logits), <b>{c['edges']}</b> edges"
        )
        self.figure = graph_figure(
            self.result,
            title=f"node threshold {self.node_slider.value:.2f}, edge threshold {self.edge_slider.value:.2f}",
        )
        if render:
            self._render()
        return self.counts

    def add_prompt(self, button: object = None) -> None:
        """Wrap the typed turn in the chat template, add it to the picker and select it."""
        user, reply = self.user_text.value.strip(), self.response_text.value
        if not user:
            self.status.value = "<i>type a user turn first</i>"
            return
        prompt = format_prompt(user, reply)
        label = user if len(user) <= 40 else user[:37] + "..."
        options = dict(self.prompt_picker.options)
        options[label] = prompt
        # New options reset the picker to its first entry: unhook update() meanwhile, so the graph does
        # not flick to the first prompt and back.
        self.prompt_picker.unobserve(self.update, names="value")
        try:
            self.prompt_picker.options = list(options.items())
            self.prompt_picker.value = prompt
        finally:
            self.prompt_picker.observe(self.update, names="value")
        self.update()

    def _render(self) -> None:
        from IPython import get_ipython

        if get_ipython() is None:  # headless (tests, scripts): keep the figure, draw nothing
            return
        # Set the Output widget's contents from the kernel rather than capturing a display into it. A
        # capture during a cell makes nbclient (and so papermill, nbval, nbconvert), which plays the
        # front end, send the widget's new state to the kernel on the shell channel while it waits
        # there for the cell's reply, and that reply can then go unnoticed until the cell times out.
        bundle = self.figure._repr_mimebundle_()  # what `display(figure)` shows, for plotly's renderer
        self.plot.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _in_widget_event() -> bool:
    """Whether the kernel is handling a widget's message (a click, a slider move), not running a cell."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    parent = kernel.get_parent() if kernel is not None and hasattr(kernel, "get_parent") else None
    return bool(parent) and parent.get("header", {}).get("msg_type") == "comm_msg"


@guarded(model="model", transcoders="transcoders")
def attribution_explorer(
    model: HookedSAETransformer,
    transcoders: dict[int, Transcoder],
    prompts: Mapping[str, str] | Sequence[str],
    display: bool = True,
    **kwargs,
) -> AttributionExplorer:
    """Build an `AttributionExplorer`, draw its first graph, and (in a notebook) show it."""
    explorer = AttributionExplorer(model, transcoders, prompts, **kwargs)
    explorer.update()
    if display:
        try:
            from IPython import get_ipython
            from IPython.display import display as show
        except ImportError:
            return explorer
        if get_ipython() is not None:
            show(ExplorerNote())
            show(ExplorerSnapshot(explorer))  # what a reopened notebook shows without the kernel
            show(explorer.widget)
    return explorer


def _asset(name: str) -> str:
    return (files("part3_attribution_graphs.views") / "assets" / name).read_text(encoding="utf-8")


def figure_svg(figure: go.Figure, width: int = 900) -> str:
    """A static SVG of a `graph_figure`: its edge traces as paths, its nodes as circles, tokens and rows as
    text; no script, so it shows in an untrusted notebook and after the kernel is gone."""
    layout = figure.layout
    xs = [v for t in figure.data for v in (t.x or ()) if v is not None]
    ys = [v for t in figure.data for v in (t.y or ()) if v is not None]
    ticks_x = list(layout.xaxis.tickvals or ())
    ticks_y = list(layout.yaxis.tickvals or ())
    x0, x1 = min(xs + ticks_x, default=0) - 0.6, max(xs + ticks_x, default=1) + 0.6
    y0, y1 = min(ys + ticks_y, default=0) - 0.6, max(ys + ticks_y, default=1) + 0.6
    height, left, bottom, top = int(layout.height or 400), 50, 80, 10

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - 10),
            top + (y1 - y) / (y1 - y0) * (height - top - bottom),
        )

    parts = []
    for trace in figure.data:
        if trace.mode == "lines":
            d, pen = [], "M"
            for x, y in zip(trace.x, trace.y):
                if x is None:
                    pen = "M"
                    continue
                X, Y = px(x, y)
                d.append(f"{pen}{X:.1f} {Y:.1f}")
                pen = "L"
            parts.append(
                f'<path d="{" ".join(d)}" fill="none" stroke="{trace.line.color}" '
                f'stroke-width="{trace.line.width}"/>'
            )
        else:
            for x, y, tip in zip(trace.x, trace.y, trace.hovertext or [""] * len(trace.x)):
                X, Y = px(x, y)
                parts.append(
                    f'<circle class="node" cx="{X:.1f}" cy="{Y:.1f}" r="4.5" fill="{trace.marker.color}" '
                    f'stroke="{trace.marker.line.color}"><title>{html.escape(tip.replace("<br>", ", "))}'
                    "</title></circle>"
                )
    for v, label in zip(ticks_y, layout.yaxis.ticktext or ()):
        X, Y = px(x0, v)
        parts.append(
            f'<text x="{left - 6}" y="{Y + 4:.1f}" text-anchor="end">{html.escape(str(label))}</text>'
        )
    for v, label in zip(ticks_x, layout.xaxis.ticktext or ()):
        X, Y = px(v, y0)
        parts.append(
            f'<text x="{X:.1f}" y="{Y + 14:.1f}" text-anchor="end" '
            f'transform="rotate(-45 {X:.1f} {Y + 14:.1f})">{html.escape(str(label))}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'style="max-width: 100%; height: auto; font: 11px sans-serif; fill: #374151;" '
        f'viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'
    )


class ExplorerSnapshot:
    """The explorer's graph as it was drawn, as a static picture shown in its place when the widget cannot
    run (a reopened notebook: "model not found"; an untrusted one) and hidden while the widget is live
    (`views/assets/explorer_snapshot.html`)."""

    def __init__(self, explorer: AttributionExplorer):
        self.caption = html.escape(
            f"{explorer.prompt_picker.label}, node threshold {explorer.node_slider.value:.2f}, "
            f"edge threshold {explorer.edge_slider.value:.2f}"
        )
        self.svg = figure_svg(explorer.figure) if explorer.figure is not None else ""

    def _repr_html_(self) -> str:
        page = _asset("explorer_snapshot.html")
        return page.replace("__CAPTION__", self.caption).replace("__SVG__", self.svg)

    def __repr__(self) -> str:
        return (
            f"Attribution explorer, as last drawn ({html.unescape(self.caption)}): re-run the cell to use it"
        )


class ExplorerNote:
    """One line above the explorer that stays readable without its kernel (a widget then shows nothing, or
    "model not found"): what it is and what to do (`views/assets/explorer_note.html`)."""

    def _repr_html_(self) -> str:
        return _asset("explorer_note.html")

    def __repr__(self) -> str:
        return html.unescape(re.sub(r"<[^>]+>", "", self._repr_html_())).strip()
