// The attribution-graph dashboard. Reads the JSON in #dashboard-data (written by views/dashboard.py) and
// draws nodes as SVG and edges on a canvas, only the edges asked for: the hovered, clicked and pinned
// nodes' edges, or every edge with "show all edges". Plain ES5, no libraries, no network.
(function () {
  "use strict";
  // The page as it was written (before this script changed anything): "save" writes it again with the state.
  var PAGE = "<!DOCTYPE html>\n" + document.documentElement.outerHTML;
  var DATA = JSON.parse(document.getElementById("dashboard-data").textContent);
  var META = DATA.meta, LATENTS = DATA.latents, PRUNE = DATA.prune || {shares: [], n_ranked: 0, node_max: 1};
  // The thresholds the page was written with (the sliders start there; the node slider reaches node_max).
  var OWN_NODE = PRUNE.node_own !== undefined ? PRUNE.node_own : PRUNE.node_max, OWN_EDGE = META.edge_threshold || 1;
  // The view's nodes and edges come first (drawn at first); the candidates the sliders can bring back follow.
  var EXTRA = DATA.extra || {nodes: [], edges: []};
  var NODES = DATA.nodes.concat(EXTRA.nodes), EDGES = DATA.edges.concat(EXTRA.edges);
  var nRows = META.n_layers + 2;

  // ------------------------------------------------------------------------------------------- helpers
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  function shown(s) { return String(s).replace(/\n/g, "\u23ce").replace(/\t/g, "\u2192"); }
  function tok(s) { return esc(shown(s)); }
  function fmt(x) {
    if (x === null || x === undefined) return "-";
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(2);
    return (+x.toPrecision(3)).toString();
  }
  function cut(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }
  function rowLabel(r) { return r === 0 ? "Emb" : (r === nRows - 1 ? "Logit" : "L" + (r - 1)); }
  function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }
  var POS = css("--edge-pos") || "#2563eb", NEG = css("--edge-neg") || "#dc2626";

  var byId = {};
  NODES.forEach(function (n, i) { byId[n.id] = i; n.inE = []; n.outE = []; });
  EDGES.forEach(function (e, j) { NODES[e[0]].outE.push(j); NODES[e[1]].inE.push(j); });
  var BY_KEY = {};  // latent key ("layer_feature") -> its nodes, one per position
  NODES.forEach(function (n, i) { if (n.key) (BY_KEY[n.key] = BY_KEY[n.key] || []).push(i); });
  var maxAbs = 1e-12, maxInfl = 1e-12;
  NODES.forEach(function (n) { if (n.type !== "logit") maxInfl = Math.max(maxInfl, n.influence); });

  // ------------------------------------------------------------------------------------------- state
  var state = {
    pinned: [], clicked: null, hover: null, supernodes: [], labels: {}, ticked: {}, hidden: {}, linkType: "both", colorBy: "weight", sgPos: {}, panelWidth: null,
    nodeThr: OWN_NODE, edgeThr: OWN_EDGE, showAll: false, subgraph: false
  };
  function labelOf(i) {
    var n = NODES[i];
    if (state.labels[n.id]) return {text: state.labels[n.id], derived: false};
    if (n.label) return {text: n.label, derived: false};
    var info = n.key ? LATENTS[n.key] : null;
    return info && info.derived ? {text: info.derived, derived: true} : null;
  }
  function nodeTitle(n) {
    var t = META.tokens[n.ctx];
    if (n.type === "latent") return "Latent " + n.feature + " @ layer " + n.layer + ", \u201c" + shown(t) + "\u201d";
    if (n.type === "error") return "MLP error @ layer " + n.layer + ", \u201c" + shown(t) + "\u201d";
    if (n.type === "embedding") return "Embedding \u201c" + shown(n.token) + "\u201d (pos " + n.ctx + ")";
    return "Logit \u201c" + shown(n.token) + "\u201d (p = " + fmt(n.prob) + ")";
  }

  // ------------------------------------------------------------------------------------------- pruning
  // The sliders compute `prune(result, node_t, edge_t)` (pruning.py) from what views/sliders.py embeds:
  // prune_nodes keeps the nodes of its influence ranking until their running share reaches node_t (the
  // shares are Python's own float32 numbers), plus the logits; prune_edges then scores every edge among
  // them, `B[t, s] * importance[t]` with B the row-normalised |A| and importance the influence on the
  // logits within those nodes (plus the logit weight), and keeps the best until their share reaches
  // edge_t; then the viewers' clean-up (view_graph): a latent needs an input and an output, an error
  // node an output. Weights are float32 as in Python. Where the edge cut falls is decided by float32
  // round-off the page cannot repeat (at 1.0 it falls among scores of ~1e-8), so at every slider step the
  // page takes the cut Python computed (PRUNE.cuts: the cutoff, and the few edges whose float64 score here
  // would land on the other side of it, with their verdict); off the steps it computes the cut itself.
  var F32 = Math.fround, N_VIEW = DATA.nodes.length, E_VIEW = DATA.edges.length;
  var nodeVis = NODES.map(function (n, i) { return i < N_VIEW; });
  var edgeVis = EDGES.map(function (e, j) { return j < E_VIEW; });
  var prunedKept = null;  // nodes prune keeps at the sliders' thresholds (null: Python's own result)
  var SHARES = PRUNE.shares.map(F32);
  var CAND = [], ABSW = [], AT = {};  // the edges prune_edges sees, their |weight| as float32, and by position
  EDGES.forEach(function (e, j) { if (e[3] >= 1) { AT[e[3] - 1] = CAND.length; CAND.push(j); ABSW.push(Math.abs(F32(e[2]))); } });
  var CUTS = PRUNE.cuts || {}, STEP0 = 5;  // PRUNE.cuts[k].cut[step - STEP0]: the cut at step/100
  var LOGITS = [];
  NODES.forEach(function (n, i) { if (n.lw !== undefined) LOGITS.push(i); });

  function pruneNodes(t) {
    var t32 = F32(t), k = 0;
    while (k < SHARES.length && SHARES[k] < t32) k++;
    k = Math.min(k + 1, PRUNE.n_ranked);  // n_to_cross
    var kept = new Uint8Array(NODES.length);
    NODES.forEach(function (n, i) { if ((n.rank !== undefined && n.rank < k) || n.lw !== undefined) kept[i] = 1; });
    kept.k = k;
    return kept;
  }
  // Python's cut at this node set and edge step, or null off the steps: {cut, keep: {cand: 1}, drop: {cand: 1}}.
  function shippedCut(k, t) {
    var step = Math.round(t * 100), table = CUTS[k];
    if (!table || Math.abs(t * 100 - step) > 1e-9 || step < STEP0 || step - STEP0 >= table.cut.length) return null;
    var out = {cut: F32(table.cut[step - STEP0]), keep: {}, drop: {}};
    ((table.keep || {})[step] || []).forEach(function (q) { out.keep[AT[q]] = 1; });
    ((table.drop || {})[step] || []).forEach(function (q) { out.drop[AT[q]] = 1; });
    return out;
  }
  function pruneEdges(kept, t) {
    var N = NODES.length, live = [], k, j, i;
    for (k = 0; k < CAND.length; k++) { j = CAND[k]; if (kept[EDGES[j][0]] && kept[EDGES[j][1]]) live.push(k); }
    var rowSum = new Float64Array(N);
    live.forEach(function (k) { rowSum[EDGES[CAND[k]][1]] += ABSW[k]; });
    var clamp = F32(1e-8), b = live.map(function (k) { return ABSW[k] / Math.max(rowSum[EDGES[CAND[k]][1]], clamp); });
    var v = new Float64Array(N), infl = new Float64Array(N);
    LOGITS.forEach(function (i) { v[i] = F32(NODES[i].lw); });
    for (var step = 0; step <= META.n_layers; step++) {  // influence: w B + w B^2 + ... (B is nilpotent)
      var nv = new Float64Array(N);
      for (k = 0; k < live.length; k++) { var e = EDGES[CAND[live[k]]]; nv[e[0]] += v[e[1]] * b[k]; }
      v = nv;
      for (i = 0; i < N; i++) infl[i] += v[i];
    }
    LOGITS.forEach(function (i) { infl[i] += F32(NODES[i].lw); });
    var score = live.map(function (k, q) { return b[q] * infl[EDGES[CAND[k]][1]]; });
    var keep = new Uint8Array(EDGES.length), shipped = shippedCut(kept.k, t);
    if (shipped) {
      live.forEach(function (k, q) {
        if (shipped.keep[k] || (!shipped.drop[k] && score[q] > 0 && score[q] >= shipped.cut)) keep[CAND[k]] = 1;
      });
      return keep;
    }
    var order = score.map(function (x, q) { return q; });
    order.sort(function (a, c) { return score[c] - score[a]; });
    var total = 0, acc = 0, below = 0;
    order.forEach(function (q) { total += score[q]; });
    if (total > 0) {
      var t32 = F32(t), tot32 = F32(total);
      for (k = 0; k < order.length; k++) {
        acc += score[order[k]];
        if (F32(F32(acc) / tot32) < t32) below++; else break;
      }
    }
    // n_to_cross = below + 1 scores; the last of them is the cutoff (zero once it falls among non-edges).
    var cutoff = total > 0 && below < order.length ? score[order[below]] : 0;
    live.forEach(function (k, q) { if (score[q] > 0 && score[q] >= cutoff) keep[CAND[k]] = 1; });
    return keep;
  }
  // What prune keeps at (nodeT, edgeT), after the viewers' clean-up: {nodes, edges} as 0/1 per index, and
  // {kept}: the nodes before the clean-up.
  function pruneAt(nodeT, edgeT) {
    var i, j, kept = pruneNodes(nodeT), keep = pruneEdges(kept, edgeT);
    var nodeVis = new Uint8Array(NODES.length), edgeVis = new Uint8Array(EDGES.length);
    for (j = 0; j < EDGES.length; j++) edgeVis[j] = keep[j];
    for (i = 0; i < NODES.length; i++) nodeVis[i] = NODES[i].type === "logit" ? 1 : 0;
    for (j = 0; j < EDGES.length; j++) if (keep[j]) { nodeVis[EDGES[j][0]] = 1; nodeVis[EDGES[j][1]] = 1; }
    var before = nodeVis.slice();
    var changed = true;
    while (changed) {  // view_graph's clean-up
      changed = false;
      for (i = 0; i < NODES.length; i++) {
        var n = NODES[i];
        if (!nodeVis[i] || n.type === "logit" || n.type === "embedding") continue;
        var hasIn = n.inE.some(function (j) { return edgeVis[j]; }), hasOut = n.outE.some(function (j) { return edgeVis[j]; });
        if (!hasOut || (n.type === "latent" && !hasIn)) {
          nodeVis[i] = 0; changed = true;
          n.inE.concat(n.outE).forEach(function (j) { edgeVis[j] = 0; });
        }
      }
    }
    for (i = 0; i < NODES.length; i++) if (NODES[i].type === "embedding") nodeVis[i] = 1;  // every token has one
    return {nodes: nodeVis, edges: edgeVis, kept: before};
  }
  function reprune() {
    var got = pruneAt(state.nodeThr, state.edgeThr), i;
    for (i = 0; i < NODES.length; i++) nodeVis[i] = !!got.nodes[i];
    for (i = 0; i < EDGES.length; i++) edgeVis[i] = !!got.edges[i];
    prunedKept = Array.prototype.slice.call(got.kept).map(Boolean);
    drawStats();
  }

  // At the thresholds the page was written with it shows Python's own result; elsewhere it prunes again.
  function setPruning() {
    if (state.nodeThr !== OWN_NODE || state.edgeThr !== OWN_EDGE) { reprune(); return; }
    for (var i = 0; i < NODES.length; i++) nodeVis[i] = i < N_VIEW;
    for (var j = 0; j < EDGES.length; j++) edgeVis[j] = j < E_VIEW;
    prunedKept = null;
    drawStats();
  }

  // ------------------------------------------------------------------------------------------- header
  function drawStats() {  // the counts and thresholds of what is drawn now (hidden nodes and their edges left out)
    maxAbs = 1e-12;  // edges are drawn against the strongest kept one
    for (var j = 0; j < EDGES.length; j++) if (edgeVis[j]) maxAbs = Math.max(maxAbs, Math.abs(EDGES[j][2]));
    var el = document.getElementById("stats-now");
    if (!el) return;
    var nv = 0, ev = 0, i, hidden = state.hidden;
    for (i = 0; i < NODES.length; i++) if (nodeVis[i] && !hidden[i]) nv++;
    for (i = 0; i < EDGES.length; i++) if (edgeVis[i] && !hidden[EDGES[i][0]] && !hidden[EDGES[i][1]]) ev++;
    el.innerHTML = "<span>nodes <b>" + nv + "</b> of " + META.n_nodes_full + "</span>" +
      "<span>edges <b>" + ev + "</b></span>" +
      "<span>node threshold <b>" + fmt(state.nodeThr) + "</b></span>" +
      "<span>edge threshold <b>" + fmt(state.edgeThr) + "</b></span>";
  }
  (function header() {
    var s = META.settings || {};
    var parts = [
      "<h1>Attribution graph</h1>",
      '<div class="prompt">' + tok(META.prompt) + "</div>",
      '<div class="stats">',
      '<span id="stats-now"></span>',
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
    drawStats();
    var names = META.kind_names || {};
    function sw(kind, round) {
      var v = kind === "error" ? "mlp-error" : kind;
      return '<span><span class="sw" style="background:var(--' + v + "-fill);border-color:var(--" + v + "-stroke)" +
             (round ? ";border-radius:6px" : "") + '"></span>' + esc(names[kind] || kind) + "</span>";
    }
    document.getElementById("legend").innerHTML = [
      sw("embedding"), sw("latent", true), sw("error"), sw("logit"),
      '<span><span class="sw" style="background:var(--edge-pos);height:3px"></span>positive edge</span>',
      '<span><span class="sw" style="background:var(--edge-neg);height:3px"></span>negative edge</span>',
      '<span class="muted">size: influence &middot; hover: edges &middot; click: details &middot; ctrl/shift-click: ' +
        "pin &middot; wheel: zoom &middot; drag: pan</span>"
    ].join("");
  })();

  // ------------------------------------------------------------------------------------------- layout
  // An item is what the graph draws: one node, or a supernode (in the subgraph view).
  var graphEl = document.getElementById("graph"), wrapEl = document.getElementById("graph-wrap");
  var svgEl = document.getElementById("graph-svg"), nodesG = document.getElementById("nodes");
  var axesG = document.getElementById("axes"), canvas = document.getElementById("edge-canvas");
  var ctx2d = canvas.getContext("2d");
  var items = [], itemOf = {}, itemEls = [], drawnEdges = [];
  var masked = META.settings && META.settings.start_posn !== undefined ? META.settings.start_posn : 0;
  var rowH = Math.max(26, Math.min(64, Math.floor(560 / nRows)));
  var left = 44, top = 26, bottom = 84, W = 0, H = 0, colX = {}, cols = [];
  var view = {k: 1, x: 0, y: 0};

  function superOf(i) {
    for (var s = 0; s < state.supernodes.length; s++) if (state.supernodes[s].members.indexOf(i) >= 0) return s;
    return -1;
  }

  function buildItems() {
    items = []; itemOf = {};
    if (state.subgraph) {
      state.pinned.forEach(function (i) {
        if (superOf(i) < 0) { itemOf[i] = items.length; items.push({node: i}); }
      });
      state.supernodes.forEach(function (sn, s) {
        var k = items.length;
        items.push({sup: s});
        sn.members.forEach(function (i) { itemOf[i] = k; });
      });
    } else {
      NODES.forEach(function (n, i) { if (nodeVis[i] && !state.hidden[i]) { itemOf[i] = items.length; items.push({node: i}); } });
    }
    items.forEach(function (it) {
      if (it.sup === undefined) {
        var n = NODES[it.node];
        it.type = n.type; it.row = n.row; it.ctx = n.ctx; it.influence = n.influence;
      } else {
        var m = state.supernodes[it.sup].members;
        it.type = "super";
        it.row = Math.round(m.reduce(function (a, i) { return a + NODES[i].row; }, 0) / m.length);
        it.ctx = Math.max.apply(null, m.map(function (i) { return NODES[i].ctx; }));
        it.influence = m.reduce(function (a, i) { return a + NODES[i].influence; }, 0);
      }
    });
  }

  // Fit the graph to the width available: nodes that share a (row, token) cell are spread across the
  // token's column; spacing shrinks down to 3 px before anything overlaps (then zoom in).
  function layout() {
    var avail = Math.max(240, wrapEl.clientWidth - 16);
    var cells = {}, perCol = {}, logitCol = {};
    items.forEach(function (it, k) { (cells[it.row + "_" + it.ctx] = cells[it.row + "_" + it.ctx] || []).push(k); });
    Object.keys(cells).forEach(function (key) {
      var c = cells[key];
      c.sort(function (a, b) {
        var ea = items[a].type === "error" ? 1 : 0, eb = items[b].type === "error" ? 1 : 0;
        return ea - eb || items[b].influence - items[a].influence;
      });
      var p = items[c[0]].ctx;
      if (items[c[0]].type === "logit") logitCol[p] = Math.max(logitCol[p] || 0, c.length);
      else perCol[p] = Math.max(perCol[p] || 0, c.length);
    });
    cols = [];
    META.tokens.forEach(function (t, p) {
      if (!state.subgraph || perCol[p] || logitCol[p]) cols.push(p);
    });
    // The subgraph has few nodes, each labelled: give every node room for its label.
    var logitSpacing = state.subgraph ? 150 : 44, minCol = state.subgraph ? 170 : 16;
    function widths(sp) {
      return cols.map(function (p) { return Math.max(minCol, (perCol[p] || 1) * sp + 4, (logitCol[p] || 0) * logitSpacing); });
    }
    var sp = state.subgraph ? 170 : 14, ws = widths(sp), sum = function (a) { return a.reduce(function (x, y) { return x + y; }, 0); };
    while (sum(ws) > avail - left - 10 && sp > 3) { sp -= 0.5; ws = widths(sp); }
    if (sum(ws) > avail - left - 10) {  // still too wide: squeeze every column alike
      var f = (avail - left - 10) / sum(ws);
      ws = ws.map(function (w) { return w * f; }); logitSpacing *= f; sp *= f;
    }
    var stretch = Math.min(4, (avail - left - 10) / sum(ws));
    if (stretch > 1) ws = ws.map(function (w) { return w * stretch; });
    colX = {};
    var acc = left;
    cols.forEach(function (p, c) { colX[p] = acc + ws[c] / 2; acc += ws[c]; });
    W = Math.max(avail, acc + 10); H = top + nRows * rowH + bottom;
    var rScale = Math.max(0.45, Math.min(1, sp / 14));
    Object.keys(cells).forEach(function (key) {
      var c = cells[key], m = c.length;
      c.forEach(function (k, j) {
        var it = items[k], logit = it.type === "logit";
        it.bx = colX[it.ctx] + (j - (m - 1) / 2) * (logit ? logitSpacing : sp);
        it.by = top + (nRows - 1 - it.row) * rowH + rowH / 2;
        var share = it.type === "logit" ? (NODES[it.node].prob || 0) : Math.max(it.influence, 0) / maxInfl;
        it.r = it.type === "super" ? 9 : (logit ? 1 : rScale) * (3 + 5 * Math.sqrt(Math.min(1, share)));
        var moved = state.subgraph ? state.sgPos[itemKey(it)] : null;  // where the learner dragged it
        if (moved) { it.bx = moved[0]; it.by = moved[1]; }
      });
    });
  }
  // A subgraph item's name in the saved positions: its node id, or its supernode's name.
  function itemKey(it) { return it.sup === undefined ? NODES[it.node].id : "supernode:" + state.supernodes[it.sup].name; }
  function sx(x) { return x * view.k + view.x; }
  function sy(y) { return y * view.k + view.y; }

  // Labels: every pinned node's (and in the subgraph every node's), then the most influential latents'.
  // Each takes the first free spot around its node (right, left, above, below): a spot is free when it
  // covers no node and no other label, at any width. Pinned and subgraph labels move further out if they
  // must; a label with no free spot is left out (the tooltip and the pins bar still name it).
  var measure = document.createElement("canvas").getContext("2d"), tokMeasure = document.createElement("canvas").getContext("2d");
  measure.font = "10px " + getComputedStyle(document.body).fontFamily;
  tokMeasure.font = "11px ui-monospace, \"DejaVu Sans Mono\", monospace";  // .tok, as the stylesheet sets it
  function textWidth(text) { return measure.measureText(text).width; }
  function extent(ctx, fallback) {  // [ascent, descent] of a font: the height a text's box takes
    var m = ctx.measureText("Hg");
    return [m.fontBoundingBoxAscent || fallback[0], m.fontBoundingBoxDescent || fallback[1]];
  }
  var LAB_H = extent(measure, [9.5, 2.5]), TOK_H = extent(tokMeasure, [10.5, 3]);
  var SPOTS = [[1, 0], [-1, 0], [1, -1], [1, 1], [-1, -1], [-1, 1], [1, -2], [1, 2], [-1, -2], [-1, 2], [0, -1], [0, 1]];
  function placeLabels() {
    // The taken boxes, in a grid of 40 px cells (a spot is checked against the boxes of its cells only).
    var place = {}, grid = {}, CELL = 40;
    function cells(b, fn) {
      for (var gx = Math.floor(b[0] / CELL); gx <= Math.floor(b[2] / CELL); gx++)
        for (var gy = Math.floor(b[1] / CELL); gy <= Math.floor(b[3] / CELL); gy++) if (fn(gx + "," + gy) === false) return false;
      return true;
    }
    var boxes = {push: function (b) { cells(b, function (key) { (grid[key] = grid[key] || []).push(b); }); }};
    function free(b) {
      return cells(b, function (key) {
        var list = grid[key] || [];
        for (var q = 0; q < list.length; q++) {
          var o = list[q];
          if (b[0] < o[2] && o[0] < b[2] && b[1] < o[3] && o[1] < b[3]) return false;
        }
      });
    }
    items.forEach(function (it) {  // every node's shape (a pixel around it), and the logits' token labels above them
      var x = sx(it.bx), y = sy(it.by), h = (it.type === "error" ? Math.max(2.5, it.r * 0.8) : it.r) + 1;
      boxes.push([x - h, y - h, x + h, y + h]);
      if (it.type !== "logit") return;
      var w = tokMeasure.measureText(cut(shown(NODES[it.node].token), 10)).width + 2, yb = y - it.r - 4;
      boxes.push([x - w / 2, yb - TOK_H[0], x + w / 2, yb + TOK_H[1]]);
    });
    function tryPlace(k, always) {
      var it = items[k], l = itemLabel(it);
      if (!l || !l.text || it.type === "logit") return false;
      var text = cut(l.text, 22), w = textWidth(text) + 2, x = sx(it.bx), y = sy(it.by), r = it.r;
      for (var reach = 0; reach < (always ? 8 : 1); reach++) {
        for (var q = 0; q < SPOTS.length; q++) {
          var side = SPOTS[q][0], dy = SPOTS[q][1] * 12 + (SPOTS[q][1] < 0 ? -reach * 24 : reach * 24);
          var dx = side === 0 ? -w / 2 : side * (r + 3), x0 = side < 0 ? x + dx - w : x + dx, yb = y + dy + 3;
          var box = [x0, yb - LAB_H[0], x0 + w, yb + LAB_H[1]];
          if (free(box)) {
            boxes.push(box);
            place[k] = {text: text, derived: l.derived, dx: dx, dy: dy + 3, anchor: side < 0 ? "end" : "start"};
            return true;
          }
        }
      }
      return false;
    }
    var order = items.map(function (it, k) { return k; });
    order.sort(function (a, b) { return items[b].influence - items[a].influence; });
    if (state.subgraph) { order.forEach(function (k) { tryPlace(k, true); }); return place; }
    state.pinned.forEach(function (i) { if (itemOf[i] !== undefined) tryPlace(itemOf[i], true); });
    var n = 0;
    order.forEach(function (k) {
      if (n < 10 && items[k].type === "latent" && !place[k] && tryPlace(k, false)) n++;
    });
    return place;
  }
  function itemLabel(it) {
    if (it.type === "super") return {text: state.supernodes[it.sup].name, derived: false};
    var n = NODES[it.node];
    if (n.type === "logit") return {text: shown(n.token), derived: false};
    if (state.subgraph && n.type !== "latent") return {text: nodeTitle(n), derived: false};
    return n.type === "latent" ? labelOf(it.node) : null;
  }

  function drawNodes() {
    var out = [], lab = placeLabels();
    items.forEach(function (it, k) {
      var cls = "node " + it.type, attrs;
      if (it.type === "super") {
        attrs = ' data-node-id="supernode-' + it.sup + '" data-type="super" data-supernode="' + it.sup + '"';
      } else {
        var n = NODES[it.node];
        if (state.pinned.indexOf(it.node) >= 0) cls += " pinned";
        if (it.node === state.clicked) cls += " selected";
        if (!state.subgraph && superOf(it.node) >= 0) cls += " member";
        attrs = ' data-node-id="' + esc(n.id) + '" data-type="' + n.type + '" data-index="' + it.node + '"';
      }
      var shape, r = it.r;
      if (it.type === "latent" || it.type === "super") shape = '<circle class="shape" r="' + r.toFixed(1) + '"></circle>';
      else {
        var h = it.type === "error" ? Math.max(2.5, r * 0.8) : r;
        shape = '<rect class="shape" x="' + (-h).toFixed(1) + '" y="' + (-h).toFixed(1) + '" width="' + (2 * h).toFixed(1) +
                '" height="' + (2 * h).toFixed(1) + '" rx="2"></rect>';
      }
      var text = "";
      if (it.type === "logit") {
        text = '<text class="tok lab" y="' + (-r - 4).toFixed(1) + '" text-anchor="middle">' + esc(cut(shown(NODES[it.node].token), 10)) + "</text>";
      } else if (lab[k]) {
        var l = lab[k];
        text = '<text class="lab' + (l.derived ? " derived" : "") + '" x="' + l.dx.toFixed(1) + '" y="' + l.dy.toFixed(1) +
               '" text-anchor="' + l.anchor + '">' + esc(l.text) + "</text>";
      }
      out.push('<g class="' + cls + '"' + attrs + ' data-item="' + k + '" tabindex="0" role="button" aria-label="' +
               esc(it.type === "super" ? "supernode " + state.supernodes[it.sup].name : nodeTitle(NODES[it.node])) +
               '" transform="translate(' + sx(it.bx).toFixed(1) + "," + sy(it.by).toFixed(1) + ')">' + shape + text + "</g>");
    });
    nodesG.innerHTML = out.join("");
    itemEls = [];
    var els = nodesG.children;
    for (var k = 0; k < els.length; k++) itemEls[k] = els[k];
  }

  function drawAxes() {
    var out = [];
    for (var r = 0; r < nRows; r++) {
      var y = sy(top + (nRows - 1 - r) * rowH + rowH / 2);
      out.push('<line class="gridline" x1="' + left + '" x2="' + (W - 4) + '" y1="' + y.toFixed(1) + '" y2="' + y.toFixed(1) + '"></line>');
      out.push('<text class="axis" x="' + (left - 6) + '" y="' + (y + 4).toFixed(1) + '" text-anchor="end">' + rowLabel(r) + "</text>");
    }
    var ty = H - bottom + 14;
    cols.forEach(function (p) {
      var x = sx(colX[p]);
      if (x < left - 5 || x > W + 5) return;
      out.push('<text class="tok' + (p < masked ? " masked" : "") + '" x="' + x.toFixed(1) + '" y="' + ty +
               '" text-anchor="end" transform="rotate(-35 ' + x.toFixed(1) + " " + ty + ')">' + esc(cut(shown(META.tokens[p]), 14)) + "</text>");
    });
    axesG.innerHTML = out.join("");
  }

  function moveNodes() {
    items.forEach(function (it, k) {
      itemEls[k].setAttribute("transform", "translate(" + sx(it.bx).toFixed(1) + "," + sy(it.by).toFixed(1) + ")");
    });
  }

  // ------------------------------------------------------------------------------------------- edges
  // A focused node's drawn edges: its inputs, its outputs or both (the "edges" filter).
  function focusEdges(i) {
    var n = NODES[i], js = state.linkType === "in" ? n.inE : state.linkType === "out" ? n.outE : n.inE.concat(n.outE);
    return js.filter(function (j) { return edgeVis[j] && itemOf[EDGES[j][0]] !== undefined && itemOf[EDGES[j][1]] !== undefined; });
  }
  // Which edges to draw: [source item, target item, weight, edge index or -1 for a summed edge].
  function edgesToDraw() {
    var list = [];
    if (state.subgraph) {  // every edge among the shown items; a supernode's edges are its members' sums
      var sums = {};
      EDGES.forEach(function (e, j) {
        if (!edgeVis[j]) return;
        var a = itemOf[e[0]], b = itemOf[e[1]];
        if (a === undefined || b === undefined || a === b) return;
        var key = a + ">" + b;
        if (!sums[key]) sums[key] = [a, b, 0, items[a].sup === undefined && items[b].sup === undefined ? j : -1];
        else sums[key][3] = -1;
        sums[key][2] += e[2];
      });
      Object.keys(sums).forEach(function (key) { list.push(sums[key]); });
      return list;
    }
    var pick = {}, focus = [];
    if (state.hover !== null && items[state.hover] && items[state.hover].node !== undefined) focus.push(items[state.hover].node);
    if (state.clicked !== null) focus.push(state.clicked);
    focus = focus.concat(state.pinned);
    if (state.showAll) {  // the same list until the graph changes (render() drops it): hovers reuse it
      if (!allEdges) {
        allEdges = [];
        EDGES.forEach(function (e, j) {
          if (edgeVis[j] && itemOf[e[0]] !== undefined && itemOf[e[1]] !== undefined) allEdges.push([itemOf[e[0]], itemOf[e[1]], e[2], j]);
        });
      }
      return allEdges;
    }
    focus.forEach(function (i) { focusEdges(i).forEach(function (j) { pick[j] = true; }); });
    Object.keys(pick).forEach(function (j) {
      var e = EDGES[j];
      if (itemOf[e[0]] !== undefined && itemOf[e[1]] !== undefined) list.push([itemOf[e[0]], itemOf[e[1]], e[2], +j]);
    });
    return list;
  }

  // Where an edge runs: a straight line, or in the subgraph a curve when both ends share a column (edges
  // between nodes at one token would otherwise lie on top of each other): positive edges bend right,
  // negative ones left, further the more rows they span.
  function edgeShape(d) {
    var s = items[d[0]], t = items[d[1]], x1 = sx(s.bx), y1 = sy(s.by), x2 = sx(t.bx), y2 = sy(t.by);
    var g = {x1: x1, y1: y1, x2: x2, y2: y2, cx: null, cy: null};
    if (state.subgraph && Math.abs(x2 - x1) < 24) {
      g.cx = (x1 + x2) / 2 + (d[2] >= 0 ? 1 : -1) * (0.5 * Math.abs(y2 - y1) + 8); g.cy = (y1 + y2) / 2;
    }
    return g;
  }
  function tracePath(g) {
    ctx2d.moveTo(g.x1, g.y1);
    if (g.cx === null) ctx2d.lineTo(g.x2, g.y2); else ctx2d.quadraticCurveTo(g.cx, g.cy, g.x2, g.y2);
  }
  // How strongly an edge is drawn, in [0, 1]: its |weight| against the largest, or (colour by "share")
  // its share of its target's input, |w| over the target's drawn inputs (a supernode's: its members').
  var shareTotals = null;  // per node, the |weights| of its drawn inputs; render() drops it
  function strength(d, scale) {
    if (state.colorBy !== "share") return Math.min(1, Math.abs(d[2]) / scale);
    if (!shareTotals) {
      shareTotals = new Float64Array(NODES.length);
      EDGES.forEach(function (e, j) { if (edgeVis[j]) shareTotals[e[1]] += Math.abs(e[2]); });
    }
    var t = items[d[1]], tot = t.sup === undefined ? shareTotals[t.node] :
      state.supernodes[t.sup].members.reduce(function (a, i) { return a + shareTotals[i]; }, 0);
    return tot > 0 ? Math.min(1, Math.abs(d[2]) / tot) : 0;
  }
  var LEVELS = 8;  // edges are drawn in this many strengths, one path each: 30k edges cost 16 strokes
  function strokeBuckets(ctx, buckets, dim) {
    ctx.lineCap = "round";
    buckets.forEach(function (list, k) {  // weak first, so the strong lie on top
      if (!list) return;
      var a = (k >> 1) / (LEVELS - 1);
      ctx.globalAlpha = dim ? 0.06 : 0.2 + 0.7 * a;
      ctx.strokeStyle = k & 1 ? NEG : POS;
      ctx.lineWidth = 0.5 + 3.5 * a;
      ctx.beginPath();
      list.forEach(function (d) {
        var g = edgeShape(d);
        ctx.moveTo(g.x1, g.y1);
        if (g.cx === null) ctx.lineTo(g.x2, g.y2); else ctx.quadraticCurveTo(g.cx, g.cy, g.x2, g.y2);
      });
      ctx.stroke();
    });
    ctx.globalAlpha = 1;
  }
  // With "show all", every edge is painted once per view into two bitmaps (plain, and dimmed under a
  // focused node); a hover then copies one and draws only the focused node's edges. While the wheel or
  // a drag moves the view, the bitmap is moved along; once it rests the edges are painted again.
  var allCache = null;
  function bitmap(dpr, buckets, dim) {
    var c = document.createElement("canvas");
    c.width = canvas.width; c.height = canvas.height;
    var cx = c.getContext("2d");
    cx.setTransform(dpr, 0, 0, dpr, 0, 0);
    strokeBuckets(cx, buckets, dim);
    return c;
  }
  function drawEdges(quick) {
    var dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
      canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
      canvas.style.width = W + "px"; canvas.style.height = H + "px";
    }
    ctx2d.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx2d.clearRect(0, 0, W, H);
    drawnEdges = edgesToDraw();
    if (state.showAll && !state.subgraph) { drawAllEdges(dpr, quick); return; }
    var localMax = 1e-12;
    drawnEdges.forEach(function (d) { localMax = Math.max(localMax, Math.abs(d[2])); });
    var scale = state.subgraph ? localMax : maxAbs, buckets = [];
    drawnEdges.forEach(function (d) {
      var lv = Math.round(strength(d, scale) * (LEVELS - 1)), k = 2 * lv + (d[2] >= 0 ? 0 : 1);
      (buckets[k] = buckets[k] || []).push(d);
    });
    strokeBuckets(ctx2d, buckets, false);
  }
  function drawTop(top, scale) {  // the focused node's edges, one by one, strongest last
    top.sort(function (a, b) { return Math.abs(a[2]) - Math.abs(b[2]); });
    ctx2d.lineCap = "round";
    top.forEach(function (d) {
      var a = strength(d, scale);
      ctx2d.globalAlpha = 0.2 + 0.7 * a; ctx2d.strokeStyle = d[2] >= 0 ? POS : NEG; ctx2d.lineWidth = 0.5 + 3.5 * a;
      ctx2d.beginPath(); tracePath(edgeShape(d)); ctx2d.stroke();
    });
    ctx2d.globalAlpha = 1;
  }
  function drawAllEdges(dpr, quick) {
    var f = state.hover !== null && items[state.hover] ? items[state.hover].node : state.clicked, top = [];
    if (f !== undefined && f !== null) {
      focusEdges(f).forEach(function (j) { top.push([itemOf[EDGES[j][0]], itemOf[EDGES[j][1]], EDGES[j][2], j]); });
    }
    var fresh = allCache && allCache.list === drawnEdges && allCache.w === canvas.width && allCache.h === canvas.height &&
      allCache.k === view.k && allCache.x === view.x && allCache.y === view.y;
    if (!fresh && !(quick && allCache && allCache.list === drawnEdges)) {
      var buckets = [];
      drawnEdges.forEach(function (d) {
        var lv = Math.round(strength(d, maxAbs) * (LEVELS - 1)), k = 2 * lv + (d[2] >= 0 ? 0 : 1);
        (buckets[k] = buckets[k] || []).push(d);
      });
      // The dimmed bitmap is painted the first time a node is focused, not with every new graph.
      allCache = {list: drawnEdges, w: canvas.width, h: canvas.height, k: view.k, x: view.x, y: view.y,
                  plain: bitmap(dpr, buckets, false), dim: null, buckets: buckets};
      fresh = true;
    }
    var s = view.k / allCache.k;  // the bitmap's view moved to this one (exact when fresh)
    ctx2d.setTransform(dpr * s, 0, 0, dpr * s, dpr * (view.x - allCache.x * s), dpr * (view.y - allCache.y * s));
    if (top.length && !allCache.dim) allCache.dim = bitmap(dpr, allCache.buckets, true);
    ctx2d.drawImage(top.length ? allCache.dim : allCache.plain, 0, 0, W, H);
    ctx2d.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawTop(top, maxAbs);
  }

  // The drawn edge nearest to a point (within 5 px), for the edge tooltip; a curve is checked in pieces.
  function edgeAt(px, py) {
    var best = null, bestD = 25;
    function seg(x1, y1, x2, y2, d) {
      var dx = x2 - x1, dy = y2 - y1, l2 = dx * dx + dy * dy;
      var u = l2 > 0 ? Math.max(0, Math.min(1, ((px - x1) * dx + (py - y1) * dy) / l2)) : 0;
      var ex = x1 + u * dx - px, ey = y1 + u * dy - py, dd = ex * ex + ey * ey;
      if (dd < bestD) { bestD = dd; best = d; }
    }
    drawnEdges.forEach(function (d) {
      var g = edgeShape(d);
      if (g.cx === null) { seg(g.x1, g.y1, g.x2, g.y2, d); return; }
      var px0 = g.x1, py0 = g.y1;
      for (var k = 1; k <= 16; k++) {
        var u = k / 16, v = 1 - u;
        var qx = v * v * g.x1 + 2 * u * v * g.cx + u * u * g.x2, qy = v * v * g.y1 + 2 * u * v * g.cy + u * u * g.y2;
        seg(px0, py0, qx, qy, d); px0 = qx; py0 = qy;
      }
    });
    return best;
  }

  // ------------------------------------------------------------------------------------------- focus
  var lit = [];
  function highlight() {
    lit.forEach(function (el) { el.classList.remove("hl", "nb", "same"); });
    lit = [];
    var f = state.hover !== null && items[state.hover] ? state.hover : (state.clicked !== null ? itemOf[state.clicked] : undefined);
    if (f === undefined || f === null || state.subgraph) return;
    itemEls[f].classList.add("hl"); lit.push(itemEls[f]);
    var it = items[f];
    if (it.node === undefined) return;
    var n = NODES[it.node];
    focusEdges(it.node).forEach(function (j) {
      var e = EDGES[j], other = itemOf[e[0] === it.node ? e[1] : e[0]];
      if (other !== undefined) { itemEls[other].classList.add("nb"); lit.push(itemEls[other]); }
    });
    // The same latent at every other position lights up too.
    if (n.key) (BY_KEY[n.key] || []).forEach(function (i) {
      var k = itemOf[i];
      if (i !== it.node && k !== undefined && items[k].node === i) { itemEls[k].classList.add("same"); lit.push(itemEls[k]); }
    });
  }

  var allEdges = null;  // every drawn edge with "show all" on, kept between hovers
  function render() {  // the whole graph: items, layout, nodes, axes, edges
    allEdges = null; shareTotals = null; allCache = null;
    buildItems(); layout();
    svgEl.setAttribute("width", W); svgEl.setAttribute("height", H);
    graphEl.style.height = H + "px";
    if (state.hover !== null && !items[state.hover]) state.hover = null;
    drawNodes(); drawAxes(); drawEdges(); highlight(); drawPins(); drawStats(); fitPanel(); persist();
  }
  function refresh() { drawEdges(); highlight(); }

  // ------------------------------------------------------------------------------------------- events
  var tip = document.getElementById("tooltip");
  function itemFromEvent(ev) {
    var el = ev.target.closest ? ev.target.closest(".node") : null;
    return el ? +el.getAttribute("data-item") : null;
  }
  function showTip(text, ev) {
    tip.textContent = text; tip.classList.remove("hidden");
    tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
  }
  function itemTip(k) {
    var it = items[k];
    if (it.type === "super") {
      var sn = state.supernodes[it.sup];
      return "Supernode \u201c" + sn.name + "\u201d: " + sn.members.length + " nodes\n" +
             sn.members.map(function (i) { return nodeTitle(NODES[i]); }).join("\n");
    }
    var n = NODES[it.node], lines = [nodeTitle(n)], l = labelOf(it.node);
    if (l && n.type === "latent") lines.push((l.derived ? "label (derived): " : "label: ") + l.text);
    if (n.type === "latent") lines.push("activation " + fmt(n.act));
    if (n.type !== "logit") lines.push("influence " + fmt(n.influence));
    lines.push(n.inE.filter(function (j) { return edgeVis[j]; }).length + " in, " +
               n.outE.filter(function (j) { return edgeVis[j]; }).length + " out edges");
    return lines.join("\n");
  }
  function setHover(k) { if (state.hover === k) return; state.hover = k; refresh(); }

  graphEl.addEventListener("mouseover", function (ev) {
    var k = itemFromEvent(ev);
    if (k === null) return;
    setHover(k);
    showTip(itemTip(k), ev);
  });
  graphEl.addEventListener("mouseout", function (ev) {
    if (itemFromEvent(ev) === null) return;
    tip.classList.add("hidden");
    setHover(null);
  });
  graphEl.addEventListener("mouseleave", function () { tip.classList.add("hidden"); });
  var drag = null;
  graphEl.addEventListener("mousemove", function (ev) {
    if (drag) {
      var dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved && drag.item !== null) {
        var it = items[drag.item];
        it.bx = drag.bx + dx / view.k; it.by = drag.by + dy / view.k;
        state.sgPos[itemKey(it)] = [Math.round(it.bx), Math.round(it.by)];
        moveNodes(); drawEdges();
      } else if (drag.moved) {
        graphEl.classList.add("panning");
        view.x = drag.vx + dx; view.y = drag.vy + dy;
        moveNodes(); drawAxes(); drawEdges(true);
      }
      return;
    }
    if (itemFromEvent(ev) !== null) {
      tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
      return;
    }
    var r = graphEl.getBoundingClientRect(), d = edgeAt(ev.clientX - r.left, ev.clientY - r.top);
    if (d) {
      var a = items[d[0]], b = items[d[1]];
      var name = function (it) { return it.type === "super" ? "supernode " + state.supernodes[it.sup].name : nodeTitle(NODES[it.node]); };
      showTip(name(a) + "\n\u2192 " + name(b) + "\nweight " + fmt(d[2]) + (d[3] < 0 ? " (sum of members' edges)" : ""), ev);
    } else tip.classList.add("hidden");
  });
  graphEl.addEventListener("mousedown", function (ev) {
    if (ev.button !== 0) return;
    var k = itemFromEvent(ev);
    if (k !== null && !state.subgraph) return;
    // In the subgraph a node can be dragged to where it reads best (its place is saved); elsewhere the view pans.
    drag = {x: ev.clientX, y: ev.clientY, vx: view.x, vy: view.y, moved: false, item: k,
            bx: k !== null ? items[k].bx : 0, by: k !== null ? items[k].by : 0};
  });
  window.addEventListener("mouseup", function () {
    if (drag && drag.moved) {
      if (drag.item !== null) { drawNodes(); highlight(); persist(); }
      setTimeout(function () { drag = null; }, 0); drawEdges();
    } else drag = null;
    graphEl.classList.remove("panning");
  });
  // Inline in a notebook the wheel scrolls the notebook, unless the graph has the focus (click it) or a
  // modifier key is held; a page of its own zooms with the plain wheel.
  var INLINE = (function () { try { return window.self !== window.top; } catch (err) { return true; } })();
  var wheelHinted = false, relabelTimer = null;
  function graphHasFocus() { return graphEl.contains(document.activeElement); }
  graphEl.addEventListener("wheel", function (ev) {
    if (INLINE && !graphHasFocus() && !(ev.ctrlKey || ev.metaKey || ev.altKey || ev.shiftKey)) {
      if (!wheelHinted) { wheelHinted = true; say("to zoom, click the graph first (or hold ctrl while scrolling)"); }
      return;  // not prevented: the notebook scrolls
    }
    ev.preventDefault();
    var r = graphEl.getBoundingClientRect(), px = ev.clientX - r.left, py = ev.clientY - r.top;
    var k = Math.max(0.5, Math.min(40, view.k * Math.exp(-ev.deltaY * 0.0015)));
    view.x = px - (px - view.x) * k / view.k; view.y = py - (py - view.y) * k / view.k; view.k = k;
    moveNodes(); drawAxes(); drawEdges(true);
    clearTimeout(relabelTimer);  // once the wheel rests, place the labels and paint the edges again
    relabelTimer = setTimeout(function () {
      var focused = graphHasFocus();
      drawNodes(); highlight(); drawEdges();
      if (focused) graphEl.focus({preventScroll: true});
    }, 200);
  }, {passive: false});
  graphEl.addEventListener("click", function (ev) {
    if (drag && drag.moved) return;
    var k = itemFromEvent(ev);
    if (k === null) { select(null); return; }
    var it = items[k];
    if (it.sup !== undefined) { select(null); showSupernode(it.sup); return; }
    if (ev.ctrlKey || ev.shiftKey || ev.metaKey) togglePin(it.node); else select(it.node);
  });
  graphEl.addEventListener("focusin", function (ev) { var k = itemFromEvent(ev); if (k !== null) setHover(k); });
  graphEl.addEventListener("focusout", function () { setHover(null); });
  graphEl.addEventListener("keydown", function (ev) {
    var k = itemFromEvent(ev);
    if (k === null || items[k].node === undefined) return;
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(items[k].node); }
    else if (ev.key === "p") togglePin(items[k].node);
  });
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") select(null); });

  // ------------------------------------------------------------------------------------------- pins and supernodes
  var status = document.getElementById("status");
  function say(text) { status.textContent = text; }
  // A supernode's members are pinned nodes: unpinning one takes it out of its group (a group left with one
  // member is dissolved), so the pins, the groups and the subgraph's scores always agree.
  function togglePin(i) {
    var k = state.pinned.indexOf(i);
    if (k >= 0) {
      state.pinned.splice(k, 1); delete state.ticked[i];
      var s = superOf(i);
      if (s >= 0) {
        var sn = state.supernodes[s];
        sn.members.splice(sn.members.indexOf(i), 1);
        if (sn.members.length < 2) { state.supernodes.splice(s, 1); say("unpinned; supernode \u201c" + sn.name + "\u201d dissolved"); }
        else say("unpinned; removed from supernode \u201c" + sn.name + "\u201d");
      }
    } else state.pinned.push(i);
    render();
    if (state.clicked !== null) select(state.clicked);
  }
  // The pinned subgraph's scores, as compute_graph_scores (scores.py) computes a graph's, on the drawn
  // graph with every drawn latent that is not pinned treated as an error node (its inputs cut): the
  // replacement score is the share of the logits' influence that ends at embeddings rather than at
  // errors; the completeness score the influence-weighted share of each node's input not from errors.
  function subgraphScores() {
    if (!state.pinned.length) return null;
    var N = NODES.length, pinned = {}, errLike = new Uint8Array(N), i, j, k;
    state.pinned.forEach(function (p) { pinned[p] = true; });
    NODES.forEach(function (n, q) {
      if (nodeVis[q] && (n.type === "error" || (n.type === "latent" && !pinned[q]))) errLike[q] = 1;
    });
    var live = [], rowSum = new Float64Array(N), fromErr = new Float64Array(N);
    EDGES.forEach(function (e, q) { if (edgeVis[q] && !errLike[e[1]]) live.push(q); });
    live.forEach(function (q) {
      var e = EDGES[q], a = Math.abs(e[2]);
      rowSum[e[1]] += a; if (errLike[e[0]]) fromErr[e[1]] += a;
    });
    var v = new Float64Array(N), infl = new Float64Array(N), w = new Float64Array(N);
    LOGITS.forEach(function (q) { w[q] = F32(NODES[q].lw); });
    v.set(w);
    for (k = 0; k <= META.n_layers; k++) {
      var nv = new Float64Array(N);
      live.forEach(function (q) { var e = EDGES[q]; nv[e[0]] += v[e[1]] * Math.abs(e[2]) / Math.max(rowSum[e[1]], 1e-8); });
      v = nv;
      for (i = 0; i < N; i++) infl[i] += v[i];
    }
    var emb = 0, err = 0, num = 0, den = 0;
    for (i = 0; i < N; i++) {
      if (!nodeVis[i]) continue;
      if (NODES[i].type === "embedding") emb += infl[i];
      if (errLike[i]) err += infl[i];
      var weight = infl[i] + w[i], share = rowSum[i] > 0 ? 1 - fromErr[i] / rowSum[i] : 1;
      num += share * weight; den += weight;
    }
    j = emb + err;
    return {replacement: j > 0 ? emb / j : 0, completeness: den > 0 ? num / den : 0};
  }
  // Suggested supernodes: among the pinned latents (or, with fewer than two pinned, the drawn ones), those
  // that are one latent at several positions, or that fire on the same contexts of the example corpus
  // (without examples: whose decoder directions agree) (DATA.similar, from views/suggestions.py), joined
  // transitively as suggestions.suggested_groups joins them.
  var suggestions = [];
  function suggestSupernodes() {
    var pool = state.pinned.filter(function (i) { return NODES[i].type === "latent" && superOf(i) < 0; });
    if (pool.length < 2) pool = NODES.map(function (n, i) { return i; }).filter(function (i) {
      return nodeVis[i] && !state.hidden[i] && NODES[i].type === "latent" && superOf(i) < 0;
    });
    var parent = {}, why = {};
    function root(i) { while (parent[i] !== i) i = parent[i] = parent[parent[i]]; return i; }
    function join(a, b, reason) { a = root(a); b = root(b); if (a !== b) { parent[b] = a; why[a] = (why[a] || []).concat(why[b] || [], [reason]); } }
    pool.forEach(function (i) { parent[i] = i; });
    var atKey = {};
    pool.forEach(function (i) { (atKey[NODES[i].key] = atKey[NODES[i].key] || []).push(i); });
    Object.keys(atKey).forEach(function (key) { atKey[key].slice(1).forEach(function (i) { join(atKey[key][0], i, "same latent"); }); });
    (DATA.similar || []).forEach(function (p) {
      var as = atKey[p[0]], bs = atKey[p[1]];
      if (as && bs) join(as[0], bs[0], p[3] === "decoder" ? "decoders cos " + fmt(p[2]) : "same contexts " + fmt(p[2]));
    });
    var groups = {};
    pool.forEach(function (i) { (groups[root(i)] = groups[root(i)] || []).push(i); });
    suggestions = Object.keys(groups).filter(function (r) { return groups[r].length > 1; }).map(function (r) {
      return {members: groups[r].sort(function (a, b) { return a - b; }), why: (why[r] || []).filter(function (w, k, all) { return all.indexOf(w) === k; })};
    });
    say(suggestions.length ? suggestions.length + " suggested supernode" + (suggestions.length > 1 ? "s" : "") + ": see the pins bar" :
        "no latents here agree (same latent, same contexts, or decoders)");
    drawPins();
    return suggestions;
  }
  function drawPins() {
    var box = document.getElementById("pins"), out = [];
    state.pinned.forEach(function (i) {
      if (superOf(i) >= 0) return;
      var n = NODES[i], l = labelOf(i);
      out.push('<span class="pin"><label><input type="checkbox" data-tick="' + i + '"' + (state.ticked[i] ? " checked" : "") +
               "> " + esc(cut(nodeTitle(n), 42)) + (l && n.type === "latent" ? ' <span class="muted">' + esc(cut(l.text, 24)) + "</span>" : "") +
               '</label><button type="button" data-unpin="' + i + '" title="unpin">\u00d7</button></span>');
    });
    state.supernodes.forEach(function (sn, s) {
      out.push('<span class="sn">\u25c9 <input type="text" data-sn-name="' + s + '" value="' + esc(sn.name) + '" aria-label="supernode name"> (' +
               sn.members.length + ' nodes)<button type="button" data-ungroup="' + s + '" title="ungroup">ungroup</button></span>');
    });
    suggestions.forEach(function (sg, k) {
      out.push('<span class="suggest">suggested: ' + sg.members.map(function (i) { return esc(cut(nodeTitle(NODES[i]), 30)); }).join(" + ") +
               ' <span class="muted">(' + esc(sg.why.join(", ")) + ')</span><button type="button" data-suggest="' + k +
               '" title="make these one supernode">group</button></span>');
    });
    var sc = subgraphScores();
    if (sc) out.push('<span class="sub-scores" title="the pinned subgraph\u2019s scores: unpinned latents count as errors">' +
                     "replacement <b>" + fmt(sc.replacement) + "</b> &middot; completeness <b>" + fmt(sc.completeness) + "</b></span>");
    box.innerHTML = out.length ? '<span class="muted">pinned:</span>' + out.join("") : "";
    document.getElementById("subgraph-btn").classList.toggle("on", state.subgraph);
    var nHidden = Object.keys(state.hidden).length, unhide = document.getElementById("unhide-btn");
    unhide.hidden = !nHidden; unhide.textContent = "show hidden (" + nHidden + ")";
  }
  document.getElementById("pins").addEventListener("change", function (ev) {
    var t = ev.target;
    if (t.hasAttribute("data-tick")) state.ticked[+t.getAttribute("data-tick")] = t.checked;
    if (t.hasAttribute("data-sn-name")) { state.supernodes[+t.getAttribute("data-sn-name")].name = t.value || "supernode"; render(); }
  });
  document.getElementById("pins").addEventListener("click", function (ev) {
    var t = ev.target;
    if (t.hasAttribute("data-unpin")) togglePin(+t.getAttribute("data-unpin"));
    if (t.hasAttribute("data-ungroup")) { state.supernodes.splice(+t.getAttribute("data-ungroup"), 1); render(); }
    if (t.hasAttribute("data-suggest")) {
      var sg = suggestions.splice(+t.getAttribute("data-suggest"), 1)[0], first = labelOf(sg.members[0]);
      group(first ? cut(first.text, 30) : "", sg.members);
    }
  });
  function group(name, members) {
    members = members.filter(function (i) { return superOf(i) < 0; });
    if (members.length < 2) { say("tick two or more pinned nodes to group them"); return false; }
    members.forEach(function (i) { if (state.pinned.indexOf(i) < 0) state.pinned.push(i); delete state.ticked[i]; });
    state.supernodes.push({name: name || "supernode " + (state.supernodes.length + 1), members: members});
    say("grouped " + members.length + " nodes");
    render();
    return true;
  }
  document.getElementById("group-btn").addEventListener("click", function () {
    var ticked = state.pinned.filter(function (i) { return state.ticked[i]; });
    if (group(document.getElementById("supernode-name").value.trim(), ticked)) document.getElementById("supernode-name").value = "";
  });
  document.getElementById("subgraph-btn").addEventListener("click", function () {
    state.subgraph = !state.subgraph; view = {k: 1, x: 0, y: 0}; render();
  });
  document.getElementById("clear-pins").addEventListener("click", function () {
    state.pinned = []; state.supernodes = []; state.ticked = {}; state.subgraph = false; render();
  });
  document.getElementById("suggest-btn").addEventListener("click", suggestSupernodes);
  document.getElementById("unhide-btn").addEventListener("click", function () { state.hidden = {}; render(); });
  document.getElementById("color-by").addEventListener("change", function (ev) {
    state.colorBy = ev.target.value; render(); persist();
  });
  document.getElementById("link-type").addEventListener("change", function (ev) { state.linkType = ev.target.value; refresh(); });
  document.getElementById("show-all").addEventListener("change", function (ev) { state.showAll = ev.target.checked; refresh(); });
  document.getElementById("reset-view").addEventListener("click", function () { view = {k: 1, x: 0, y: 0}; render(); });

  // ------------------------------------------------------------------------------------------- sliders
  var nodeThr = document.getElementById("node-thr"), edgeThr = document.getElementById("edge-thr");
  nodeThr.max = String(PRUNE.node_max);  // the page holds every node prune keeps up to node_max (1 within its budget)
  function showThresholds() {
    nodeThr.value = state.nodeThr; edgeThr.value = state.edgeThr;
    document.getElementById("node-thr-val").textContent = (+state.nodeThr).toFixed(2);
    document.getElementById("edge-thr-val").textContent = (+state.edgeThr).toFixed(2);
  }
  function onSlide() {
    state.nodeThr = +nodeThr.value; state.edgeThr = +edgeThr.value;
    showThresholds(); reprune(); render();
    var nv = nodeVis.filter(Boolean).length, ev = edgeVis.filter(Boolean).length;
    say(nv + " nodes, " + ev + " edges: as prune(result, " + state.nodeThr + ", " + state.edgeThr + ") keeps them");
    if (state.clicked !== null) select(state.clicked); else overview();
  }
  nodeThr.addEventListener("input", onSlide); edgeThr.addEventListener("input", onSlide);

  // ------------------------------------------------------------------------------------------- panel
  var panel = document.getElementById("panel"), mainEl = document.querySelector("main");
  // The splitter between graph and panel: drag it (or focus it and use the arrow keys) to share the width.
  function setPanelWidth(w) {
    state.panelWidth = w === null ? null : Math.round(Math.max(220, Math.min(w, mainEl.clientWidth - 260)));
    if (state.panelWidth === null) mainEl.style.removeProperty("--panel-w");
    else mainEl.style.setProperty("--panel-w", state.panelWidth + "px");
  }
  var splitter = document.getElementById("splitter"), sizing = null;
  splitter.addEventListener("mousedown", function (ev) {
    if (ev.button !== 0) return;
    ev.preventDefault();
    sizing = {x: ev.clientX, w: panel.getBoundingClientRect().width};
  });
  window.addEventListener("mousemove", function (ev) {
    if (!sizing) return;
    setPanelWidth(sizing.w + sizing.x - ev.clientX);
    if (!sizing.frame) sizing.frame = requestAnimationFrame(function () { if (sizing) sizing.frame = null; render(); });
  });
  window.addEventListener("mouseup", function () { if (sizing) { sizing = null; render(); } });
  splitter.addEventListener("keydown", function (ev) {
    var step = ev.key === "ArrowLeft" ? 20 : ev.key === "ArrowRight" ? -20 : 0;
    if (!step) return;
    ev.preventDefault();
    setPanelWidth(panel.getBoundingClientRect().width + step); render();
  });
  function fitPanel() {  // beside the graph, the panel is about as tall as the graph and scrolls
    panel.style.maxHeight = (H + 80) + "px";  // from the layout, not read back (that would force a reflow)
  }

  function histogram(counts, lo, hi, title, signed, mark) {
    var w = 360, h = 80, pad = 18, n = counts.length, bw = (w - 2) / n, maxC = 0;
    counts.forEach(function (c) { maxC = Math.max(maxC, Math.log10(1 + c)); });
    var out = ['<svg class="hist" width="' + w + '" height="' + (h + pad) + '" viewBox="0 0 ' + w + " " + (h + pad) + '">'];
    counts.forEach(function (c, k) {
      var bh = maxC > 0 ? (h - 4) * Math.log10(1 + c) / maxC : 0, centre = lo + (k + 0.5) * (hi - lo) / n;
      var colour = signed ? (centre >= 0 ? POS : NEG) : "rgb(" + css("--act-rgb") + ")";
      out.push('<rect x="' + (1 + k * bw).toFixed(1) + '" y="' + (h - bh).toFixed(1) + '" width="' + Math.max(bw - 1, 0.5).toFixed(1) +
               '" height="' + bh.toFixed(1) + '" fill="' + colour + '" opacity="0.8"><title>' + fmt(lo + k * (hi - lo) / n) + " to " +
               fmt(lo + (k + 1) * (hi - lo) / n) + ": " + c + "</title></rect>");
    });
    if (mark !== undefined && hi > lo) {
      var mx = Math.max(1, Math.min(w - 1, 1 + (mark - lo) / (hi - lo) * (w - 2)));
      out.push('<line class="this-prompt" x1="' + mx.toFixed(1) + '" x2="' + mx.toFixed(1) + '" y1="0" y2="' + h +
               '" stroke="#111827" stroke-width="2" stroke-dasharray="3 2"></line>');
    }
    out.push('<line x1="0" x2="' + w + '" y1="' + h + '" y2="' + h + '" stroke="#9ca3af"></line>');
    out.push('<text class="axis" x="0" y="' + (h + 13) + '">' + fmt(lo) + "</text>");
    out.push('<text class="axis" x="' + w + '" y="' + (h + 13) + '" text-anchor="end">' + fmt(hi) + "</text>");
    out.push('<text class="axis" x="' + (w / 2) + '" y="' + (h + 13) + '" text-anchor="middle">' + esc(title) + "</text></svg>");
    return out.join("");
  }
  // Share of the recorded activations below x (from the histogram; bins split evenly).
  function quantile(counts, lo, hi, x) {
    var total = 0, below = 0, n = counts.length;
    counts.forEach(function (c, k) {
      total += c;
      var a = lo + k * (hi - lo) / n, b = lo + (k + 1) * (hi - lo) / n;
      below += x >= b ? c : (x > a ? c * (x - a) / (b - a) : 0);
    });
    return total ? below / total : 0;
  }

  // A node's connections, as circuit-tracer's and Neuronpedia's viewers list them: positive and negative
  // apart, each sorted by its share of the target's input (|w| over the target's drawn inputs).
  var expanded = {};  // which lists show every row, for the node in the panel
  function inputTotal(t) {
    var sum = 0;
    NODES[t].inE.forEach(function (j) { if (edgeVis[j]) sum += Math.abs(EDGES[j][2]); });
    return sum;
  }
  function edgeShare(j) { var tot = inputTotal(EDGES[j][1]); return tot > 0 ? EDGES[j][2] / tot : 0; }
  function linkList(i, which) {
    var n = NODES[i], all = (which === "in" ? n.inE : n.outE).filter(function (j) { return edgeVis[j]; });
    if (!all.length) return '<div class="muted">none</div>';
    var share = {};
    all.forEach(function (j) { share[j] = edgeShare(j); });
    return ["pos", "neg"].map(function (sign) {
      var list = all.filter(function (j) { return sign === "pos" ? EDGES[j][2] >= 0 : EDGES[j][2] < 0; });
      if (!list.length) return "";
      list.sort(function (a, b) { return Math.abs(share[b]) - Math.abs(share[a]); });
      var key = which + "-" + sign, shown = expanded[key] ? list : list.slice(0, 10);
      return '<div class="links-head muted">' + (sign === "pos" ? "positive" : "negative") + " (" + list.length + ")</div>" +
        '<div class="links" data-list="' + key + '">' + shown.map(function (j) {
          var e = EDGES[j], other = which === "in" ? e[0] : e[1];
          return '<div data-goto="' + other + '" title="weight ' + fmt(e[2]) + '"><span>' + esc(nodeTitle(NODES[other])) +
                 '</span><span style="color:' + (e[2] >= 0 ? POS : NEG) + '">' + (100 * share[j]).toFixed(1) + "%</span></div>";
        }).join("") + (list.length > shown.length ? '<button type="button" class="more" data-more="' + key + '">\u2026 ' +
        (list.length - shown.length) + " more</button>" : "") + "</div>";
    }).join("");
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
      var q = ex.hist ? quantile(ex.hist[0], ex.hist[1], ex.hist[2], n.act) : null;
      out.push('<div class="muted act-line">fires on ' + fmt(100 * ex.freq) + "% of tokens; this prompt: <b>" + fmt(n.act) + "</b>" +
               (q !== null ? " (above " + Math.round(100 * q) + "% of its top activations; dashed line)" : "") + "</div>");
      if (ex.hist) out.push(histogram(ex.hist[0], ex.hist[1], ex.hist[2], "top activations (log count)", false, n.act));
      out.push("<h3>Top activations</h3>");
      if (!ex.examples.length) out.push('<div class="muted">no recorded examples</div>');
      var rgb = css("--act-rgb");
      ex.examples.forEach(function (e) {
        var spans = e.tokens.map(function (t, q) {
          var a = e.acts[q] / (e.max || 1);
          var style = a > 0 ? ' style="background: rgba(' + rgb + "," + (0.15 + 0.85 * Math.min(1, a)).toFixed(2) + ')"' : "";
          return '<span class="t' + (q === e.peak ? " peak" : "") + '"' + style + ' title="' + fmt(e.acts[q]) + '">' + tok(t) + "</span>";
        });
        out.push('<div class="seq"><span class="maxact">' + fmt(e.max) + "</span>" + spans.join("") + "</div>");
      });
    } else {
      out.push('<div class="note">' + esc((META.notes || {}).examples || "No example data for this latent's layer.") + "</div>");
    }
    return out.join("");
  }

  function select(i, keepLists) {
    if (!keepLists) expanded = {};
    state.clicked = i;
    persist();
    nodesG.querySelectorAll(".node.selected").forEach(function (el) { el.classList.remove("selected"); });
    if (i === null) { overview(); refresh(); return; }
    if (itemOf[i] !== undefined && items[itemOf[i]].node === i) itemEls[itemOf[i]].classList.add("selected");
    refresh();
    var n = NODES[i], facts = [];
    facts.push(["type", n.type === "error" ? "MLP reconstruction error" : n.type]);
    if (n.layer !== undefined) facts.push(["layer", n.layer]);
    if (n.type === "latent") facts.push(["latent", n.feature]);
    facts.push(["position", n.ctx + " (\u201c" + shown(META.tokens[n.ctx]) + "\u201d)"]);
    if (n.type === "latent") facts.push(["activation", fmt(n.act)]);
    if (n.type === "logit") facts.push(["probability", fmt(n.prob)]);
    if (n.type === "embedding" || n.type === "logit") facts.push(["token id", n.feature]);
    if (n.type !== "logit") { facts.push(["influence", fmt(n.influence)]); facts.push(["cumulative influence", fmt(n.cum)]); }
    facts.push(["node id", n.id]);
    var pinned = state.pinned.indexOf(i) >= 0;
    var html = ['<button class="close" title="close (Esc)">\u00d7</button>', "<h2>" + esc(nodeTitle(n)) + "</h2>"];
    if (n.type === "latent") {
      var l = labelOf(i);
      html.push('<div class="label-row"><input type="text" id="label-input" aria-label="label" placeholder="' +
                esc(l && l.derived ? l.text : "label this latent") + '" value="' + esc(l && !l.derived ? l.text : "") + '">' +
                (l && l.derived ? '<span class="derived-mark" title="derived from its data; type to replace it">derived</span>' : "") + "</div>");
    }
    html.push('<div><button type="button" id="pin-btn">' + (pinned ? "unpin" : "pin") + '</button> <button type="button" id="hide-btn" ' +
              'title="leave this node out of the graph (\u201cshow hidden\u201d brings it back)">hide</button></div>');
    html.push('<table class="facts">' + facts.map(function (f) {
      return "<tr><td>" + esc(f[0]) + "</td><td>" + esc(f[1]) + "</td></tr>";
    }).join("") + "</table>");
    if (n.ablate) {
      html.push('<div class="ablate">ablate: predicted \u0394 <b>' + fmt(n.ablate[0]) + "</b> / measured \u0394 <b>" +
                fmt(n.ablate[1]) + "</b> <span class=\"muted\">(top logit)</span></div>");
    }
    if (n.type === "latent") html.push(latentSections(n));
    if (n.type !== "embedding") html.push('<h3 title="share of this node\u2019s input">Inputs</h3>' + linkList(i, "in"));
    if (n.type !== "logit") html.push('<h3 title="share of each target\u2019s input">Outputs</h3>' + linkList(i, "out"));
    panel.innerHTML = html.join("");
    panel.classList.remove("empty");
    panel.setAttribute("data-node-id", n.id);
    panel.scrollTop = 0;
  }

  function showSupernode(s) {
    var sn = state.supernodes[s];
    panel.innerHTML = '<button class="close" title="close (Esc)">\u00d7</button><h2>Supernode \u201c' + esc(sn.name) + "\u201d</h2>" +
      '<div class="muted">edges drawn for it are the sums of its members\u2019 edges</div><h3>Members</h3><div class="links">' +
      sn.members.map(function (i) { return '<div data-goto="' + i + '"><span>' + esc(nodeTitle(NODES[i])) + "</span><span>" + fmt(NODES[i].influence) + "</span></div>"; }).join("") +
      "</div>";
    panel.classList.remove("empty");
    panel.setAttribute("data-node-id", "supernode-" + s);
  }

  // With nothing selected, the panel lists the logits and the most influential latents.
  function overview() {
    var idx = NODES.map(function (n, i) { return i; }).filter(function (i) { return nodeVis[i]; });
    var logits = idx.filter(function (i) { return NODES[i].type === "logit"; });
    logits.sort(function (a, b) { return NODES[b].prob - NODES[a].prob; });
    var top = idx.filter(function (i) { return NODES[i].type === "latent"; });
    top.sort(function (a, b) { return NODES[b].influence - NODES[a].influence; });
    function rows(list, value) {
      return '<div class="links">' + list.map(function (i) {
        var l = NODES[i].type === "latent" ? labelOf(i) : null;
        return '<div data-goto="' + i + '"><span>' + esc(nodeTitle(NODES[i])) + (l ? ' <span class="lab">' + esc(cut(l.text, 30)) + "</span>" : "") +
               "</span><span>" + value(NODES[i]) + "</span></div>";
      }).join("") + "</div>";
    }
    panel.innerHTML = "<h2>Click a node to see its details</h2>" +
      "<h3>Logits</h3>" + rows(logits, function (n) { return "p = " + fmt(n.prob); }) +
      '<h3>Top features</h3><div class="top-features">' + rows(top.slice(0, 15), function (n) { return fmt(n.influence); }) + "</div>" +
      (META.n_dropped ? '<div class="muted">' + META.n_dropped + " kept latents/errors without an incoming or outgoing edge are " +
       "not shown (as circuit-tracer does).</div>" : "");
    panel.classList.add("empty");
    panel.removeAttribute("data-node-id");
  }

  panel.addEventListener("click", function (ev) {
    if (ev.target.closest(".close")) { select(null); return; }
    if (ev.target.id === "pin-btn") { togglePin(state.clicked); return; }
    if (ev.target.id === "hide-btn") { var h = state.clicked; state.hidden[h] = true; select(null); render(); say("hid " + nodeTitle(NODES[h])); return; }
    var more = ev.target.closest("[data-more]");
    if (more) {
      var top = panel.scrollTop, key = more.getAttribute("data-more");
      expanded[key] = true; select(state.clicked, true); panel.scrollTop = top;
      return;
    }
    var go = ev.target.closest("[data-goto]");
    if (go) select(+go.getAttribute("data-goto"));
  });
  panel.addEventListener("change", function (ev) {
    if (ev.target.id !== "label-input" || state.clicked === null) return;
    var v = ev.target.value.trim(), id = NODES[state.clicked].id;
    if (v) state.labels[id] = v; else delete state.labels[id];
    render(); select(state.clicked);
  });

  // ------------------------------------------------------------------------------------------- save and load
  // The saved file is the Neuronpedia graph JSON with this page's state in qParams (pinnedIds,
  // supernodes as [name, ...node ids], clickedId) and the labels as node clerps and qParams.labels.
  function queryParams() {  // this page's state in Neuronpedia's qParams (plus our own keys, which it ignores)
    var ids = function (i) { return NODES[i].id; };
    var labels = {}, k;
    for (k in state.labels) if (Object.prototype.hasOwnProperty.call(state.labels, k)) labels[k] = state.labels[k];
    return {
      pinnedIds: state.pinned.map(ids),
      supernodes: state.supernodes.map(function (sn) { return [sn.name].concat(sn.members.map(ids)); }),
      linkType: state.linkType,
      hiddenIds: Object.keys(state.hidden).map(ids),
      sgPositions: state.sgPos,
      colorBy: state.colorBy,
      panelWidth: state.panelWidth,
      clickedId: state.clicked !== null ? ids(state.clicked) : "",
      sg_pos: "",
      node_threshold: state.nodeThr,
      edge_threshold: state.edgeThr,
      labels: labels
    };
  }
  function stateJSON() {
    var exp = DATA.export, ids = NODES.map(function (n) { return n.id; });
    var nodes = exp.nodes.map(function (n) {
      var copy = {}, k;
      for (k in n) if (Object.prototype.hasOwnProperty.call(n, k)) copy[k] = n[k];
      if (state.labels[n.node_id]) copy.clerp = state.labels[n.node_id];
      return copy;
    });
    return JSON.stringify({
      metadata: exp.metadata,
      qParams: queryParams(),
      nodes: nodes,
      links: DATA.edges.map(function (e) { return {source: ids[e[0]], target: ids[e[1]], weight: e[2]}; })
    });
  }
  function currentState() {  // what the page restores: the qParams and labels, and when
    var q = queryParams(), labels = q.labels;
    delete q.labels;
    return {qParams: q, labels: labels, saved_at: Date.now()};
  }
  function hasState(s) {
    var q = (s && s.qParams) || {};
    return !!((q.pinnedIds && q.pinnedIds.length) || (q.supernodes && q.supernodes.length) || q.clickedId ||
      (s && s.labels && Object.keys(s.labels).length) || (q.labels && Object.keys(q.labels).length) ||
      (q.hiddenIds && q.hiddenIds.length) || (q.linkType && q.linkType !== "both") || typeof q.panelWidth === "number" || q.colorBy === "share" ||
      (q.sgPositions && Object.keys(q.sgPositions).length) ||
      (typeof q.node_threshold === "number" && q.node_threshold !== OWN_NODE) ||
      (typeof q.edge_threshold === "number" && q.edge_threshold !== OWN_EDGE));
  }
  // This page's state in the browser's storage (works from file:// too), under a key of the graph and the
  // page: the graph's content, this build of it (META.build) and where the page lies. Two copies or two
  // builds of one graph keep their own states; another copy's state is offered, never applied unasked.
  function hash(text) {
    var h = 2166136261;
    for (var k = 0; k < text.length; k++) { h ^= text.charCodeAt(k); h = Math.imul(h, 16777619) >>> 0; }
    return h.toString(16);
  }
  var GRAPH_KEY = "part3-attribution-dashboard:" + hash(META.prompt + "|" + NODES.map(function (n) { return n.id; }).join(",") + "|" + EDGES.length);
  var STORE_KEY = GRAPH_KEY + ":" + (META.build || "") + ":" + hash(location.href.split("#")[0]);
  var storing = false;  // off until the saved state is back, so the first draw does not overwrite it
  var localStore;
  function storage() {  // null where the browser refuses (a sandboxed frame, storage turned off)
    if (localStore === undefined) {
      try {
        localStore = window.localStorage;
        localStore.setItem(STORE_KEY + ":probe", "1"); localStore.removeItem(STORE_KEY + ":probe");
      } catch (err) { localStore = null; }
    }
    return localStore;
  }
  function persist() {
    var ls = storage();
    if (!storing || !ls) return;
    try { ls.setItem(STORE_KEY, JSON.stringify(currentState())); } catch (err) { /* full or refused */ }
  }
  function stored() {
    var ls = storage();
    try { return ls ? JSON.parse(ls.getItem(STORE_KEY) || "null") : null; } catch (err) { return null; }
  }
  // The newest state another copy or build of this graph kept in this browser, or null.
  function otherCopy() {
    var ls = storage(), best = null;
    if (!ls) return null;
    try {
      for (var k = 0; k < ls.length; k++) {
        var key = ls.key(k);
        if (key.indexOf(GRAPH_KEY + ":") !== 0 || key === STORE_KEY || /:probe$/.test(key)) continue;
        var s = JSON.parse(ls.getItem(key) || "null");
        if (s && hasState(s) && (!best || (s.saved_at || 0) > (best.saved_at || 0))) best = s;
      }
    } catch (err) { return null; }
    return best;
  }
  // A state the learner may take instead of the one shown (a newer one kept in this browser, or another
  // copy's): one line with a button, until taken or dismissed.
  var offered = null;
  function offer(s, text) {
    offered = s;
    document.getElementById("offer-text").textContent = text + " (" + new Date(s.saved_at || 0).toLocaleString() + ")";
    document.getElementById("offer").hidden = false;
  }
  function dropOffer() { offered = null; document.getElementById("offer").hidden = true; }
  document.getElementById("offer-btn").addEventListener("click", function () {
    var s = offered;
    dropOffer();
    if (s) { applyState(s); persist(); say("restored the offered state"); }
  });
  document.getElementById("offer-no").addEventListener("click", dropOffer);
  function forget() {
    var ls = storage();
    try { if (ls) ls.removeItem(STORE_KEY); } catch (err) { /* refused */ }
    storing = false;
    state.clicked = null;
    suggestions = [];
    dropOffer();
    state.showAll = false; document.getElementById("show-all").checked = false;
    document.getElementById("supernode-name").value = "";
    view = {k: 1, x: 0, y: 0};
    applyState({qParams: {node_threshold: OWN_NODE, edge_threshold: OWN_EDGE}});
    storing = true;
    say("pins, supernodes, labels and thresholds cleared, here and in this browser's storage");
  }
  function download(name, text, type) {
    var blob = new Blob([text], {type: type}), a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(a.href); }, 1000);
  }
  // This page again with the state inside: it opens with it from anywhere, file:// included.
  function pageWithState() {
    var copy = {}, k;
    for (k in DATA) if (Object.prototype.hasOwnProperty.call(DATA, k)) copy[k] = DATA[k];
    copy.state = currentState();
    var json = JSON.stringify(copy).replace(/</g, "\\u003c").replace(/>/g, "\\u003e").replace(/&/g, "\\u0026");
    // "<\/script>": written out, the end tag would end this very script in the page.
    var open = PAGE.indexOf('id="dashboard-data">'), from = PAGE.indexOf(">", open) + 1, to = PAGE.indexOf("<\/script>", from);
    return PAGE.slice(0, from) + json + PAGE.slice(to);
  }
  // A saved page's name: the prompt's last words and the time, e.g.
  // "attribution-graph_the-opposite-of-small-is-large_2026-12-04_2203.html".
  function saveName() {
    var words = String(META.prompt).replace(/<[^>]*>/g, " ").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "");
    if (words.length > 48) words = words.slice(words.length - 48).replace(/^[^-]*-/, "");
    var d = new Date(), two = function (x) { return (x < 10 ? "0" : "") + x; };
    var when = d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + "_" + two(d.getHours()) + two(d.getMinutes());
    return "attribution-graph" + (words ? "_" + words : "") + "_" + when + ".html";
  }
  function applyState(s) {
    var q = (s && s.qParams) || {}, known = function (id) { return byId[id] !== undefined; };
    var pins = q.pinnedIds || [];
    if (typeof pins === "string") pins = pins.split(",");
    state.pinned = pins.filter(known).map(function (id) { return byId[id]; });
    state.supernodes = (q.supernodes || []).map(function (sn) {
      return {name: String(sn[0]), members: sn.slice(1).filter(known).map(function (id) { return byId[id]; })};
    }).filter(function (sn) { return sn.members.length > 0; });
    state.supernodes.forEach(function (sn) {  // members are pinned nodes
      sn.members.forEach(function (i) { if (state.pinned.indexOf(i) < 0) state.pinned.push(i); });
    });
    state.labels = {};
    var labels = (s && s.labels) || q.labels || {};
    Object.keys(labels).forEach(function (id) { if (known(id)) state.labels[id] = String(labels[id]); });
    // On the sliders' steps (where the page prunes exactly as prune does).
    if (typeof q.node_threshold === "number") { nodeThr.value = q.node_threshold; state.nodeThr = +nodeThr.value; }
    if (typeof q.edge_threshold === "number") { edgeThr.value = q.edge_threshold; state.edgeThr = +edgeThr.value; }
    state.hidden = {};
    (q.hiddenIds || []).filter(known).forEach(function (id) { state.hidden[byId[id]] = true; });
    state.linkType = q.linkType === "in" || q.linkType === "out" ? q.linkType : "both";
    state.colorBy = q.colorBy === "share" ? "share" : "weight";
    document.getElementById("color-by").value = state.colorBy;
    state.sgPos = {};
    Object.keys(q.sgPositions || {}).forEach(function (key) {
      var xy = q.sgPositions[key];
      if (xy && typeof xy[0] === "number" && typeof xy[1] === "number") state.sgPos[key] = [xy[0], xy[1]];
    });
    setPanelWidth(typeof q.panelWidth === "number" ? q.panelWidth : null);
    document.getElementById("link-type").value = state.linkType;
    state.ticked = {}; state.subgraph = false;
    showThresholds(); setPruning(); render();
    if (q.clickedId && known(q.clickedId)) select(byId[q.clickedId]); else select(null);
  }
  // What is wrong with a state file, field by field (empty when it can be loaded as it is).
  function stateProblems(s) {
    if (!s || typeof s !== "object" || Array.isArray(s)) return ["it is not a saved state (a JSON object with qParams)"];
    var q = s.qParams, out = [];
    if (!q || typeof q !== "object" || Array.isArray(q)) return ["it has no qParams object: export it with \u201cexport JSON\u201d"];
    function ids(name, list) {
      if (typeof list === "string") list = list ? list.split(",") : [];
      if (!Array.isArray(list)) { out.push(name + " must be a list of node ids"); return; }
      var bad = list.filter(function (id) { return typeof id !== "string" || byId[id] === undefined; });
      if (bad.length) out.push(name + " has " + bad.length + " id(s) that are not nodes of this graph (e.g. " + cut(JSON.stringify(bad[0]), 40) + "): was it exported from another graph?");
    }
    function fraction(name, max) {
      var v = q[name];
      if (v === undefined || v === null) return;
      if (typeof v !== "number" || !isFinite(v) || v <= 0 || v > 1) out.push(name + " must be a number in (0, 1], got " + cut(JSON.stringify(v), 20));
      else if (v > max) out.push(name + " " + v + " is above " + max + ", the most this page holds");
    }
    if (q.pinnedIds !== undefined) ids("pinnedIds", q.pinnedIds);
    if (q.hiddenIds !== undefined) ids("hiddenIds", q.hiddenIds);
    if (q.supernodes !== undefined) {
      if (!Array.isArray(q.supernodes)) out.push("supernodes must be a list of [name, node id, ...]");
      else q.supernodes.forEach(function (sn, k) {
        if (!Array.isArray(sn) || typeof sn[0] !== "string" || sn.length < 3) out.push("supernodes[" + k + "] must be [name, two or more node ids]");
        else ids("supernodes[" + k + "]", sn.slice(1));
      });
    }
    if (q.clickedId !== undefined && q.clickedId !== "" && q.clickedId !== null) ids("clickedId", [q.clickedId]);
    if (q.linkType !== undefined && ["both", "in", "out"].indexOf(q.linkType) < 0) out.push('linkType must be "both", "in" or "out"');
    if (q.colorBy !== undefined && ["weight", "share"].indexOf(q.colorBy) < 0) out.push('colorBy must be "weight" or "share"');
    if (q.panelWidth !== undefined && q.panelWidth !== null && (typeof q.panelWidth !== "number" || !isFinite(q.panelWidth) || q.panelWidth < 0))
      out.push("panelWidth must be a number of pixels or null");
    if (q.sgPositions !== undefined) {
      var pos = q.sgPositions;
      if (!pos || typeof pos !== "object" || Array.isArray(pos) || Object.keys(pos).some(function (key) {
        var xy = pos[key];
        return !Array.isArray(xy) || xy.length !== 2 || !isFinite(xy[0]) || !isFinite(xy[1]) || typeof xy[0] !== "number" || typeof xy[1] !== "number";
      })) out.push("sgPositions must map names to [x, y] numbers");
    }
    fraction("node_threshold", +nodeThr.max);
    fraction("edge_threshold", 1);
    [["labels", q.labels], ["labels", s.labels]].forEach(function (pair) {
      var labels = pair[1];
      if (labels === undefined) return;
      if (!labels || typeof labels !== "object" || Array.isArray(labels)) { out.push("labels must map node ids to text"); return; }
      ids("labels", Object.keys(labels));
      if (Object.keys(labels).some(function (id) { return typeof labels[id] !== "string"; })) out.push("labels must be text");
    });
    return out;
  }
  document.getElementById("save-btn").addEventListener("click", function () {
    var name = saveName();
    download(name, pageWithState(), "text/html");
    say("downloaded " + name + ": this page with your pins, supernodes, labels and thresholds inside; open it to go on");
  });
  document.getElementById("export-btn").addEventListener("click", function () {
    download("neuronpedia.json", stateJSON(), "application/json");
    say("downloaded neuronpedia.json: upload it to Neuronpedia, or open it here with \u201cload state\u201d");
  });
  document.getElementById("forget-btn").addEventListener("click", forget);
  document.getElementById("load-btn").addEventListener("click", function () { document.getElementById("load-file").click(); });
  document.getElementById("load-file").addEventListener("change", function (ev) {
    var file = ev.target.files[0];
    if (!file) return;
    var reader = new FileReader();
    reader.onload = function () {
      var s;
      try { s = JSON.parse(reader.result); } catch (err) { say("could not read " + file.name + ": it is not JSON (" + err.message + ")"); return; }
      var problems = stateProblems(s);
      if (problems.length) { say("did not load " + file.name + ": " + problems.join("; ")); return; }
      applyState(s); persist(); say("loaded " + file.name);
    };
    reader.readAsText(file);
    ev.target.value = "";
  });

  // ------------------------------------------------------------------------------------------- start
  // Inline in a notebook the page sits in an iframe: size that frame to the page, so nothing scrolls twice.
  function fitFrame() {
    try {
      var f = window.frameElement;
      if (f) f.style.height = (document.documentElement.scrollHeight + 2) + "px";
    } catch (err) { /* a cross-origin frame: keep its own height */ }
  }
  var lastWidth = wrapEl.clientWidth, resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      if (wrapEl.clientWidth !== lastWidth) { lastWidth = wrapEl.clientWidth; render(); }
      fitFrame();
    }, 120);
  });
  if (window.ResizeObserver) new ResizeObserver(fitFrame).observe(document.body);

  // At the thresholds it was written with, the page shows what Python pruned: no re-pruning needed.
  showThresholds(); render(); overview();
  // The state to open with. A page with a state inside (a saved page) is a snapshot: it opens with that
  // state, and a newer one this browser kept for it is offered. Otherwise the state this browser kept for
  // this page comes back; failing that, another copy's is offered.
  var initial = DATA.state || {}, local = stored();
  if (hasState(initial)) {
    applyState(initial);
    say("the state saved in this page" + (initial.saved_at ? " (" + new Date(initial.saved_at).toLocaleString() + ")" : ""));
    if (local && hasState(local) && (local.saved_at || 0) > (initial.saved_at || 0) &&
        JSON.stringify(local.qParams) + JSON.stringify(local.labels) !== JSON.stringify(initial.qParams) + JSON.stringify(initial.labels)) {
      offer(local, "this browser has later changes to this page");
    }
  } else if (local && hasState(local)) {
    applyState(local); say("your pins, labels and thresholds for this page are back (kept in this browser)");
  } else {
    var other = otherCopy();
    if (other) offer(other, "another copy of this graph has a state in this browser");
    say(storage() ? "changes are kept in this browser; \u201csave\u201d downloads this page with them inside" :
        "this browser keeps nothing for this page: \u201csave\u201d downloads it with your changes inside");
    // Served over http (e.g. by Jupyter), a neuronpedia.json saved beside the page is read too.
    if (/^https?:$/.test(location.protocol) && !window.frameElement) {
      fetch("neuronpedia.json").then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
        if (j && hasState(j)) applyState(j);
      }).catch(function () { /* no saved state beside the page */ });
    }
  }
  storing = true;
  if (!offered) persist();  // with an offer open, the offered state stays kept until the learner edits
  fitFrame();
  window.dashboard = {
    data: DATA, state: state, select: select, redraw: render, togglePin: togglePin, group: group,
    stateJSON: stateJSON, applyState: applyState, items: function () { return items; }, pageWithState: pageWithState,
    forget: forget, storeKey: STORE_KEY, itemKey: itemKey, subgraphScores: subgraphScores, suggest: suggestSupernodes, zoom: function () { return view.k; },
    drawnEdges: function () { return drawnEdges.map(function (d) { return d[3]; }); },
    edgeShapes: function () {
      var scale = state.subgraph ? Math.max.apply(null, drawnEdges.map(function (d) { return Math.abs(d[2]); }).concat([1e-12])) : maxAbs;
      return drawnEdges.map(function (d) { var g = edgeShape(d); g.weight = d[2]; g.edge = d[3]; g.strength = strength(d, scale); return g; });
    },
    visible: function () { return {nodes: nodeVis.filter(Boolean).length, edges: edgeVis.filter(Boolean).length}; },
    // Graph indices: what prune keeps at the sliders' thresholds (null before a slider moved), what is drawn,
    // and the drawn edges as [source, target].
    // prune's graph at any thresholds, without drawing it: graph indices of the nodes and [source, target] edges.
    pruneAt: function (nodeT, edgeT) {
      var got = pruneAt(nodeT, edgeT), nodes = [], edges = [], i;
      for (i = 0; i < NODES.length; i++) if (got.nodes[i]) nodes.push(NODES[i].idx);
      for (i = 0; i < EDGES.length; i++) if (got.edges[i]) edges.push([NODES[EDGES[i][0]].idx, NODES[EDGES[i][1]].idx]);
      return {nodes: nodes.sort(function (a, b) { return a - b; }), edges: edges};
    },
    pruned: function () {
      var ids = function (vis) { return NODES.map(function (n, i) { return vis[i] ? n.idx : -1; }).filter(function (x) { return x >= 0; }).sort(function (a, b) { return a - b; }); };
      return {kept: prunedKept && ids(prunedKept), visible: ids(nodeVis),
              edges: EDGES.filter(function (e, j) { return edgeVis[j]; }).map(function (e) { return [NODES[e[0]].idx, NODES[e[1]].idx]; })};
    }
  };
})();
