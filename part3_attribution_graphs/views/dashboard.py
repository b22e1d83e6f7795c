"""A self-contained HTML dashboard for a pruned attribution graph (no CDN, no server, no network).

`create_attribution_dashboard` writes one `index.html` (data, CSS and a small vanilla-JS/SVG
renderer, all inline) and `neuronpedia.json` beside it, and shows the page inline in Jupyter/Colab.

The page draws prompt tokens along x and layers up y: embeddings at the bottom, then one row per
layer (latents and the MLP error node at each position), logits on top. Node size follows influence
on the logits (logits: their probability), edges are blue when positive and red when negative, and
their width and opacity follow |weight|. Hovering a node highlights its edges; clicking it opens its
panel in the sidebar (which, with nothing selected, lists the logits and the most influential nodes).
A latent's panel lists its strongest direct logit effects (`W_dec[f] @ W_U`, computed here from the
transcoders), a histogram of those effects over the vocabulary and, given example data, its
activation histogram and top-activating sequences with tokens shaded by activation.

For tests and scripts: every drawn node is an element of class `node` with `data-node-id` (the
Neuronpedia export's node id) and `data-type`, every edge an element of class `edge`; the panel is
`#panel` (class `empty` until a node is chosen, then `data-node-id` names it) and a latent's logit
table has class `logit-table`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from ..result import AttributionResult
from .examples import activation_histogram, feature_examples, feature_row
from .neuronpedia import (
    cumulative_influence,
    default_scan,
    export_neuronpedia,
    export_node_ids,
    kept_nodes,
    node_kind,
    pruned_edges,
    result_influence,
    result_settings,
    result_tokens,
)

__all__ = ["latent_logit_tables", "dashboard_data", "render_dashboard_html", "create_attribution_dashboard"]

# The page's short names for the node kinds.
_TYPE_NAMES = {"embedding": "embedding", "latent": "latent", "mlp_error": "error", "logit": "logit"}


def _sig(x: float, digits: int = 4) -> float:
    """Round to `digits` significant figures (keeps the page small)."""
    return float(f"{float(x):.{digits}g}")


@torch.no_grad()
def latent_logit_tables(
    model,
    transcoders: dict,
    latents: list[tuple[int, int]],
    k: int = 10,
    bins: int = 40,
) -> dict[tuple[int, int], dict]:
    """Direct logit effects `W_dec[f] @ W_U` of each `(layer, latent)`: top and bottom k tokens and a histogram.

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
            chunk = feats[lo:lo + 64]
            effects = (W_dec[chunk].to(W_U.device, W_U.dtype) @ W_U).float()  # (chunk, d_vocab)
            kk = min(k, effects.shape[1])
            top_v, top_i = effects.topk(kk, dim=1)
            bot_v, bot_i = effects.topk(kk, dim=1, largest=False)
            for row, f in enumerate(chunk):
                e = effects[row]
                e_lo, e_hi = float(e.min()), float(e.max())
                counts = torch.histc(e, bins=bins, min=e_lo, max=e_hi if e_hi > e_lo else e_lo + 1e-6)
                raw[(layer, f)] = (top_i[row].tolist(), top_v[row].tolist(), bot_i[row].tolist(),
                                   bot_v[row].tolist(), (counts.long().tolist(), e_lo, e_hi))
    ids = sorted({i for t in raw.values() for i in t[0] + t[2]})
    strings = dict(zip(ids, model.tokenizer.batch_decode([[i] for i in ids]))) if ids else {}
    return {
        key: {"top": [(strings[i], v) for i, v in zip(ti, tv)],
              "bottom": [(strings[i], v) for i, v in zip(bi, bv)],
              "hist": hist}
        for key, (ti, tv, bi, bv, hist) in raw.items()
    }


def _example_info(example_data: dict, feature: int, tokenizer, n_examples: int) -> dict | None:
    """Activation histogram, frequency and top sequences of one latent, in the page's format."""
    if feature_row(example_data, feature) is None:
        return None
    info: dict = {}
    row = feature_row(example_data, feature)
    info["freq"] = _sig(example_data["feature_frequencies"][row])
    hist = activation_histogram(example_data, feature)
    if hist is not None:
        counts, edges = hist
        info["hist"] = [counts.tolist(), _sig(edges[0]), _sig(edges[-1])]
    info["examples"] = [
        {"tokens": ex["tokens"], "acts": [_sig(a, 3) for a in ex["acts"]], "peak": ex["peak"],
         "max": _sig(ex["max_act"])}
        for ex in feature_examples(example_data, feature, tokenizer, n_examples)
    ]
    return info


