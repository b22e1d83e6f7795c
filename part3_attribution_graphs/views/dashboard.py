"""A self-contained HTML dashboard for a pruned attribution graph (no CDN, no server, no network).

`create_attribution_dashboard` writes one `index.html` and `neuronpedia.json` beside it, and shows the
page inline in Jupyter/Colab. The page's HTML, CSS and JavaScript live in `views/assets/`; they and the
graph's data are inlined when the page is written, so the file opens offline from disk.

The page draws prompt tokens along x and layers up y: embeddings at the bottom, then one row per
layer (latents and the MLP error node at each position), logits on top. Node size follows influence
on the logits (logits: their probability). Edges are drawn on demand (the hovered, clicked and pinned
nodes' edges, or all of them with "show all edges") on a canvas under the nodes, blue when positive
and red when negative. A learner can zoom and pan, pin nodes (ctrl/shift-click), look at the pinned
subgraph, group pinned nodes into supernodes (or take a suggested group), label latents, hide nodes,
and re-prune with two sliders that compute exactly what `prune(result, node_t, edge_t)` keeps (from
the candidates `views/sliders.py` embeds). Its state is kept in the browser's storage per graph
(file:// included); "save" downloads the page again with the state inside, "export JSON" the
Neuronpedia graph with it, and "load state" reads such a JSON back.

For tests and scripts: every drawn node is an element of class `node` with `data-node-id`
(`NodeInfo.node_id`, as in every export) and `data-type`; the panel is `#panel` (class `empty`
until a node is chosen, then `data-node-id` names it); `window.dashboard` exposes the page state.
"""

from __future__ import annotations

import html
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checks import as_count
from ..guard import as_index, as_real, guarded
from ..result import AttributionResult
from .examples import activation_histogram, feature_examples, feature_row
from .labels import derived_labels
from .neuronpedia import (
    build_graph_json,
    cumulative_influence,
    default_scan,
    export_node_id,
    node_kind,
    result_influence,
    result_settings,
    result_tokens,
    saved_state,
    view_graph,
)
from .palette import NODE_NAMES, css_variables, shown_token
from .sliders import slider_graph
from .suggestions import similar_latents

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

__all__ = [
    "latent_logit_tables",
    "dashboard_data",
    "render_dashboard_html",
    "create_attribution_dashboard",
    "read_saved_state",
]

# The page's short names for the node kinds.
_TYPE_NAMES = {"embedding": "embedding", "latent": "latent", "mlp_error": "error", "logit": "logit"}
ASSETS = files(__package__) / "assets"


def _sig(x: float, digits: int = 4) -> float:
    """Round to `digits` significant figures (keeps the page small)."""
    return float(f"{float(x):.{digits}g}")


def _tables_args(a: dict) -> None:
    latents, transcoders = a["latents"], a["transcoders"]
    if isinstance(latents, (str, bytes, Mapping)) or not isinstance(latents, Iterable):
        raise TypeError(f"latents must be a list of (layer, latent) pairs, got {type(latents).__name__}.")
    checked = []
    for i, item in enumerate(latents):
        if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2:
            raise ValueError(f"latents[{i}] = {item!r}: each entry is a (layer, latent) pair.")
        layer = as_count(f"latents[{i}] layer", item[0])
        if layer not in transcoders:
            raise ValueError(
                f"latents[{i}]: there is no transcoder at layer {layer}; the transcoders cover layers "
                f"{sorted(transcoders)}."
            )
        d_sae = transcoders[layer].cfg.d_sae
        what = f"layer {layer}'s transcoder has {d_sae} latents"
        checked.append((layer, as_index(f"latents[{i}] latent", item[1], d_sae, what)))
    a["latents"] = checked  # read once: a generator is not consumed twice


@guarded(model="model", transcoders="transcoders", counts={"k": 1, "bins": 1}, check=_tables_args)
@torch.no_grad()
def latent_logit_tables(
    model: HookedSAETransformer,
    transcoders: dict,
    latents: list[tuple[int, int]],
    k: int = 10,
    bins: int = 40,
) -> dict[tuple[int, int], dict]:
    """Direct logit effects `W_dec[f] @ W_U` of each `(layer, latent)`: top and bottom k tokens and a
    histogram.

    Returns:
        `{(layer, f): {"top": [(token, value)], "bottom": [(token, value)], "hist": (counts, lo, hi)}}`,
        top largest first, bottom most negative first.
    """
    # float32 even for a bf16 model: close logit effects should rank as they really do.
    W_U = model.W_U.detach()
    W_U = W_U if W_U.dtype in (torch.float32, torch.float64) else W_U.float()
    by_layer: dict[int, list[int]] = {}
    for layer, f in latents:
        by_layer.setdefault(int(layer), []).append(int(f))
    raw: dict[tuple[int, int], tuple[list[int], list[float], list[int], list[float], tuple]] = {}
    for layer, feats in by_layer.items():
        W_dec = transcoders[layer].W_dec.detach()
        for lo in range(0, len(feats), 64):  # chunks: Gemma's vocabulary is 262k wide
            chunk = feats[lo : lo + 64]
            effects = (W_dec[chunk].to(W_U.device, W_U.dtype) @ W_U).float()  # (chunk, d_vocab)
            kk = min(k, effects.shape[1])
            top_v, top_i = effects.topk(kk, dim=1)
            bot_v, bot_i = effects.topk(kk, dim=1, largest=False)
            for row, f in enumerate(chunk):
                e = effects[row]
                e_lo, e_hi = float(e.min()), float(e.max())
                counts = torch.histc(e, bins=bins, min=e_lo, max=e_hi if e_hi > e_lo else e_lo + 1e-6)
                raw[(layer, f)] = (
                    top_i[row].tolist(),
                    top_v[row].tolist(),
                    bot_i[row].tolist(),
                    bot_v[row].tolist(),
                    (counts.long().tolist(), e_lo, e_hi),
                )
    ids = sorted({i for t in raw.values() for i in t[0] + t[2]})
    strings = dict(zip(ids, model.tokenizer.batch_decode([[i] for i in ids]))) if ids else {}
    return {
        key: {
            "top": [(strings[i], v) for i, v in zip(ti, tv)],
            "bottom": [(strings[i], v) for i, v in zip(bi, bv)],
            "hist": hist,
        }
        for key, (ti, tv, bi, bv, hist) in raw.items()
    }


# Latents the sliders can bring back get a panel too (logit table, examples, derived label), the most
# influential first, up to this many beyond the drawn ones (each costs ~1-2 kB of page).
EXTRA_PANELS = 300


def panel_latents(result: AttributionResult, view) -> list[tuple[int, int]]:
    """`(layer, feature)` of the latents that get a panel: every drawn one, and the EXTRA_PANELS most
    influential of the others."""
    nodes = result.graph.nodes
    shown = set(view.indices)
    drawn = {(int(nodes[i].layer), int(nodes[i].feature)) for i in shown if node_kind(nodes[i]) == "latent"}
    others: list[tuple[int, int]] = []
    for i in result_influence(result).argsort(descending=True).tolist():
        if len(others) >= EXTRA_PANELS:
            break
        key = (int(nodes[i].layer), int(nodes[i].feature)) if node_kind(nodes[i]) == "latent" else None
        if i not in shown and key is not None and key not in drawn and key not in others:
            others.append(key)
    return sorted(drawn | set(others))


def _example_info(example_data: dict, feature: int, tokenizer, n_examples: int) -> dict | None:
    """Activation histogram, frequency and top sequences of one latent, in the page's format."""
    row = feature_row(example_data, feature)
    if row is None:
        return None
    info: dict = {"freq": _sig(example_data["feature_frequencies"][row])}
    hist = activation_histogram(example_data, feature)
    if hist is not None:
        counts, edges = hist
        info["hist"] = [counts.tolist(), _sig(edges[0]), _sig(edges[-1])]
    info["examples"] = [
        {
            "tokens": ex["tokens"],
            "acts": [_sig(a, 3) for a in ex["acts"]],
            "peak": ex["peak"],
            "max": _sig(ex["max_act"]),
        }
        for ex in feature_examples(example_data, feature, tokenizer, n_examples)
    ]
    return info


def derived_label(panel: dict) -> str:
    """A latent's label from its data: the tokens it peaks on (example data), else its top logit effects."""
    ex = panel.get("ex") or {}
    peaks = Counter(
        shown_token(e["tokens"][e["peak"]]).strip() or shown_token(e["tokens"][e["peak"]])
        for e in ex.get("examples", [])
        if e["tokens"]
    )
    if peaks:
        return "fires on " + ", ".join(repr(t) for t, _ in peaks.most_common(3))
    if panel.get("top"):
        return "\u2191 " + ", ".join(repr(shown_token(t)) for t, _ in panel["top"][:3])
    return ""