def dashboard_data(
    result: AttributionResult,
    model,
    transcoders: dict | None = None,
    example_data_by_layer: dict[int, dict] | None = None,
    scores: dict | None = None,
    n_examples: int = 5,
    logit_tables: dict | None = None,
) -> dict:
    """Everything the page draws, as one JSON-ready dict (nodes, edges, per-latent panels, header).

    `logit_tables` (from `latent_logit_tables`) is used instead of recomputing them from `transcoders`.
    """
    graph, n_layers = result.graph, result.graph.n_layers
    kept = result.kept_indices.tolist()
    ids = export_node_ids(result)
    infl = result_influence(result)
    cum = cumulative_influence(infl)

    nodes = []
    for idx, node_id in zip(kept, ids):
        node = graph.nodes[idx]
        kind = _TYPE_NAMES[node_kind(node)]
        row = 0 if kind == "embedding" else n_layers + 1 if kind == "logit" else int(node.layer) + 1
        entry = {"id": node_id, "type": kind, "row": row, "ctx": int(node.ctx_idx), "feature": int(node.feature),
                 "influence": _sig(infl[idx]), "cum": _sig(cum[idx])}
        if kind == "latent":
            entry.update(layer=int(node.layer), act=_sig(node.activation), key=f"{int(node.layer)}_{node.feature}")
        elif kind == "error":
            entry["layer"] = int(node.layer)
        elif kind == "logit":
            entry.update(prob=_sig(node.token_prob), token=node.str_token)
        else:
            entry["token"] = node.str_token
        if node.label:
            entry["label"] = node.label
        nodes.append(entry)

    edges = [[s, t, _sig(w)] for s, t, w in pruned_edges(result)]

    latents = sorted({(int(graph.nodes[i].layer), graph.nodes[i].feature) for i in kept
                      if node_kind(graph.nodes[i]) == "latent"})
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
    if example_data_by_layer:
        for layer, f in latents:
            data = example_data_by_layer.get(layer)
            if data is not None:
                ex = _example_info(data, f, getattr(model, "tokenizer", None), n_examples)
                if ex is not None:
                    panels[f"{layer}_{f}"]["ex"] = ex

    settings = result_settings(result)
    notes = {}
    if logit_tables is None:
        notes["logits"] = ("No logit tables: pass transcoders= to create_attribution_dashboard to see each "
                           "latent's top and bottom logit effects (W_dec[f] @ W_U).")
    if not example_data_by_layer:
        notes["examples"] = ("No example data: pass example_data_by_layer= (utils.load_example_data_parallel, "
                             "or utils.make_toy_example_data offline) to see activation histograms and "
                             "top-activating sequences.")
    return {
        "meta": {
            "prompt": result.prompt,
            "tokens": result_tokens(result),
            "n_layers": n_layers,
            "n_nodes": len(kept),
            "n_nodes_full": len(graph),
            "n_edges": len(edges),
            "node_threshold": settings.get("node_threshold"),
            "edge_threshold": settings.get("edge_threshold"),
            "settings": settings,
            "scores": {str(k): (_sig(v) if isinstance(v, (int, float)) else str(v)) for k, v in (scores or {}).items()},
            "scan": default_scan(model, transcoders),
            "notes": notes,
        },
        "nodes": nodes,
        "edges": edges,
        "latents": panels,
    }


def _json_for_script(data: dict) -> str:
    """JSON that is safe inside a <script> element (no '<', '>' or '&' left to end it early)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_dashboard_html(data: dict) -> str:
    """The complete page for `dashboard_data(...)`'s output."""
    title = html.escape(f"Attribution graph: {data['meta']['prompt'][-80:]}")
    return (_PAGE.replace("__TITLE__", title).replace("__CSS__", _CSS).replace("__JS__", _JS)
            .replace("__DATA__", _json_for_script(data)))