def _dashboard_args(a: dict) -> None:
    if a["transcoders"] is not None and a["model"] is None:
        raise ValueError(
            "transcoders were given without the model: the latents' logit tables need its W_U. Pass the "
            "model too, or leave transcoders out (the page then shows no logit tables)."
        )
    interventions = a["interventions"]
    if interventions is None:
        return
    if not isinstance(interventions, Mapping):
        raise TypeError(
            "interventions must be a dict {node index: (predicted, measured)}, got "
            f"{type(interventions).__name__}."
        )
    checked = {}
    for idx, change in interventions.items():
        where = f"interventions[{idx!r}]"
        index = as_count(f"{where}'s node index", idx)
        if isinstance(change, (str, bytes)) or not hasattr(change, "__len__") or len(change) != 2:
            raise ValueError(f"{where} = {change!r}: each value is a (predicted, measured) pair of numbers.")
        checked[index] = (as_real(f"{where} predicted", change[0]), as_real(f"{where} measured", change[1]))
    a["interventions"] = checked


_DASHBOARD = dict(
    result="result",
    model="model",
    transcoders="transcoders",
    optional=("model", "transcoders"),
    check=_dashboard_args,
)


@guarded(**_DASHBOARD, counts={"n_examples": 0})
def dashboard_data(
    result: AttributionResult,
    model: HookedSAETransformer | None,
    transcoders: dict | None = None,
    example_data_by_layer: dict[int, dict] | None = None,
    scores: dict | None = None,
    n_examples: int = 5,
    logit_tables: dict | None = None,
    interventions: Mapping[int, tuple[float, float]] | None = None,
    state: dict | None = None,
    graph_json: dict | None = None,
) -> dict:
    """Everything the page draws, as one JSON-ready dict (nodes, edges, per-latent panels, header, state).

    `logit_tables` (from `latent_logit_tables`) is used instead of recomputing them from `transcoders`;
    `graph_json` (from `build_graph_json`) is the Neuronpedia export the page's "save" writes with its
    state; `state` (from `read_saved_state`) is the state the page opens with.
    """
    graph, n_layers = result.graph, result.graph.n_layers
    view = view_graph(result)
    infl = result_influence(result)
    cum = cumulative_influence(infl)
    position = {g: k for k, g in enumerate(view.indices)}
    ablate = {}
    for idx, change in (interventions or {}).items():
        if int(idx) not in position:
            raise ValueError(
                f"interventions has node index {idx}, which the dashboard does not show; use indices "
                "into result.graph.nodes of kept nodes (result.kept_indices)."
            )
        predicted, measured = change
        ablate[position[int(idx)]] = [_sig(predicted), _sig(measured)]

    sliders = slider_graph(result)
    extra = [i for i in sliders.candidates if i not in position]  # nodes the sliders can bring back
    everyone = list(view.indices) + extra
    where = {g: k for k, g in enumerate(everyone)}

    nodes = []
    for k, idx in enumerate(everyone):
        node = graph.nodes[idx]
        kind = _TYPE_NAMES[node_kind(node)]
        row = 0 if kind == "embedding" else n_layers + 1 if kind == "logit" else int(node.layer) + 1
        entry = {
            "id": export_node_id(node),
            "type": kind,
            "row": row,
            "ctx": int(node.ctx_idx),
            "feature": int(node.feature),
            "influence": _sig(infl[idx]),
            "cum": _sig(cum[idx]),
        }
        if kind == "latent":
            entry.update(
                layer=int(node.layer), act=_sig(node.activation), key=f"{int(node.layer)}_{node.feature}"
            )
        elif kind == "error":
            entry["layer"] = int(node.layer)
        elif kind == "logit":
            entry.update(prob=_sig(node.token_prob), token=node.str_token)
        else:
            entry["token"] = node.str_token
        if node.label:
            entry["label"] = node.label
        if k in ablate:
            entry["ablate"] = ablate[k]
        entry["idx"] = idx
        if idx in sliders.ranks:
            entry["rank"] = sliders.ranks[idx]
        if idx in sliders.logit_weights:
            entry["lw"] = sliders.logit_weights[idx]
        nodes.append(entry)

    # Edges: the view's (drawn at first), then the candidates' others; a 4th entry q > 0 marks an edge the
    # sliders prune, with its exact float32 weight: it is sliders.edges[q - 1] (the edge cuts name them so).
    exact = {(where[s], where[t]): (w, q + 1) for q, (s, t, w) in enumerate(sliders.edges)}
    edges = [[s, t, *exact[s, t]] if (s, t) in exact else [s, t, _sig(w), 0] for s, t, w in view.edges]
    in_view = {(s, t) for s, t, _ in view.edges}
    extra_edges = [[s, t, w, q] for (s, t), (w, q) in exact.items() if (s, t) not in in_view]

    latents = panel_latents(result, view)
    panels: dict[str, dict] = {f"{layer}_{f}": {} for layer, f in latents}
    if logit_tables is None and transcoders is not None:
        logit_tables = latent_logit_tables(model, transcoders, latents)
    if logit_tables is not None:
        for (layer, f), t in logit_tables.items():
            if f"{layer}_{f}" not in panels:
                continue
            counts, lo, hi = t["hist"]
            panels[f"{layer}_{f}"].update(
                top=[[tok, _sig(v)] for tok, v in t["top"]],
                bottom=[[tok, _sig(v)] for tok, v in t["bottom"]],
                logit_hist=[counts, _sig(lo), _sig(hi)],
            )
    words: dict[str, str] = {}  # the word most enriched in each latent's top sequences (views/labels.py)
    if example_data_by_layer:
        for layer, f in latents:
            data = example_data_by_layer.get(layer)
            if data is not None:
                ex = _example_info(data, f, getattr(model, "tokenizer", None), n_examples)
                if ex is not None:
                    panels[f"{layer}_{f}"]["ex"] = ex
        words = derived_labels(example_data_by_layer, latents, getattr(model, "tokenizer", None))
    for key, panel in panels.items():
        panel["derived"] = words.get(key) or derived_label(panel)
    similar = [
        [f"{a[0]}_{a[1]}", f"{b[0]}_{b[1]}", _sig(score, 3), why]
        for a, b, score, why in similar_latents(latents, transcoders, example_data_by_layer)
    ]

    settings = result_settings(result)
    notes = {}
    if logit_tables is None:
        notes["logits"] = (
            "No logit tables: pass transcoders= to create_attribution_dashboard to see each "
            "latent's top and bottom logit effects (W_dec[f] @ W_U)."
        )
    if not example_data_by_layer:
        notes["examples"] = (
            "No example data: pass example_data_by_layer= (utils.load_example_data_parallel, "
            "or utils.make_toy_example_data offline) to see activation histograms and "
            "top-activating sequences."
        )
    if graph_json is None:
        graph_json = build_graph_json(result, model, transcoders, logit_tables=logit_tables)
    return {
        "meta": {
            "prompt": result.prompt,
            "tokens": result_tokens(result),
            "n_layers": n_layers,
            "n_nodes": len(view.indices),
            "n_nodes_full": len(graph),
            # This build of the page: the browser keeps its state per graph and page, so two builds of one
            # graph (or two copies in other folders) never share it unasked.
            "build": uuid.uuid4().hex[:12],
            "n_edges": len(edges),
            "n_dropped": len(view.dropped),
            "node_threshold": settings.get("node_threshold"),
            "edge_threshold": settings.get("edge_threshold"),
            "settings": settings,
            "scores": {
                str(k): (_sig(v) if isinstance(v, (int, float)) else str(v))
                for k, v in (scores or {}).items()
            },
            "scan": default_scan(model, transcoders),
            "notes": notes,
            "kind_names": {_TYPE_NAMES[k]: v for k, v in NODE_NAMES.items()},
        },
        "nodes": nodes[: len(view.indices)],
        "edges": edges,
        # What the sliders need to prune as `prune` does (views/sliders.py).
        "extra": {"nodes": nodes[len(view.indices) :], "edges": extra_edges},
        "prune": {
            "node_max": sliders.node_threshold,
            "node_own": sliders.own_threshold,
            "shares": sliders.shares,
            "n_ranked": sliders.n_ranked,
            "cuts": {str(k): v for k, v in sliders.cuts.items()},
        },
        "latents": panels,
        # Latent keys that could be one supernode (views/suggestions.py): [a, b, score, why].
        "similar": similar,
        "state": state or {},
        # The export without its links (the page rebuilds them from `edges`): what "save" writes.
        "export": {"metadata": graph_json["metadata"], "nodes": graph_json["nodes"]},
    }