def _show_inline(page: str, height: int) -> None:
    """Show the page in Jupyter/Colab inside an iframe (srcdoc), so its scripts run; no-op elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return
    if get_ipython() is None:
        return
    frame = (f'<div><iframe srcdoc="{html.escape(page, quote=True)}" style="width: 100%; height: {height}px; '
             f'border: 1px solid #ddd;" sandbox="allow-scripts allow-downloads"></iframe></div>')
    display(HTML(frame))


def create_attribution_dashboard(
    result: AttributionResult,
    model,
    transcoders: dict | None = None,
    example_data_by_layer: dict[int, dict] | None = None,
    output_dir: str | Path = "out/dashboard",
    display: bool = True,
    scores: dict | None = None,
    slug: str = "attribution-graph",
) -> str:
    """Write `index.html` (the dashboard) and `neuronpedia.json` into `output_dir`; show it inline; return the HTML.

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
    """
    tables = None
    if transcoders is not None:
        latents = sorted({(int(n.layer), int(n.feature)) for n in kept_nodes(result) if node_kind(n) == "latent"})
        tables = latent_logit_tables(model, transcoders, latents)  # shared by the page and the export
    data = dashboard_data(result, model, transcoders, example_data_by_layer, scores, logit_tables=tables)
    page = render_dashboard_html(data)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(page, encoding="utf-8")
    export_neuronpedia(result, model, transcoders, slug=slug, path=out / "neuronpedia.json", logit_tables=tables)
    if display:
        _show_inline(page, height=max(720, min(1100, 60 + 40 * (result.graph.n_layers + 2))))
    return page


# ----------------------------------------------------------------------------------------------------
# The page. Everything below is inline: no external script, stylesheet, font or image.

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header id="header"></header>
<main>
  <section id="graph-wrap">
    <div id="legend"></div>
    <div id="graph"></div>
  </section>
  <aside id="panel" class="empty" aria-live="polite"></aside>
</main>
<div id="tooltip" class="hidden"></div>
<script type="application/json" id="dashboard-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1f2328;
       background: #fff; }
header { padding: 10px 16px; border-bottom: 1px solid #e5e7eb; background: #fafafa; }
header h1 { font-size: 15px; margin: 0 0 4px 0; }
header .prompt { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap; background: #fff;
                 border: 1px solid #e5e7eb; padding: 4px 6px; border-radius: 4px; max-height: 4.5em; overflow: auto; }
header .stats { margin-top: 6px; display: flex; flex-wrap: wrap; gap: 6px 14px; color: #4b5563; }
header .stats b { color: #111827; }
.note { color: #92400e; background: #fffbeb; border: 1px solid #fde68a; padding: 4px 8px; border-radius: 4px;
        margin-top: 6px; }
main { display: flex; align-items: flex-start; }
#graph-wrap { flex: 1 1 auto; min-width: 0; overflow: auto; padding: 8px; }
#legend { display: flex; gap: 14px; color: #4b5563; margin: 0 0 4px 4px; flex-wrap: wrap; }
#legend span.sw { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; margin-right: 4px;
                  border-radius: 2px; border: 1px solid #666; }
#graph svg { display: block; }
.edge { fill: none; stroke-linecap: round; transition: opacity 0.1s; }
.node { cursor: pointer; stroke-width: 1.2; }
.node.latent { fill: #f6c177; stroke: #a05a00; }
.node.error { fill: #d1d5db; stroke: #6b7280; }
.node.embedding { fill: #a7d3a6; stroke: #2f6f2e; }
.node.logit { fill: #c4b5fd; stroke: #5b21b6; }
.node.selected { stroke: #111827; stroke-width: 3; }
svg.focus .edge { opacity: 0.07 !important; }
svg.focus .edge.hl { opacity: 0.95 !important; }
svg.focus .node { opacity: 0.35; }
svg.focus .node.nb, svg.focus .node.hl { opacity: 1; }
.axis { fill: #6b7280; font-size: 11px; }
.tok { fill: #111827; font-size: 11px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.tok.masked { fill: #9ca3af; }
.gridline { stroke: #f1f5f9; }
#panel { flex: 0 0 420px; max-width: 420px; height: calc(100vh - 110px); min-height: 480px; overflow: auto;
         border-left: 1px solid #e5e7eb; padding: 10px 14px; background: #fff; position: sticky; top: 0; }
#panel.empty h2 { color: #4b5563; }
#panel h2 { font-size: 14px; margin: 0 24px 6px 0; }
#panel h3 { font-size: 12px; margin: 12px 0 4px 0; text-transform: uppercase; letter-spacing: 0.04em; color: #4b5563; }
#panel .close { position: absolute; right: 10px; top: 6px; border: none; background: none; font-size: 18px;
                cursor: pointer; color: #6b7280; }
table { border-collapse: collapse; }
table.facts td { padding: 1px 10px 1px 0; }
table.facts td:first-child { color: #6b7280; }
table.logit-table { width: 100%; font-size: 12px; }
table.logit-table th { text-align: left; color: #4b5563; font-weight: 600; border-bottom: 1px solid #e5e7eb; }
table.logit-table { table-layout: fixed; }
table.logit-table th:nth-child(odd) { width: 34%; }
table.logit-table td { padding: 1px 6px 1px 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
                       white-space: pre; overflow: hidden; text-overflow: ellipsis; }
td.pos { color: #1d4ed8; } td.neg { color: #b91c1c; }
.links div { display: flex; justify-content: space-between; gap: 8px; cursor: pointer; padding: 0 2px; }
.links div:hover { background: #f3f4f6; }
.seq { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; margin: 3px 0; padding: 3px;
       border: 1px solid #f1f5f9; border-radius: 3px; line-height: 1.7; word-break: break-all; }
.seq span { white-space: pre; border-radius: 2px; }
.seq span.peak { outline: 1.5px solid #15803d; }
.seq .maxact { color: #6b7280; font-size: 11px; margin-right: 6px; }
#tooltip { position: fixed; pointer-events: none; background: #111827; color: #f9fafb; padding: 4px 7px;
           border-radius: 4px; font-size: 12px; z-index: 10; max-width: 360px; white-space: pre-wrap; }
#tooltip.hidden { display: none; }
.muted { color: #6b7280; }
"""