def _json_for_script(data: dict) -> str:
    """JSON that is safe inside a <script> element (no '<', '>' or '&' left to end it early)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def render_dashboard_html(data: dict) -> str:
    """The complete page for `dashboard_data(...)`'s output: the assets with the data inlined."""
    title = html.escape(f"Attribution graph: {data['meta']['prompt'][-80:]}")
    css = css_variables() + "\n" + _asset("dashboard.css")
    # One pass over the template, so text inside the data or the assets is never substituted again.
    parts = {
        "__TITLE__": title,
        "__CSS__": css,
        "__JS__": _asset("dashboard.js"),
        "__DATA__": _json_for_script(data),
    }
    return _fill(_asset("dashboard.html"), parts)


def _fill(template: str, parts: dict[str, str]) -> str:
    """`template` with each placeholder replaced, in one pass (text put in is never substituted again)."""
    out, rest = [], template
    while True:
        hits = [(rest.find(k), k) for k in parts if rest.find(k) >= 0]
        if not hits:
            out.append(rest)
            break
        at, key = min(hits)
        out += [rest[:at], parts[key]]
        rest = rest[at + len(key) :]
    return "".join(out)


def read_saved_state(folder: str | Path) -> dict | None:
    """The viewer state saved in `folder/neuronpedia.json` (pins, supernodes, labels), or None if it has
    none."""
    path = Path(folder) / "neuronpedia.json"
    if not path.exists():
        return None
    try:
        state = saved_state(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, AttributeError):
        return None
    q = state["qParams"]
    return (
        state
        if (q.get("pinnedIds") or q.get("supernodes") or q.get("clickedId") or state["labels"])
        else None
    )


class DashboardFrame:
    """The page in an iframe for a notebook output (`assets/frame.html`), with a line that says what to do
    where the output does not run (an untrusted notebook) and a plain-text line for viewers that drop HTML."""

    def __init__(self, page: str, index: Path):
        self.index = index
        self.data = _fill(
            _asset("frame.html"),
            {"__PATH__": html.escape(_shown_path(index)), "__SRCDOC__": html.escape(page, quote=True)},
        )

    def _repr_html_(self) -> str:
        return self.data

    def __repr__(self) -> str:
        return f"Attribution dashboard: {_shown_path(self.index)} (open it in a browser)"


def _shown_path(index: Path) -> str:
    """The page's path as a reader can use it: relative to the working folder when it lies inside it."""
    try:
        return str(Path(index).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(index)


def _show_inline(page: str, index: Path) -> None:
    """Show the page in Jupyter/Colab inside an iframe (srcdoc), so its scripts run; no-op elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is None:
        return
    display(DashboardFrame(page, index))


@guarded(**_DASHBOARD, flags=("display",))
def create_attribution_dashboard(
    result: AttributionResult,
    model: HookedSAETransformer | None,
    transcoders: dict | None = None,
    example_data_by_layer: dict[int, dict] | None = None,
    output_dir: str | Path = "out/dashboard",
    display: bool = True,
    scores: dict | None = None,
    slug: str = "attribution-graph",
    interventions: Mapping[int, tuple[float, float]] | None = None,
) -> str:
    """Write `index.html` (the dashboard) and `neuronpedia.json` into `output_dir`; show it inline; return the
    HTML.

    A state saved from the page (pins, supernodes, labels) that lies in `output_dir/neuronpedia.json`
    is kept: the new page opens with it and the new export carries it, for the nodes that still exist.

    Args:
        result: what `attribute` returned; only the pruned graph is drawn.
        model: the model (its tokenizer and `W_U`).
        transcoders: the transcoders by layer, for each latent's logit table; None skips the tables.
        example_data_by_layer: GemmaScope-2-layout example data by layer (`load_example_data_parallel`, or
            `make_toy_example_data` offline), for activation histograms and top-activating sequences.
        output_dir: folder for `index.html` and `neuronpedia.json`.
        display: show the page inline when running in IPython.
        scores: optional scores to show in the header, e.g. `{"replacement": 0.71, "completeness": 0.9}`.
        slug: the graph's name in the Neuronpedia export.
        interventions: node index (into `result.graph.nodes`) -> (predicted, measured) change of the top
            logit when that node is ablated; shown in the node's panel.
    """
    view = view_graph(result)
    tables = None
    if transcoders is not None:
        # Shared by the page and the export.
        tables = latent_logit_tables(model, transcoders, panel_latents(result, view))
    out = Path(output_dir)
    state = read_saved_state(out)
    graph_json = build_graph_json(result, model, transcoders, slug=slug, logit_tables=tables, state=state)
    data = dashboard_data(
        result,
        model,
        transcoders,
        example_data_by_layer,
        scores,
        logit_tables=tables,
        interventions=interventions,
        state=state,
        graph_json=graph_json,
    )
    page = render_dashboard_html(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "neuronpedia.json").write_text(json.dumps(graph_json, ensure_ascii=False), encoding="utf-8")
    if display:
        _show_inline(page, (out / "index.html").resolve())
    return page