_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("dashboard-data").textContent);
  var META = DATA.meta, NODES = DATA.nodes, EDGES = DATA.edges, LATENTS = DATA.latents;
  var nRows = META.n_layers + 2;

  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  function tok(s) { return esc(String(s).replace(/\n/g, "\u23ce").replace(/\t/g, "\u2192")); }
  function fmt(x) {
    if (x === null || x === undefined) return "-";
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(2);
    return (+x.toPrecision(3)).toString();
  }
  function rowLabel(r) { return r === 0 ? "Emb" : (r === nRows - 1 ? "Logit" : "L" + (r - 1)); }

  // ---------------------------------------------------------------- header
  (function header() {
    var s = META.settings || {};
    var parts = [
      "<h1>Attribution graph</h1>",
      '<div class="prompt">' + tok(META.prompt) + "</div>",
      '<div class="stats">',
      "<span>nodes <b>" + META.n_nodes + "</b> of " + META.n_nodes_full + "</span>",
      "<span>edges <b>" + META.n_edges + "</b></span>",
      "<span>node threshold <b>" + fmt(META.node_threshold) + "</b></span>",
      "<span>edge threshold <b>" + fmt(META.edge_threshold) + "</b></span>",
      "<span>layers <b>" + META.n_layers + "</b></span>",
      "<span>model <b>" + esc(META.scan) + "</b></span>"
    ];
    ["top_k", "n_output_nodes", "start_posn"].forEach(function (k) {
      if (s[k] !== undefined) parts.push("<span>" + esc(k) + " <b>" + esc(s[k]) + "</b></span>");
    });
    Object.keys(META.scores || {}).forEach(function (k) {
      var v = META.scores[k];
      var label = k.replace(/_score$/, "").replace(/_/g, " ") + " score";  // "replacement_score" -> "replacement score"
      parts.push('<span class="score">' + esc(label) + " <b>" + esc(typeof v === "number" ? fmt(v) : v) +
                 "</b></span>");
    });
    parts.push("</div>");
    Object.keys(META.notes || {}).forEach(function (k) {
      parts.push('<div class="note">' + esc(META.notes[k]) + "</div>");
    });
    document.getElementById("header").innerHTML = parts.join("");
    document.getElementById("legend").innerHTML = [
      '<span><span class="sw" style="background:#a7d3a6"></span>embedding</span>',
      '<span><span class="sw" style="background:#f6c177;border-radius:6px"></span>latent</span>',
      '<span><span class="sw" style="background:#d1d5db"></span>MLP error</span>',
      '<span><span class="sw" style="background:#c4b5fd"></span>logit</span>',
      '<span><span class="sw" style="background:#2563eb;height:3px"></span>positive edge</span>',
      '<span><span class="sw" style="background:#dc2626;height:3px"></span>negative edge</span>',
      '<span class="muted">size: influence on the logits (logits: probability) &middot; hover: edges &middot; ' +
        "click: details</span>"
    ].join("");
  })();

  // ---------------------------------------------------------------- layout
  var cells = {};
  // Logit nodes carry a text label each, so they need more room than the other nodes.
  function isLogit(i) { return NODES[i].type === "logit"; }
  NODES.forEach(function (n, i) {
    var key = n.row + "_" + n.ctx;
    (cells[key] = cells[key] || []).push(i);
  });
  var nTok = META.tokens.length;
  // Per token, the most nodes in any of its cells (logit cells counted apart: they are spaced wider).
  var colNodes = META.tokens.map(function () { return 1; }), colLogits = META.tokens.map(function () { return 0; });
  Object.keys(cells).forEach(function (k) {
    var c = cells[k];
    // Latents by influence, then the error node.
    c.sort(function (a, b) {
      var ta = NODES[a].type === "error" ? 1 : 0, tb = NODES[b].type === "error" ? 1 : 0;
      return ta - tb || NODES[b].influence - NODES[a].influence;
    });
    var p = NODES[c[0]].ctx;
    if (isLogit(c[0])) colLogits[p] = Math.max(colLogits[p], c.length);
    else colNodes[p] = Math.max(colNodes[p], c.length);
  });
  var rowH = Math.max(26, Math.min(90, Math.floor(620 / nRows)));
  var left = 52, top = 34, bottom = 64, logitSpacing = 48;
  var W, H, spacing, rScale, colX;

  var maxInfl = 1e-12, maxAbs = 1e-12;
  NODES.forEach(function (n) { if (n.type !== "logit") maxInfl = Math.max(maxInfl, n.influence); });
  EDGES.forEach(function (e) { maxAbs = Math.max(maxAbs, Math.abs(e[2])); });
  NODES.forEach(function (n) { n.inE = []; n.outE = []; });
  EDGES.forEach(function (e, j) { NODES[e[0]].outE.push(j); NODES[e[1]].inE.push(j); });

  // Fit the width available: node spacing shrinks (down to 6 px) before the graph starts to scroll.
  function layout(avail) {
    function widths(sp) {
      return colNodes.map(function (m, p) { return Math.max(18, m * sp + 6, colLogits[p] * logitSpacing); });
    }
    function total(ws) { return ws.reduce(function (a, b) { return a + b; }, left + 40); }
    spacing = 14;
    var ws = widths(spacing);
    while (total(ws) > avail && spacing > 6) { spacing -= 0.5; ws = widths(spacing); }
    // A small graph is spread out to use the width, up to three times its natural width.
    var stretch = Math.min(3, (avail - left - 40) / (total(ws) - left - 40));
    if (stretch > 1) ws = ws.map(function (w) { return w * stretch; });
    rScale = Math.min(1, spacing / 14);
    colX = [];
    var acc = left;
    ws.forEach(function (w, p) { colX[p] = acc + w / 2; acc += w; });
    W = acc + 40; H = top + nRows * rowH + bottom;
    NODES.forEach(function (n, i) {
      var c = cells[n.row + "_" + n.ctx], k = c.indexOf(i), m = c.length;
      n.x = colX[n.ctx] + (k - (m - 1) / 2) * (isLogit(i) ? logitSpacing : spacing);
      n.y = top + (nRows - 1 - n.row) * rowH + rowH / 2;
      var share = n.type === "logit" ? (n.prob || 0) : Math.max(n.influence, 0) / maxInfl;
      n.r = (n.type === "logit" ? 1 : rScale) * (3 + 5 * Math.sqrt(Math.min(1, share)));
    });
  }

  function nodeTitle(n) {
    if (n.type === "latent") return "Latent L" + n.layer + " #" + n.feature + " at \u201c" + META.tokens[n.ctx] + "\u201d";
    if (n.type === "error") return "MLP error L" + n.layer + " at \u201c" + META.tokens[n.ctx] + "\u201d";
    if (n.type === "embedding") return "Embedding \u201c" + n.token + "\u201d (pos " + n.ctx + ")";
    return "Logit \u201c" + n.token + "\u201d (p = " + fmt(n.prob) + ")";
  }

  // ---------------------------------------------------------------- drawing (SVG markup, then one innerHTML)
  var graphEl = document.getElementById("graph"), wrapEl = document.getElementById("graph-wrap");
  var svgEl = null, nodeEls = [], edgeEls = [];
  var masked = META.settings && META.settings.start_posn !== undefined ? META.settings.start_posn : 0;
  var edgeOrder = EDGES.map(function (e, j) { return j; });
  edgeOrder.sort(function (a, b) { return Math.abs(EDGES[a][2]) - Math.abs(EDGES[b][2]); });

  function draw() {
    layout(wrapEl.clientWidth - 20);
    var svg = [];
    svg.push('<svg id="graph-svg" width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + " " + H + '">');
    for (var r = 0; r < nRows; r++) {
      var y = top + (nRows - 1 - r) * rowH + rowH / 2;
      svg.push('<line class="gridline" x1="' + left + '" x2="' + (W - 8) + '" y1="' + y + '" y2="' + y + '"></line>');
      svg.push('<text class="axis" x="' + (left - 8) + '" y="' + (y + 4) + '" text-anchor="end">' + rowLabel(r) + "</text>");
    }
    META.tokens.forEach(function (t, p) {
      var x = colX[p], ty = top + nRows * rowH + 14;
      var s = String(t).replace(/\n/g, "\u23ce");
      if (s.length > 14) s = s.slice(0, 13) + "\u2026";
      svg.push('<text class="tok' + (p < masked ? " masked" : "") + '" x="' + x.toFixed(1) + '" y="' + ty +
               '" text-anchor="end" transform="rotate(-35 ' + x.toFixed(1) + " " + ty + ')">' + esc(s) + "</text>");
    });
    edgeOrder.forEach(function (j) {
      var e = EDGES[j], s = NODES[e[0]], t = NODES[e[1]], a = Math.abs(e[2]) / maxAbs;
      var my = (s.y + t.y) / 2;
      svg.push('<path class="edge" data-edge="' + j + '" d="M' + s.x.toFixed(1) + " " + s.y.toFixed(1) + " C" +
               s.x.toFixed(1) + " " + my.toFixed(1) + " " + t.x.toFixed(1) + " " + my.toFixed(1) + " " +
               t.x.toFixed(1) + " " + t.y.toFixed(1) + '" stroke="' + (e[2] >= 0 ? "#2563eb" : "#dc2626") +
               '" stroke-width="' + (0.4 + 3.6 * a).toFixed(2) + '" opacity="' + (0.15 + 0.6 * a).toFixed(2) + '"></path>');
    });
    NODES.forEach(function (n, i) {
      var attrs = ' class="node ' + n.type + (i === selected ? " selected" : "") + '" data-node-id="' + esc(n.id) +
                  '" data-type="' + n.type + '" data-index="' + i + '"';
      if (n.type === "latent") {
        svg.push("<circle" + attrs + ' cx="' + n.x.toFixed(1) + '" cy="' + n.y.toFixed(1) + '" r="' + n.r.toFixed(1) + '"></circle>');
      } else {
        var h = n.type === "error" ? Math.max(2.5, n.r * 0.8) : n.r;
        svg.push("<rect" + attrs + ' x="' + (n.x - h).toFixed(1) + '" y="' + (n.y - h).toFixed(1) + '" width="' +
                 (2 * h).toFixed(1) + '" height="' + (2 * h).toFixed(1) + '" rx="2"></rect>');
      }
      if (n.type === "logit") {
        var label = String(n.token).length > 9 ? String(n.token).slice(0, 8) + "\u2026" : n.token;
        svg.push('<text class="tok" x="' + n.x.toFixed(1) + '" y="' + (n.y - n.r - 5).toFixed(1) +
                 '" text-anchor="middle">' + tok(label) + "</text>");
      }
    });
    svg.push("</svg>");
    graphEl.innerHTML = svg.join("");
    svgEl = document.getElementById("graph-svg");
    nodeEls = []; edgeEls = []; lit = [];
    Array.prototype.forEach.call(svgEl.querySelectorAll(".node"), function (el) { nodeEls[+el.getAttribute("data-index")] = el; });
    Array.prototype.forEach.call(svgEl.querySelectorAll(".edge"), function (el) { edgeEls[+el.getAttribute("data-edge")] = el; });
    highlight(selected);
  }
  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(draw, 150);
  });

  // ---------------------------------------------------------------- hover and selection
  var selected = null, lit = [];
  function highlight(i) {
    lit.forEach(function (el) { el.classList.remove("hl", "nb"); });
    lit = [];
    if (i === null) { svgEl.classList.remove("focus"); return; }
    svgEl.classList.add("focus");
    var n = NODES[i];
    nodeEls[i].classList.add("hl"); lit.push(nodeEls[i]);
    n.inE.concat(n.outE).forEach(function (j) {
      var e = EDGES[j], other = e[0] === i ? e[1] : e[0];
      edgeEls[j].classList.add("hl"); lit.push(edgeEls[j]);
      nodeEls[other].classList.add("nb"); lit.push(nodeEls[other]);
    });
  }
  var tip = document.getElementById("tooltip");
  graphEl.addEventListener("mouseover", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".node") : null;
    if (!el) return;
    var i = +el.getAttribute("data-index"), n = NODES[i];
    highlight(i);
    var lines = [nodeTitle(n)];
    if (n.type === "latent") lines.push("activation " + fmt(n.act));
    if (n.type !== "logit") lines.push("influence " + fmt(n.influence));
    lines.push(n.inE.length + " in, " + n.outE.length + " out edges");
    tip.textContent = lines.join("\n");
    tip.classList.remove("hidden");
  });
  graphEl.addEventListener("mousemove", function (ev) {
    tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
  });
  graphEl.addEventListener("mouseout", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".node") : null;
    if (!el) return;
    tip.classList.add("hidden");
    highlight(selected);
  });
  graphEl.addEventListener("click", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".node") : null;
    if (el) select(+el.getAttribute("data-index"));
  });

  // ---------------------------------------------------------------- panel
  var panel = document.getElementById("panel");

  function histogram(counts, lo, hi, title, signColour) {
    var w = 380, h = 90, pad = 18, n = counts.length, bw = (w - 2) / n;
    var maxC = 0;
    counts.forEach(function (c) { maxC = Math.max(maxC, Math.log10(1 + c)); });
    var out = ['<svg class="hist" width="' + w + '" height="' + (h + pad) + '" viewBox="0 0 ' + w + " " + (h + pad) + '">'];
    counts.forEach(function (c, k) {
      var bh = maxC > 0 ? (h - 4) * Math.log10(1 + c) / maxC : 0;
      var centre = lo + (k + 0.5) * (hi - lo) / n;
      var colour = signColour ? (centre >= 0 ? "#2563eb" : "#dc2626") : "#16a34a";
      out.push('<rect x="' + (1 + k * bw).toFixed(1) + '" y="' + (h - bh).toFixed(1) + '" width="' +
               Math.max(bw - 1, 0.5).toFixed(1) + '" height="' + bh.toFixed(1) + '" fill="' + colour + '" opacity="0.8">' +
               "<title>" + fmt(lo + k * (hi - lo) / n) + " to " + fmt(lo + (k + 1) * (hi - lo) / n) + ": " + c + "</title></rect>");
    });
    out.push('<line x1="0" x2="' + w + '" y1="' + h + '" y2="' + h + '" stroke="#9ca3af"></line>');
    out.push('<text class="axis" x="0" y="' + (h + 13) + '">' + fmt(lo) + "</text>");
    out.push('<text class="axis" x="' + w + '" y="' + (h + 13) + '" text-anchor="end">' + fmt(hi) + "</text>");
    out.push('<text class="axis" x="' + (w / 2) + '" y="' + (h + 13) + '" text-anchor="middle">' + esc(title) + "</text>");
    out.push("</svg>");
    return out.join("");
  }

  function linkList(i, which) {
    var n = NODES[i], list = (which === "in" ? n.inE : n.outE).slice();
    if (!list.length) return '<div class="muted">none</div>';
    list.sort(function (a, b) { return Math.abs(EDGES[b][2]) - Math.abs(EDGES[a][2]); });
    return '<div class="links">' + list.slice(0, 10).map(function (j) {
      var e = EDGES[j], other = which === "in" ? e[0] : e[1];
      return '<div data-goto="' + other + '"><span>' + esc(nodeTitle(NODES[other])) + '</span><span class="' +
             (e[2] >= 0 ? "pos" : "neg") + '" style="color:' + (e[2] >= 0 ? "#1d4ed8" : "#b91c1c") + '">' +
             fmt(e[2]) + "</span></div>";
    }).join("") + (list.length > 10 ? '<div class="muted">\u2026 ' + (list.length - 10) + " more</div>" : "") + "</div>";
  }

  function latentSections(n) {
    var info = LATENTS[n.key] || {}, out = [];
    out.push("<h3>Direct logit effects (W_dec[f] \u00b7 W_U)</h3>");
    if (info.top) {
      var rows = ['<table class="logit-table"><thead><tr><th>top token</th><th>effect</th><th>bottom token</th>' +
                  "<th>effect</th></tr></thead><tbody>"];
      for (var k = 0; k < Math.max(info.top.length, info.bottom.length); k++) {
        var t = info.top[k], b = info.bottom[k];
        rows.push("<tr><td>" + (t ? tok(t[0]) : "") + '</td><td class="pos">' + (t ? fmt(t[1]) : "") + "</td><td>" +
                  (b ? tok(b[0]) : "") + '</td><td class="neg">' + (b ? fmt(b[1]) : "") + "</td></tr>");
      }
      rows.push("</tbody></table>");
      out.push(rows.join(""));
      out.push(histogram(info.logit_hist[0], info.logit_hist[1], info.logit_hist[2], "logit effect (log count)", true));
    } else {
      out.push('<div class="note">' + esc((META.notes || {}).logits || "No logit data for this latent.") + "</div>");
    }
    out.push("<h3>Activations</h3>");
    var ex = info.ex;
    if (ex) {
      out.push('<div class="muted">fires on ' + fmt(100 * ex.freq) + "% of tokens; this prompt: " + fmt(n.act) + "</div>");
      if (ex.hist) out.push(histogram(ex.hist[0], ex.hist[1], ex.hist[2], "top activations (log count)", false));
      out.push("<h3>Top activations</h3>");
      if (!ex.examples.length) out.push('<div class="muted">no recorded examples</div>');
      ex.examples.forEach(function (e) {
        var spans = e.tokens.map(function (t, q) {
          var a = e.acts[q] / (e.max || 1);
          var style = a > 0 ? ' style="background: rgba(34,160,70,' + (0.15 + 0.85 * Math.min(1, a)).toFixed(2) + ')"' : "";
          return "<span" + (q === e.peak ? ' class="peak"' : "") + style + ' title="' + fmt(e.acts[q]) + '">' + tok(t) + "</span>";
        });
        out.push('<div class="seq"><span class="maxact">' + fmt(e.max) + "</span>" + spans.join("") + "</div>");
      });
    } else {
      out.push('<div class="note">' + esc((META.notes || {}).examples || "No example data for this latent's layer.") + "</div>");
    }
    return out.join("");
  }

  function select(i) {
    if (selected !== null && nodeEls[selected]) nodeEls[selected].classList.remove("selected");
    selected = i;
    if (i === null) { overview(); highlight(null); return; }
    nodeEls[i].classList.add("selected");
    highlight(i);
    var n = NODES[i], facts = [];
    facts.push(["type", n.type === "error" ? "MLP reconstruction error" : n.type]);
    if (n.layer !== undefined) facts.push(["layer", n.layer]);
    if (n.type === "latent") facts.push(["feature", n.feature]);
    facts.push(["position", n.ctx + " (\u201c" + META.tokens[n.ctx] + "\u201d)"]);
    if (n.type === "latent") facts.push(["activation", fmt(n.act)]);
    if (n.type === "logit") facts.push(["probability", fmt(n.prob)]);
    if (n.type === "embedding" || n.type === "logit") facts.push(["token id", n.feature]);
    if (n.type !== "logit") {
      facts.push(["influence", fmt(n.influence)]);
      facts.push(["cumulative influence", fmt(n.cum)]);
    }
    facts.push(["node id", n.id]);
    if (n.label) facts.push(["label", n.label]);
    var html = ['<button class="close" title="close">\u00d7</button>', "<h2>" + esc(nodeTitle(n)) + "</h2>",
                '<table class="facts">' + facts.map(function (f) {
                  return "<tr><td>" + esc(f[0]) + "</td><td>" + esc(f[1]) + "</td></tr>";
                }).join("") + "</table>"];
    if (n.type === "latent") html.push(latentSections(n));
    if (n.type !== "embedding") html.push("<h3>Strongest inputs</h3>" + linkList(i, "in"));
    if (n.type !== "logit") html.push("<h3>Strongest outputs</h3>" + linkList(i, "out"));
    panel.innerHTML = html.join("");
    panel.classList.remove("empty");
    panel.setAttribute("data-node-id", n.id);
    panel.scrollTop = 0;
  }

  // With no node selected, the panel lists the logits and the most influential nodes.
  function overview() {
    var idx = NODES.map(function (n, i) { return i; });
    var logits = idx.filter(function (i) { return NODES[i].type === "logit"; });
    logits.sort(function (a, b) { return NODES[b].prob - NODES[a].prob; });
    var top = idx.filter(function (i) { return NODES[i].type !== "logit"; });
    top.sort(function (a, b) { return NODES[b].influence - NODES[a].influence; });
    function rows(list, value) {
      return '<div class="links">' + list.map(function (i) {
        return '<div data-goto="' + i + '"><span>' + esc(nodeTitle(NODES[i])) + "</span><span>" + value(NODES[i]) +
               "</span></div>";
      }).join("") + "</div>";
    }
    panel.innerHTML = "<h2>Click a node to see its details</h2>" +
      "<h3>Logits</h3>" + rows(logits, function (n) { return "p = " + fmt(n.prob); }) +
      "<h3>Most influential nodes</h3>" + rows(top.slice(0, 15), function (n) { return fmt(n.influence); });
    panel.classList.add("empty");
    panel.removeAttribute("data-node-id");
  }

  panel.addEventListener("click", function (ev) {
    if (ev.target.closest(".close")) { select(null); return; }
    var go = ev.target.closest("[data-goto]");
    if (go) select(+go.getAttribute("data-goto"));
  });
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") select(null); });
  overview();
  draw();
  window.dashboard = { select: select, data: DATA, redraw: draw };
})();
"""
