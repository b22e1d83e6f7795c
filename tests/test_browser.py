"""Render the toy dashboard in headless Chromium, offline, and use it as a learner would.

Chromium is driven over the Chrome DevTools Protocol (`part3_attribution_graphs.tools.chromium`).
The page is opened from a file:// URL; every http(s)/ws(s) request is blocked and recorded, so the
tests fail if the page tries to reach the network. Screenshots go to `out/test-artifacts/`.

Needs Debian's `chromium` (`bash scripts/install_chromium.sh`); if it is missing and cannot be
installed, the tests are skipped. Set CHROMIUM=/path/to/binary to use another Chromium build.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import need

pytestmark = pytest.mark.browser

need("websocket")  # websocket-client, in the dev extra

from part3_attribution_graphs import utils  # noqa: E402
from part3_attribution_graphs.attribution import attribute  # noqa: E402
from part3_attribution_graphs.nodes import NodeType  # noqa: E402
from part3_attribution_graphs.result import prune  # noqa: E402
from part3_attribution_graphs.scores import compute_graph_scores  # noqa: E402
from part3_attribution_graphs.tools.bench_dashboard import synthetic_result  # noqa: E402
from part3_attribution_graphs.tools.chromium import (  # noqa: E402
    INSTALL_HINT,
    find_chromium,
    launch,
    network_requests,
    page_errors,
)
from part3_attribution_graphs.toy import make_toy_world  # noqa: E402
from part3_attribution_graphs.views.dashboard import DashboardFrame, create_attribution_dashboard  # noqa: E402
from part3_attribution_graphs.views.neuronpedia import view_graph  # noqa: E402
from part3_attribution_graphs.worlds.gemma import format_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "out" / "test-artifacts"
CTRL, SHIFT = 2, 8
FRAME = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(f"Chromium not found and could not be installed: {INSTALL_HINT}.")
    return path


@pytest.fixture(scope="module")
def world():
    model, tcs = make_toy_world()
    result = attribute(
        model,
        tcs,
        format_prompt("What is the opposite of small?", "The opposite of small is **large"),
        batch_size=64,
    )
    examples = utils.make_toy_example_data(model, tcs)
    return model, tcs, result, examples


@pytest.fixture(scope="module")
def toy_dashboard(world, tmp_path_factory):
    model, tcs, result, examples = world
    out = tmp_path_factory.mktemp("dashboard")
    scores = compute_graph_scores(result)
    utils.create_attribution_dashboard(
        result, model, tcs, example_data_by_layer=examples, output_dir=out, display=False, scores=scores
    )
    return result, out / "index.html", scores


@pytest.fixture(scope="module")
def page(chromium):
    with launch(chromium) as cdp:
        yield cdp


def centre(cdp, selector: str) -> dict:
    """The centre of the first element matching `selector`, in viewport pixels (scrolled into view)."""
    box = cdp.evaluate(f"""(() => {{
        let el = document.querySelector({json.dumps(selector)});
        if (!el) return null;
        el = el.querySelector('.shape') || el;  // a node's centre is its shape's, not its label's
        el.scrollIntoView({{block: 'center', inline: 'center'}});
        const r = el.getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
    }})()""")
    assert box, f"nothing matches {selector}"
    return box


def open_fresh(cdp, url: str, width: int, height: int = 1000) -> None:
    """Open a page with nothing kept in the browser's storage (the dashboard keeps its state there)."""
    cdp.open(url, width, height)
    if cdp.evaluate("localStorage.length"):
        cdp.evaluate("localStorage.clear()")
        cdp.open(url, width, height)


def shot(cdp, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    data = cdp.send("Page.captureScreenshot", format="png")
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(data["data"]))
    return path


def assert_clean(cdp) -> None:
    assert not page_errors(cdp), page_errors(cdp)
    assert not network_requests(cdp), network_requests(cdp)


def test_dashboard_renders_offline_and_reacts(page, toy_dashboard):
    result, index, scores = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1600)
    view = view_graph(result)

    n_nodes = len(view.indices)
    assert cdp.evaluate("document.querySelectorAll('#graph .node').length") == n_nodes
    assert (
        cdp.evaluate("new Set([...document.querySelectorAll('.node')].map(e => e.dataset.nodeId)).size")
        == n_nodes
    )
    ids = cdp.evaluate("[...document.querySelectorAll('.node')].map(e => e.dataset.nodeId)")
    assert set(ids) == {result.graph.nodes[i].node_id for i in view.indices}  # the one id function
    header = cdp.evaluate("document.querySelector('header').innerText")
    for (
        name,
        value,
    ) in scores.items():  # the graph's own scores, as a reader sees them (3 significant figures)
        label = name.removesuffix("_score").replace("_", " ")
        assert f"{label} score {float(f'{value:.3g}'):g}" in header, header
    assert cdp.evaluate("document.getElementById('panel').classList.contains('empty')")
    # The overview's "top features" are latents only, each with a label.
    top = cdp.evaluate("[...document.querySelectorAll('.top-features [data-goto]')].map(e => e.textContent)")
    assert top and all(t.startswith("Latent ") and "@ layer" in t for t in top), top
    # Edges are drawn on demand: none until something is hovered, clicked or pinned.
    assert cdp.evaluate("window.dashboard.drawnEdges().length") == 0

    # Hovering a logit node draws exactly its incoming edges; moving away clears them.
    hover = centre(cdp, ".node[data-type=logit]")
    expect = cdp.evaluate("""(() => {
        const i = +document.querySelector('.node[data-type=logit]').dataset.index;
        return window.dashboard.data.edges.map((e, j) => e[1] === i ? j : -1)
            .filter(j => j >= 0).sort((a, b) => a - b);
    })()""")
    cdp.mouse("mouseMoved", hover["x"], hover["y"])
    assert sorted(cdp.evaluate("window.dashboard.drawnEdges()")) == expect and expect
    assert cdp.evaluate("document.querySelectorAll('.node.hl').length") == 1
    assert "Logit" in cdp.evaluate("document.getElementById('tooltip').textContent")
    cdp.mouse("mouseMoved", 5, 5)
    assert cdp.evaluate("window.dashboard.drawnEdges().length") == 0

    # Click the most influential latent, as a user would (a real mouse event at its centre).
    best = cdp.evaluate("""(() => {
        const d = window.dashboard.data,
            lat = d.nodes.map((n, i) => i).filter(i => d.nodes[i].type === 'latent');
        lat.sort((a, b) => d.nodes[b].influence - d.nodes[a].influence);
        return d.nodes[lat[0]].id;
    })()""")
    box = centre(cdp, f'.node[data-node-id="{best}"]')
    cdp.click(box["x"], box["y"])
    panel = cdp.evaluate("""(() => {
        const p = document.getElementById('panel');
        const t = p.querySelector('table.logit-table');
        return {visible: !p.classList.contains('empty') && p.offsetWidth > 0,
                title: p.querySelector('h2').textContent,
                panel_for: p.dataset.nodeId, rows: t ? t.querySelectorAll('tbody tr').length : 0,
                selected: document.querySelector('.node.selected')?.dataset.nodeId,
                seqs: p.querySelectorAll('.seq').length, hists: p.querySelectorAll('svg.hist').length,
                marker: p.querySelectorAll('line.this-prompt').length,
                label: !!p.querySelector('#label-input'),
                derived: p.querySelector('.derived-mark')?.textContent,
                act: p.querySelector('.act-line')?.textContent};
    })()""")
    assert panel["visible"], panel
    assert panel["selected"] == panel["panel_for"] == best
    assert panel["title"].startswith("Latent ") and "@ layer" in panel["title"], panel
    assert panel["rows"] == 10 and panel["seqs"] > 0 and panel["hists"] == 2, panel
    assert panel["marker"] == 1 and "% of its top activations" in panel["act"], panel
    assert panel["label"] and panel["derived"] == "derived", panel
    # A token in a top-activation sequence is one unbreakable box.
    assert cdp.evaluate("getComputedStyle(document.querySelector('.seq .t')).display") == "inline-block"
    shot(cdp, "dashboard.png")

    # An edge of the clicked node has a tooltip: hover the middle of its strongest drawn edge.
    mid = cdp.evaluate("""(() => {
        const d = window.dashboard, js = d.drawnEdges(), E = d.data.edges;
        js.sort((a, b) => Math.abs(E[b][2]) - Math.abs(E[a][2]));
        const els = i => document.querySelector(`.node[data-index="${i}"] .shape`).getBoundingClientRect();
        for (const j of js) {  // a point on the edge that is not over a node
            const a = els(E[j][0]), b = els(E[j][1]);
            for (const f of [0.5, 0.3, 0.7, 0.2, 0.8]) {
                const x = a.x + a.width / 2 + f * (b.x + b.width / 2 - a.x - a.width / 2);
                const y = a.y + a.height / 2 + f * (b.y + b.height / 2 - a.y - a.height / 2);
                if (!document.elementFromPoint(x, y).closest('.node')) return {x, y};
            }
        }
        return null;
    })()""")
    cdp.mouse("mouseMoved", mid["x"], mid["y"])
    assert "weight" in cdp.evaluate("document.getElementById('tooltip').textContent")

    # Clicking empty space deselects; Escape too; the keyboard reaches nodes.
    empty = cdp.evaluate(
        "(() => { const r = document.getElementById('graph').getBoundingClientRect(); "
        "return {x: r.x + 20, y: r.y + 8}; })()"
    )
    cdp.click(empty["x"], empty["y"])
    assert cdp.evaluate("document.getElementById('panel').classList.contains('empty')")
    cdp.evaluate(f"document.querySelector('.node[data-node-id=\"{best}\"]').focus()")
    cdp.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    assert cdp.evaluate("document.getElementById('panel').dataset.nodeId") == best
    cdp.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    assert cdp.evaluate("document.getElementById('panel').classList.contains('empty')")

    # The wheel zooms about the cursor (a node under it stays put, its neighbours spread out); reset undoes
    # it.
    def node_xy(node_id):
        return cdp.evaluate(
            f"(() => {{ const r = document.querySelector('.node[data-node-id=\"{node_id}\"] .shape')"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )

    other = cdp.evaluate("document.querySelector('.node[data-type=logit]').dataset.nodeId")
    (x0, y0), (ox, oy) = node_xy(best), node_xy(other)
    cdp.send("Input.dispatchMouseEvent", type="mouseWheel", x=x0, y=y0, deltaX=0, deltaY=-400)
    cdp.evaluate(FRAME)
    (x1, y1), (ox1, oy1) = node_xy(best), node_xy(other)
    assert abs(x1 - x0) < 2 and abs(y1 - y0) < 2
    assert abs(ox1 - x1) > 1.5 * abs(ox - x0) or abs(oy1 - y1) > 1.5 * abs(oy - y0)
    cdp.evaluate("document.getElementById('reset-view').click()")
    assert node_xy(other) == pytest.approx([ox, oy], abs=1)

    # "show all edges" draws every edge.
    cdp.evaluate("document.getElementById('show-all').click()")
    assert cdp.evaluate("window.dashboard.drawnEdges().length") == len(view.edges)
    cdp.evaluate("document.getElementById('show-all').click()")
    assert_clean(cdp)


def test_pins_supernode_labels_slider_save_and_restore(page, toy_dashboard, tmp_path, world):
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1600)
    # From file:// the status line promises only what works there (no "put the file beside the page").
    status = cdp.evaluate("document.getElementById('status').textContent")
    assert "kept in this browser" in status and "beside" not in status, status
    # Two latents that both feed the same node, and that node: pin all three with ctrl/shift-clicks.
    pick = cdp.evaluate("""(() => {
        const d = window.dashboard.data, N = d.nodes, into = {};
        d.edges.forEach(e => { if (N[e[0]].type === 'latent') (into[e[1]] = into[e[1]] || []).push(e[0]); });
        const t = Object.keys(into).find(k => new Set(into[k]).size >= 2);
        const m = [...new Set(into[t])].slice(0, 2);
        return {target: N[t].id, members: m.map(i => N[i].id)};
    })()""")
    for node_id, mod in zip([*pick["members"], pick["target"]], (CTRL, SHIFT, CTRL)):
        box = centre(cdp, f'.node[data-node-id="{node_id}"]')
        cdp.click(box["x"], box["y"], modifiers=mod)
    pinned = cdp.evaluate("window.dashboard.state.pinned.map(i => window.dashboard.data.nodes[i].id)")
    assert pinned == [*pick["members"], pick["target"]]
    assert cdp.evaluate("document.querySelectorAll('.node.pinned').length") == 3
    assert cdp.evaluate(
        "document.getElementById('panel').classList.contains('empty')"
    )  # pinning is not clicking
    assert cdp.evaluate("window.dashboard.drawnEdges().length") > 0  # pinned nodes show their edges

    # Tick the two latents, name the group, build the supernode, look at the subgraph.
    for node_id in pick["members"]:
        i = cdp.evaluate(f"window.dashboard.data.nodes.findIndex(n => n.id === {json.dumps(node_id)})")
        cdp.evaluate(f"document.querySelector('[data-tick=\"{i}\"]').click()")
    cdp.evaluate("document.getElementById('supernode-name').value = 'size words'")
    cdp.evaluate("document.getElementById('group-btn').click()")
    assert cdp.evaluate("window.dashboard.state.supernodes.length") == 1
    cdp.evaluate("document.getElementById('subgraph-btn').click()")
    sub = cdp.evaluate("""(() => {
        const d = window.dashboard, its = d.items();
        return {types: its.map(it => it.type).sort(), n: document.querySelectorAll('.node').length,
                label: document.querySelector('.node.super text')?.textContent};
    })()""")
    assert sub["n"] == 2 and "super" in sub["types"] and sub["label"] == "size words", sub
    # The supernode's edge to the target is the sum of its members' edges (checked against Python's matrix).
    drawn = cdp.evaluate("""(() => {
        const d = window.dashboard; d.redraw();
        return d.items().map(it => it.type);
    })()""")
    assert "super" in drawn
    summed = cdp.evaluate("""(() => {
        const d = window.dashboard, tip = document.getElementById('tooltip');
        const a = document.querySelector('.node.super .shape').getBoundingClientRect();
        const b = document.querySelector('.node:not(.super) .shape').getBoundingClientRect();
        return {x: (a.x + a.width / 2 + b.x + b.width / 2) / 2,
                y: (a.y + a.height / 2 + b.y + b.height / 2) / 2};
    })()""")
    cdp.mouse("mouseMoved", summed["x"], summed["y"])
    tip = cdp.evaluate("document.getElementById('tooltip').textContent")
    view = view_graph(result)
    ids = [result.graph.nodes[i].node_id for i in view.indices]
    want = sum(w for s, t, w in view.edges if ids[t] == pick["target"] and ids[s] in pick["members"])
    assert "sum of members' edges" in tip, tip
    shown_weight = float(tip.split("weight ")[1].split(" ")[0])
    assert shown_weight == pytest.approx(want, rel=2e-3), (tip, want)
    cdp.mouse("mouseMoved", 5, 5)
    path = shot(cdp, "subgraph-supernode.png")
    assert path.stat().st_size > 0

    # Back to the whole graph; label the first member; move the node slider down.
    cdp.evaluate("document.getElementById('subgraph-btn').click()")
    cdp.evaluate(
        "window.dashboard.select(window.dashboard.data.nodes.findIndex(n => n.id === "
        f"{json.dumps(pick['members'][0])}))"
    )
    cdp.evaluate("""(() => { const el = document.getElementById('label-input'); el.value = 'says "small"';
                    el.dispatchEvent(new Event('change', {bubbles: true})); })()""")
    assert cdp.evaluate("window.dashboard.state.labels")[pick["members"][0]] == 'says "small"'
    node_label = cdp.evaluate(
        f"document.querySelector('.node[data-node-id=\"{pick['members'][0]}\"] text').textContent"
    )
    assert node_label == 'says "small"'
    before = cdp.evaluate("window.dashboard.visible()")
    cdp.evaluate("""(() => { const s = document.getElementById('node-thr'); s.value = 0.5;
                    s.dispatchEvent(new Event('input', {bubbles: true})); })()""")
    after = cdp.evaluate("window.dashboard.visible()")
    assert after["nodes"] < before["nodes"] and after["edges"] < before["edges"], (before, after)
    # Only nodes within the first crossing of 0.5 cumulative influence are left (prune_nodes' rule).
    cums = sorted(
        n["cum"] for n in cdp.evaluate("window.dashboard.data.nodes") if n["type"] in ("latent", "error")
    )
    crossing = next(c for c in cums if c >= 0.5 - 1e-9)
    shown_cums = cdp.evaluate("""[...document.querySelectorAll('.node.latent, .node.error')]
        .map(e => window.dashboard.data.nodes[+e.dataset.index].cum)""")
    assert shown_cums and max(shown_cums) <= crossing
    assert cdp.evaluate("document.getElementById('node-thr-val').textContent") == "0.50"
    # The edge slider keeps the highest-scoring share of the edges: fewer edges, same rule for nodes.
    cdp.evaluate("""(() => { const s = document.getElementById('edge-thr'); s.value = 0.6;
                    s.dispatchEvent(new Event('input', {bubbles: true})); })()""")
    fewer = cdp.evaluate("window.dashboard.visible()")
    assert fewer["edges"] < after["edges"] and fewer["nodes"] <= after["nodes"], (after, fewer)
    cdp.evaluate("""(() => { const s = document.getElementById('edge-thr'); s.value = 0.85;
                    s.dispatchEvent(new Event('input', {bubbles: true})); })()""")
    assert cdp.evaluate("window.dashboard.visible()") == after

    # Export: a real download of neuronpedia.json, the graph and the state for Neuronpedia.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    cdp.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    cdp.evaluate("document.getElementById('export-btn').click()")
    saved = json.loads(wait_for(downloads / "neuronpedia.json").read_text())
    q = saved["qParams"]
    assert q["pinnedIds"] == pinned
    assert q["supernodes"] == [["size words", *pick["members"]]]
    assert q["clickedId"] == pick["members"][0]
    assert q["labels"] == {pick["members"][0]: 'says "small"'}
    assert q["node_threshold"] == 0.5
    assert {n["node_id"]: n["clerp"] for n in saved["nodes"]}[pick["members"][0]] == 'says "small"'
    assert len(saved["links"]) == len(view.edges) and len(saved["nodes"]) == len(view.indices)
    want = {
        "pinned": pinned,
        "supernodes": [["size words", *pick["members"]]],
        "labels": {pick["members"][0]: 'says "small"'},
        "thr": 0.5,
        "clicked": pick["members"][0],
    }
    # Save: this page again, with the state inside.
    cdp.evaluate("document.getElementById('save-btn').click()")
    saved_page = wait_for_glob(downloads, "attribution-graph_*.html")
    # Hostile text in the state stays text in a saved page: its scripts are the page's own two.
    hostile = "</script><script>window.pwned = 1</script><img src=x onerror='window.pwned = 1'>"
    member_id = json.dumps(pick["members"][1])
    copy = cdp.evaluate(f"""(() => {{ const d = window.dashboard, id = {member_id};
        const old = d.state.labels[id];
        d.state.labels[id] = {json.dumps(hostile)}; const page = d.pageWithState();
        if (old === undefined) delete d.state.labels[id]; else d.state.labels[id] = old;
        return page; }})()""")
    assert copy.count("</script>") == 2 and hostile not in copy
    hostile_page = tmp_path / "hostile.html"
    hostile_page.write_text(copy, encoding="utf-8")

    # Reopened from disk, the page has its state back from the browser's storage...
    cdp.open(index.resolve().as_uri(), 1600)
    assert restored_state(cdp) == want
    # ... "reset" clears it, there and in the storage ...
    cdp.evaluate("document.getElementById('forget-btn').click()")
    cdp.open(index.resolve().as_uri(), 1600)
    assert cdp.evaluate("window.dashboard.state.pinned.length") == 0
    assert cdp.evaluate("document.getElementById('node-thr').value") == "0.8"
    # ... the saved page, opened from file:// with nothing in the storage, carries it ...
    cdp.open(saved_page.resolve().as_uri(), 1600)
    assert restored_state(cdp) == want
    cdp.evaluate("document.getElementById('forget-btn').click()")
    cdp.open(hostile_page.resolve().as_uri(), 1600)
    assert cdp.evaluate("window.pwned") is None
    assert cdp.evaluate("window.dashboard.state.labels")[pick["members"][1]] == hostile
    assert cdp.evaluate("document.querySelectorAll('img').length") == 0
    cdp.evaluate(f"window.dashboard.select(window.dashboard.data.nodes.findIndex(n => n.id === {member_id}))")
    assert cdp.evaluate("document.getElementById('label-input').value") == hostile  # text, not markup
    cdp.evaluate("document.getElementById('forget-btn').click()")
    # ... and "load state" (a keyboard-reachable button) reads the exported JSON back.
    cdp.open(index.resolve().as_uri(), 1600)
    assert cdp.evaluate("window.dashboard.state.pinned.length") == 0
    assert cdp.evaluate("""(() => { const b = document.getElementById('load-btn'); b.focus();
        return document.activeElement === b && b.tabIndex >= 0 && b.offsetWidth > 0; })()""")
    assert cdp.evaluate("""(() => { let opened = false; const f = document.getElementById('load-file');
        f.addEventListener('click', ev => { opened = true; ev.preventDefault(); }, {once: true});
        document.getElementById('load-btn').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}));
        document.getElementById('load-btn').click(); return opened; })()""")
    doc = cdp.send("DOM.getDocument")
    node = cdp.send("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#load-file")
    cdp.send("DOM.setFileInputFiles", files=[str(downloads / "neuronpedia.json")], nodeId=node["nodeId"])
    cdp.evaluate("new Promise(r => setTimeout(r, 300))")
    assert restored_state(cdp) == want
    assert_clean(cdp)

    # The saved file beside the page: writing the dashboard again into that folder keeps the state.
    model, tcs, _, examples = world
    folder = tmp_path / "again"
    folder.mkdir()
    shutil.copy(downloads / "neuronpedia.json", folder / "neuronpedia.json")
    utils.create_attribution_dashboard(result, model, tcs, output_dir=folder, display=False)
    cdp.evaluate("document.getElementById('forget-btn').click()")  # not from the browser's storage
    cdp.open((folder / "index.html").resolve().as_uri(), 1600)
    assert cdp.evaluate("window.dashboard.state.pinned.map(i => window.dashboard.data.nodes[i].id)") == pinned
    assert json.loads((folder / "neuronpedia.json").read_text())["qParams"]["pinnedIds"] == pinned
    cdp.evaluate("document.getElementById('forget-btn').click()")
    assert_clean(cdp)


def wait_for(path: Path, seconds: float = 20) -> Path:
    """`path` once a download has written it."""
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"nothing downloaded to {path}"
    time.sleep(0.2)  # let the download finish writing
    return path


def wait_for_glob(folder: Path, pattern: str, seconds: float = 20) -> Path:
    """The one file matching `pattern` in `folder` once a download has written it."""
    deadline = time.time() + seconds
    while (
        not [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")] and time.time() < deadline
    ):
        time.sleep(0.1)
    found = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
    assert len(found) == 1, f"expected one download matching {pattern} in {folder}, found {found}"
    time.sleep(0.2)  # let the download finish writing
    return found[0]


def restored_state(cdp) -> dict:
    return cdp.evaluate("""(() => { const d = window.dashboard, N = d.data.nodes, s = d.state;
        return {pinned: s.pinned.map(i => N[i].id),
                supernodes: s.supernodes.map(sn => [sn.name, ...sn.members.map(i => N[i].id)]),
                labels: s.labels, thr: s.nodeThr,
                clicked: document.getElementById('panel').dataset.nodeId}; })()""")


def set_sliders(cdp, node_t: float, edge_t: float) -> tuple[float, float]:
    """Move both sliders as a user would (an input event each); the values they took."""
    got = cdp.evaluate(f"""(() => {{
        const a = document.getElementById('node-thr'), b = document.getElementById('edge-thr');
        a.value = {node_t}; a.dispatchEvent(new Event('input', {{bubbles: true}}));
        b.value = {edge_t}; b.dispatchEvent(new Event('input', {{bubbles: true}}));
        return [a.value, b.value]; }})()""")
    return float(got[0]), float(got[1])


def drawn_graph(cdp) -> dict:
    """What the page draws: node ids (the DOM's), and the header's node and edge counts."""
    return cdp.evaluate("""(() => {
        const stats = document.querySelector('header .stats').innerText;
        return {ids: [...document.querySelectorAll('#graph .node')].map(e => e.dataset.nodeId).sort(),
                header_nodes: +stats.match(/nodes (\\d+)/)[1], header_edges: +stats.match(/edges (\\d+)/)[1],
                header_edge_thr: stats.match(/edge threshold ([\\d.]+)/)[1]}; })()""")


def assert_sliders_prune_as_python(cdp, result, grid) -> None:
    """At every (node, edge) threshold the page draws exactly what `prune` keeps (after the viewers'
    clean-up), and its header counts what it draws."""
    for node_t, edge_t in grid:
        node_t, edge_t = set_sliders(cdp, node_t, edge_t)
        want = view_graph(prune(result, node_t, edge_t))
        ids = sorted(result.graph.nodes[i].node_id for i in want.indices)
        got = drawn_graph(cdp)
        assert got["ids"] == ids, (node_t, edge_t, len(got["ids"]), len(ids), set(got["ids"]) ^ set(ids))
        assert got["header_nodes"] == len(ids) and got["header_edges"] == len(want.edges), (
            node_t,
            edge_t,
            got,
        )
        drawn = sorted(map(tuple, cdp.evaluate("window.dashboard.pruned().edges")))
        where = want.indices
        assert drawn == sorted((where[s], where[t]) for s, t, _ in want.edges), (node_t, edge_t)


SLIDER_GRID = [(n, e) for n in (0.3, 0.5, 0.65, 0.8) for e in (0.5, 0.7, 0.85, 0.95, 0.99, 1.0)]


def test_sliders_mean_prune_on_the_toy_graph(page, toy_dashboard):
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    # The page opens at the thresholds it was pruned with, and its header says so.
    assert cdp.evaluate(
        "[document.getElementById('node-thr').value, document.getElementById('edge-thr').value]"
    ) == [
        "0.8",
        "0.85",
    ]
    assert drawn_graph(cdp)["header_edge_thr"] == "0.85"
    assert_sliders_prune_as_python(cdp, result, SLIDER_GRID)
    assert_clean(cdp)


def test_sliders_mean_prune_on_a_30k_edge_graph(page, tmp_path):
    result = synthetic_result()
    assert int((result.adjacency_matrix != 0).sum()) >= 29_000
    create_attribution_dashboard(result, None, output_dir=tmp_path, display=False)
    cdp = page
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    assert_sliders_prune_as_python(cdp, result, SLIDER_GRID)
    assert_clean(cdp)


def test_inline_frame_scrolls_the_notebook_shows_details_and_says_when_untrusted(
    page, toy_dashboard, tmp_path
):
    """The dashboard as a notebook shows it: a ~935 px wide output between other cells."""
    _, index, _ = toy_dashboard
    frame = DashboardFrame(index.read_text(encoding="utf-8"), index)._repr_html_()
    cell = '<div style="height: 200px">cell above</div>{}<div style="height: 3000px">cell below</div>'
    notebook = tmp_path / "notebook.html"
    notebook.write_text(
        f"<!DOCTYPE html><body style='margin: 0'>{cell.format(frame)}</body>", encoding="utf-8"
    )
    cdp = page
    open_fresh(cdp, notebook.resolve().as_uri(), 935, height=900)
    cdp.evaluate("new Promise(r => setTimeout(r, 300))")
    inner = "document.querySelector('iframe').contentWindow"
    note = "document.querySelector('[data-p3ag-untrusted]')"
    assert cdp.evaluate(f"{note}.offsetHeight") == 0  # it ran: no "trust the notebook" line
    assert cdp.evaluate(f"{inner}.dashboard.drawnEdges().length") == 0

    # The wheel over the graph scrolls the notebook, not the graph...
    def graph_point():
        return cdp.evaluate(f"""(() => {{ const f = document.querySelector('iframe').getBoundingClientRect(),
            g = {inner}.document.getElementById('graph').getBoundingClientRect();
            return {{x: f.x + g.x + 12, y: f.y + g.y + g.height / 2}}; }})()""")

    p = graph_point()
    cdp.send("Input.dispatchMouseEvent", type="mouseWheel", x=p["x"], y=p["y"], deltaX=0, deltaY=300)
    cdp.evaluate("new Promise(r => setTimeout(r, 300))")
    assert cdp.evaluate("window.scrollY") > 100
    assert cdp.evaluate(f"{inner}.dashboard.zoom()") == 1
    # ... with ctrl held it zooms the graph ...
    p = graph_point()
    cdp.send(
        "Input.dispatchMouseEvent",
        type="mouseWheel",
        x=p["x"],
        y=p["y"],
        deltaX=0,
        deltaY=-300,
        modifiers=CTRL,
    )
    cdp.evaluate(FRAME)
    assert cdp.evaluate(f"{inner}.dashboard.zoom()") > 1
    cdp.evaluate(f"{inner}.document.getElementById('reset-view').click()")
    # ... and once the graph has the focus (a click), the plain wheel zooms it.
    scrolled = cdp.evaluate("window.scrollY")
    cdp.click(p["x"], p["y"])
    cdp.send("Input.dispatchMouseEvent", type="mouseWheel", x=p["x"], y=p["y"], deltaX=0, deltaY=-300)
    cdp.evaluate(FRAME)
    assert cdp.evaluate(f"{inner}.dashboard.zoom()") > 1 and cdp.evaluate("window.scrollY") == scrolled
    cdp.evaluate(f"{inner}.document.getElementById('reset-view').click()")

    # A click on a latent shows its details beside the graph, in view without scrolling.
    box = cdp.evaluate(f"""(() => {{ const d = {inner}.dashboard, N = d.data.nodes, doc = {inner}.document;
        const lat = N.map((n, i) => i).filter(i => N[i].type === 'latent');
        lat.sort((a, b) => N[b].influence - N[a].influence);
        const r = doc.querySelector(`.node[data-index="${{lat[0]}}"] .shape`).getBoundingClientRect(),
            f = document.querySelector('iframe').getBoundingClientRect();
        return {{x: f.x + r.x + r.width / 2, y: f.y + r.y + r.height / 2}}; }})()""")
    assert 0 < box["y"] < 900
    cdp.click(box["x"], box["y"])
    facts = cdp.evaluate(f"""(() => {{ const doc = {inner}.document,
        f = document.querySelector('iframe').getBoundingClientRect();
        const t = doc.querySelector('#panel table.facts').getBoundingClientRect(),
            g = doc.getElementById('graph').getBoundingClientRect();
        return {{top: f.y + t.top, bottom: f.y + t.bottom, left: t.left, graph_right: g.right}}; }})()""")
    assert facts["left"] >= facts["graph_right"] - 1, facts  # beside the graph, not under it
    assert 0 <= facts["top"] and facts["bottom"] <= 900, facts
    assert_clean(cdp)

    # Where the output does not run (an untrusted notebook drops scripts and frames), the line says what
    # to do.
    untrusted = re.sub(r"<script>.*?</script>|<iframe.*?</iframe>", "", frame, flags=re.S)
    notebook.write_text(f"<!DOCTYPE html><body>{cell.format(untrusted)}</body>", encoding="utf-8")
    cdp.open(notebook.resolve().as_uri(), 935, height=900)
    text = cdp.evaluate(f"{note}.offsetHeight > 0 && {note}.innerText")
    assert text and "trust the notebook" in text and "re-run this cell" in text, text


def test_connection_lists_split_by_sign_sorted_by_share_and_expand(page, tmp_path):
    result = synthetic_result()
    create_attribution_dashboard(result, None, output_dir=tmp_path, display=False)
    cdp = page
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    view = view_graph(result)
    into: dict[int, list] = {}
    for s, t, w in view.edges:
        into.setdefault(t, []).append((s, w))
    target = max(into, key=lambda t: len(into[t]))  # the node with the most inputs
    total = sum(abs(w) for _, w in into[target])
    cdp.evaluate(f"window.dashboard.select({target})")
    ids = [result.graph.nodes[i].node_id for i in view.indices]
    for sign, keep in (("pos", lambda w: w >= 0), ("neg", lambda w: w < 0)):
        want = sorted(((s, w / total) for s, w in into[target] if keep(w)), key=lambda x: -abs(x[1]))
        assert len(want) > 10
        rows = f"#panel [data-list='in-{sign}'] [data-goto]"
        assert cdp.evaluate(f'document.querySelectorAll("{rows}").length') == 10
        more = cdp.evaluate(f"document.querySelector(\"[data-more='in-{sign}']\").textContent")
        assert more == f"\u2026 {len(want) - 10} more"
        # The "more" button is a button: the keyboard reaches it; a click lists every row.
        cdp.evaluate(f"document.querySelector(\"[data-more='in-{sign}']\").focus()")
        assert cdp.evaluate("document.activeElement.dataset.more") == f"in-{sign}"
        enter = dict(key="Enter", code="Enter", windowsVirtualKeyCode=13)
        cdp.send("Input.dispatchKeyEvent", type="keyDown", text="\r", **enter)
        cdp.send("Input.dispatchKeyEvent", type="keyUp", **enter)
        got = cdp.evaluate(f"""[...document.querySelectorAll("{rows}")].map(e =>
            [+e.dataset.goto, parseFloat(e.lastElementChild.textContent)])""")
        assert [x for _, x in got] == pytest.approx([100 * x for _, x in want], abs=0.051)
        assert {ids[i] for i, _ in got} == {ids[s] for s, _ in want}
    assert_clean(cdp)


LABEL_BOXES = """[...document.querySelectorAll('#graph .node text')].map(t => {
    const r = t.getBoundingClientRect();
    return {node: t.closest('.node').dataset.nodeId, text: t.textContent,
            box: [r.left, r.top, r.right, r.bottom]};
})"""


def assert_no_overlap(labels: list[dict]) -> None:
    for k, a in enumerate(labels):
        for b in labels[k + 1 :]:
            (l1, t1, r1, b1), (l2, t2, r2, b2) = a["box"], b["box"]
            assert not (l1 < r2 - 0.5 and l2 < r1 - 0.5 and t1 < b2 - 0.5 and t2 < b1 - 0.5), (a, b)


def test_labels_are_drawn_and_never_overlap(page, toy_dashboard, tmp_path):
    _, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    labels = cdp.evaluate(LABEL_BOXES)
    latents = [lab for lab in labels if lab["node"].split("_")[1].isdigit()]  # "{layer}_{f}_{pos}"
    assert len(latents) >= 5, labels  # the most influential latents say what they are
    assert_no_overlap(labels)

    # Pinned nodes crowded in one row of a big graph: every one labelled, no two labels on top of each other.
    result = synthetic_result()
    create_attribution_dashboard(result, None, output_dir=tmp_path, display=False)
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    pinned = cdp.evaluate("""(() => {
        const d = window.dashboard, its = d.items().filter(it => it.type === 'latent' && it.row === 9);
        its.sort((a, b) => a.bx - b.bx);
        const pick = its.slice(0, 8).map(it => it.node);
        pick.forEach(i => d.togglePin(i));
        return pick.map(i => d.data.nodes[i].id); })()""")
    for node_id in pinned:
        cdp.evaluate(
            f"window.dashboard.state.labels[{json.dumps(node_id)}] = 'pinned label ' + {json.dumps(node_id)}"
        )
    cdp.evaluate("window.dashboard.redraw()")
    labels = cdp.evaluate(LABEL_BOXES)
    assert {lab["node"] for lab in labels} >= set(pinned)
    assert_no_overlap(labels)
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)


def test_subgraph_edges_between_nodes_at_one_token_stay_visible(page, tmp_path):
    """Three nodes at one token in three rows, a -> c and b -> c of opposite signs: a -> c runs past b, so
    drawn straight it would lie under b -> c."""
    result = synthetic_result()
    create_attribution_dashboard(result, None, output_dir=tmp_path, display=False)
    view = view_graph(result)
    nodes = result.graph.nodes
    into: dict[int, dict[int, float]] = {}
    for s, t, w in view.edges:
        into.setdefault(t, {})[s] = w

    def row(k):
        node = nodes[view.indices[k]]
        return -1 if node.node_type.value == "embedding" else int(node.layer)

    def ctx(k):
        return nodes[view.indices[k]].ctx_idx

    a, b, c = next(
        (a, b, c)
        for c, sources in into.items()
        for b, w_bc in sources.items()
        for a, w_ac in sources.items()
        if ctx(a) == ctx(b) == ctx(c) and row(a) < row(b) < row(c) and (w_ac > 0) != (w_bc > 0)
    )
    cdp = page
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    for k in (a, b, c):
        cdp.evaluate(f"window.dashboard.togglePin({k})")
    cdp.evaluate("document.getElementById('subgraph-btn').click()")
    shapes = cdp.evaluate("window.dashboard.edgeShapes()")
    by_pair = {}
    for g in shapes:
        e = cdp.evaluate(f"window.dashboard.data.edges[{g['edge']}]")
        by_pair[(e[0], e[1])] = g
    ac, bc = by_pair[(a, c)], by_pair[(b, c)]

    def point(g, u):  # a point on the drawn edge
        if g["cx"] is None:
            return g["x1"] + u * (g["x2"] - g["x1"]), g["y1"] + u * (g["y2"] - g["y1"])
        v = 1 - u
        return (
            v * v * g["x1"] + 2 * u * v * g["cx"] + u * u * g["x2"],
            v * v * g["y1"] + 2 * u * v * g["cy"] + u * u * g["y2"],
        )

    # Halfway between b and c, a -> c keeps clear of b -> c ...
    u = (ac["y1"] - (bc["y1"] + bc["y2"]) / 2) / (ac["y1"] - ac["y2"])
    x, y = point(ac, u)
    nearest = min(((x - bx) ** 2 + (y - by) ** 2) ** 0.5 for bx, by in (point(bc, q / 40) for q in range(41)))
    assert nearest > 4, (u, nearest, ac, bc)
    # ... and the canvas shows a -> c in its own colour there.
    rgba = cdp.evaluate(f"""(() => {{
        const c = document.getElementById('edge-canvas'), dpr = c.width / c.clientWidth;
        const px = c.getContext('2d').getImageData(Math.round({x} * dpr), Math.round({y} * dpr), 1, 1);
        return [...px.data]; }})()""")
    assert rgba[3] > 0, rgba
    positive = ac["weight"] > 0
    assert (rgba[2] > rgba[0]) == positive, (rgba, ac["weight"])  # blue positive, red negative
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)


def test_edge_filter_same_latent_everywhere_hiding_and_grouping_any_nodes(page, toy_dashboard, tmp_path):
    cdp = page
    d = "window.dashboard"
    # Hovering a latent lights the same latent at every other position: make one latent fire at three.
    result = synthetic_result()
    nodes = result.graph.nodes
    layer3 = [i for i, n in enumerate(nodes) if n.node_type.value == "latent" and n.layer == 3]
    at = {}
    for i in layer3:
        at.setdefault(nodes[i].ctx_idx, i)
    same = list(at.values())[:3]
    for i in same[1:]:
        nodes[i] = dataclasses.replace(nodes[i], feature=nodes[same[0]].feature)
    create_attribution_dashboard(result, None, output_dir=tmp_path, display=False)
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    where = {g: k for k, g in enumerate(cdp.evaluate(f"{d}.data.nodes.map(n => n.idx)"))}
    shown = [where[i] for i in same if i in where]
    assert len(shown) >= 2
    box = centre(cdp, f'.node[data-index="{shown[0]}"]')
    cdp.mouse("mouseMoved", box["x"], box["y"])
    lit = cdp.evaluate("[...document.querySelectorAll('.node.same')].map(e => +e.dataset.index)")
    assert sorted(lit) == sorted(shown[1:])
    cdp.mouse("mouseMoved", 5, 5)
    assert cdp.evaluate("document.querySelectorAll('.node.same').length") == 0

    _, index, _ = toy_dashboard
    open_fresh(cdp, index.resolve().as_uri(), 1400)

    # The edge filter: a clicked node's inputs, outputs, or both.
    node = cdp.evaluate(f"""(() => {{ const E = {d}.data.edges, into = {{}}, out = {{}};
        E.forEach(e => {{ into[e[1]] = (into[e[1]] || 0) + 1; out[e[0]] = (out[e[0]] || 0) + 1; }});
        return {d}.data.nodes.findIndex((n, i) => into[i] && out[i]); }})()""")
    edges = cdp.evaluate(f"{d}.data.edges")
    ins = sorted(j for j, e in enumerate(edges) if e[1] == node)
    outs = sorted(j for j, e in enumerate(edges) if e[0] == node)
    cdp.evaluate(f"{d}.select({node})")
    for value, want in (("in", ins), ("out", outs), ("both", sorted(ins + outs))):
        cdp.evaluate(f"""(() => {{ const s = document.getElementById('link-type'); s.value = '{value}';
            s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()""")
        assert sorted(cdp.evaluate(f"{d}.drawnEdges()")) == want, value

    # Hide the clicked node: gone from the drawing, its edges too, even with "show all"; then back.
    hidden_id = cdp.evaluate(f"{d}.data.nodes[{node}].id")
    cdp.evaluate("document.getElementById('hide-btn').click()")
    assert cdp.evaluate(f"document.querySelectorAll('.node[data-index=\"{node}\"]').length") == 0
    cdp.evaluate("document.getElementById('show-all').click()")
    drawn = set(cdp.evaluate(f"{d}.drawnEdges()"))
    assert drawn and not drawn & set(ins + outs)
    assert json.loads(cdp.evaluate(f"{d}.stateJSON()"))["qParams"]["hiddenIds"] == [hidden_id]
    cdp.evaluate("document.getElementById('show-all').click()")
    assert cdp.evaluate("document.getElementById('unhide-btn').textContent") == "show hidden (1)"
    cdp.evaluate("document.getElementById('unhide-btn').click()")
    assert cdp.evaluate(f"document.querySelectorAll('.node[data-index=\"{node}\"]').length") == 1

    # Any nodes group into a supernode, not only latents: a latent and an embedding here.
    pair = cdp.evaluate(f"""(() => {{ const N = {d}.data.nodes;
        return [N.findIndex(n => n.type === 'latent'), N.findIndex(n => n.type === 'embedding')]; }})()""")
    assert cdp.evaluate(f"{d}.group('mixed', {json.dumps(pair)})")
    assert cdp.evaluate(f"{d}.state.supernodes.map(s => s.members)") == [pair]
    cdp.evaluate(f"{d}.forget()")
    assert_clean(cdp)


def test_resizable_panel_and_draggable_subgraph_positions_are_kept(page, toy_dashboard):
    result, index, _ = toy_dashboard
    cdp = page
    url = index.resolve().as_uri()
    open_fresh(cdp, url, 1400)
    d = "window.dashboard"
    width = "document.getElementById('panel').getBoundingClientRect().width"
    graph_w = "document.getElementById('graph-svg').getAttribute('width')"
    w0, g0 = cdp.evaluate(width), float(cdp.evaluate(graph_w))
    bar = centre(cdp, "#splitter")
    cdp.mouse("mouseMoved", bar["x"], bar["y"])
    cdp.mouse("mousePressed", bar["x"], bar["y"])
    cdp.mouse("mouseMoved", bar["x"] - 150, bar["y"])
    cdp.mouse("mouseReleased", bar["x"] - 150, bar["y"])
    w1 = cdp.evaluate(width)
    assert w1 == pytest.approx(w0 + 150, abs=3) and float(cdp.evaluate(graph_w)) < g0 - 100
    # The keyboard reaches the splitter too.
    cdp.evaluate("document.getElementById('splitter').focus()")
    cdp.send(
        "Input.dispatchKeyEvent",
        type="keyDown",
        key="ArrowRight",
        code="ArrowRight",
        windowsVirtualKeyCode=39,
    )
    assert cdp.evaluate(width) == pytest.approx(w1 - 20, abs=2)

    # Pin two nodes, look at their subgraph, drag one somewhere else.
    two = cdp.evaluate(f"""(() => {{ const N = {d}.data.nodes,
        lat = N.map((n, i) => i).filter(i => N[i].type === 'latent');
        lat.sort((a, b) => N[b].influence - N[a].influence); return lat.slice(0, 2); }})()""")
    for i in two:
        cdp.evaluate(f"{d}.togglePin({i})")
    cdp.evaluate("document.getElementById('subgraph-btn').click()")
    sel = f'.node[data-index="{two[0]}"]'
    a = centre(cdp, sel)
    for kind, x, y in (
        ("mouseMoved", 0, 0),
        ("mousePressed", 0, 0),
        ("mouseMoved", 40, 30),
        ("mouseMoved", 80, 60),
    ):
        cdp.mouse(kind, a["x"] + x, a["y"] + y)
    cdp.mouse("mouseReleased", a["x"] + 80, a["y"] + 60)
    b = centre(cdp, sel)
    assert (b["x"] - a["x"], b["y"] - a["y"]) == pytest.approx((80, 60), abs=2)
    assert cdp.evaluate("document.getElementById('panel').classList.contains('empty')")  # a drag is no click
    node_id = cdp.evaluate(f"{d}.data.nodes[{two[0]}].id")
    assert node_id in json.loads(cdp.evaluate(f"{d}.stateJSON()"))["qParams"]["sgPositions"]
    # Both are kept: out of the subgraph and back, and in a page opened again.
    cdp.evaluate("document.getElementById('subgraph-btn').click()")
    cdp.evaluate("document.getElementById('subgraph-btn').click()")
    assert centre(cdp, sel) == pytest.approx(b, abs=1)
    cdp.open(url, 1400)
    assert cdp.evaluate(width) == pytest.approx(w1 - 20, abs=2)
    cdp.evaluate("document.getElementById('subgraph-btn').click()")
    assert centre(cdp, sel) == pytest.approx(b, abs=1)
    cdp.evaluate(f"{d}.forget()")
    assert cdp.evaluate(width) == pytest.approx(w0, abs=1)
    assert_clean(cdp)


def test_pinned_subgraph_scores_match_compute_graph_scores(page, toy_dashboard):
    """The page's scores of the pinned subgraph equal `compute_graph_scores` on the drawn graph with every
    unpinned latent made an error node (its inputs cut)."""
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    view = view_graph(result)
    nodes = [result.graph.nodes[i] for i in view.indices]
    latents = [k for k, n in enumerate(nodes) if n.node_type.value == "latent"]
    latents.sort(key=lambda k: -float(result.influence[view.indices[k]]))
    for pins in (latents[:1], latents[:4], latents):
        cdp.evaluate("window.dashboard.forget()")
        for k in pins:
            cdp.evaluate(f"window.dashboard.togglePin({k})")
        got = cdp.evaluate("window.dashboard.subgraphScores()")
        unpinned = set(latents) - set(pins)
        A = torch.zeros(len(nodes), len(nodes))
        for s, t, w in view.edges:
            if t not in unpinned:
                A[t, s] = w
        fake = SimpleNamespace(
            adjacency_matrix=A,
            graph=SimpleNamespace(
                nodes=[
                    dataclasses.replace(n, node_type=NodeType.MLP_ERROR) if k in unpinned else n
                    for k, n in enumerate(nodes)
                ],
                n_layers=result.graph.n_layers,
            ),
            logit_weights=result.logit_weights,
        )
        want = compute_graph_scores(fake)
        assert got["replacement"] == pytest.approx(want["replacement_score"], rel=1e-4), (
            len(pins),
            got,
            want,
        )
        assert got["completeness"] == pytest.approx(want["completeness_score"], rel=1e-4), (
            len(pins),
            got,
            want,
        )
        shown = cdp.evaluate("document.querySelector('#pins .sub-scores').textContent")
        value = float(f"{got['replacement']:.3g}")
        assert f"replacement {value:g}" in shown, shown
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)


def test_supernode_suggestions_join_latents_whose_decoders_agree(page, world, tmp_path):
    model, tcs, result, _ = world
    utils.create_attribution_dashboard(result, model, tcs, output_dir=tmp_path, display=False)
    view = view_graph(result)
    nodes = [result.graph.nodes[i] for i in view.indices]
    latents = [k for k, n in enumerate(nodes) if n.node_type.value == "latent"]
    # Expected, independently: one group per connected set of latents that are the same latent or whose
    # W_dec rows have cosine >= 0.5.
    parent = {k: k for k in latents}

    def root(k):
        while parent[k] != k:
            k = parent[k]
        return k

    def direction(k):
        row = tcs[nodes[k].layer].W_dec[nodes[k].feature].detach().float()
        return row / row.norm()

    for x in latents:
        for y in latents:
            same = (nodes[x].layer, nodes[x].feature) == (nodes[y].layer, nodes[y].feature)
            if x < y and (same or float(direction(x) @ direction(y)) >= 0.5):
                parent[root(y)] = root(x)
    groups: dict[int, set] = {}
    for k in latents:
        groups.setdefault(root(k), set()).add(k)
    want = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    assert want, "the toy graph has latents whose decoders agree"

    cdp = page
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    cdp.evaluate("document.getElementById('suggest-btn').click()")
    got = sorted(sorted(g["members"]) for g in cdp.evaluate("window.dashboard.suggest()"))
    assert got == want
    assert cdp.evaluate("document.querySelectorAll('#pins .suggest').length") == len(want)
    cdp.evaluate("document.querySelector('#pins [data-suggest]').click()")
    assert sorted(
        sorted(m) for m in cdp.evaluate("window.dashboard.state.supernodes.map(s => s.members)")
    ) == [got[0]]
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)


def test_edges_coloured_by_share_of_their_targets_input(page, toy_dashboard):
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    view = view_graph(result)
    total: dict[int, float] = {}
    for _, t, w in view.edges:
        total[t] = total.get(t, 0.0) + abs(w)
    weights = {j: (s, t, w) for j, (s, t, w) in enumerate(view.edges)}
    biggest = max(abs(w) for *_, w in view.edges)
    cdp.evaluate("document.getElementById('show-all').click()")
    for mode, want in (
        ("weight", lambda s, t, w: abs(w) / biggest),
        ("share", lambda s, t, w: abs(w) / total[t]),
    ):
        cdp.evaluate(f"""(() => {{ const s = document.getElementById('color-by'); s.value = '{mode}';
            s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()""")
        shapes = cdp.evaluate("window.dashboard.edgeShapes()")
        assert len(shapes) == len(view.edges)
        for g in shapes:
            assert g["strength"] == pytest.approx(min(1.0, want(*weights[g["edge"]])), rel=1e-3, abs=1e-6), (
                mode
            )
    assert json.loads(cdp.evaluate("window.dashboard.stateJSON()"))["qParams"]["colorBy"] == "share"
    cdp.evaluate("window.dashboard.forget()")
    assert cdp.evaluate("document.getElementById('color-by').value") == "weight"
    assert_clean(cdp)


def test_narrow_view_shows_the_logits(page, toy_dashboard):
    _, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 700, height=900)
    boxes = cdp.evaluate("""[...document.querySelectorAll('.node[data-type=logit]')].map(e => {
        const r = e.getBoundingClientRect(); return [r.left, r.right, r.top, r.bottom]; })""")
    assert boxes
    for left, right, top, bottom in boxes:
        assert 0 <= left and right <= 700 and 0 <= top and bottom <= 900, boxes
    # No horizontal scrolling, and (this narrow) the panel sits under the graph.
    assert cdp.evaluate("document.documentElement.scrollWidth") <= 700
    graph_bottom = cdp.evaluate("document.getElementById('graph').getBoundingClientRect().bottom")
    assert cdp.evaluate("document.getElementById('panel').getBoundingClientRect().top") >= graph_bottom
    shot(cdp, "dashboard-700.png")
    assert_clean(cdp)


def test_chromium_missing_gives_install_hint(monkeypatch):
    monkeypatch.setenv("CHROMIUM", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert find_chromium(try_install=False) is None
    assert "scripts/install_chromium.sh" in INSTALL_HINT


# ------------------------------------------------------------------------------------------------------------
# Issue 26: the workbench as researchers keep using it.


@pytest.fixture(scope="module")
def planted_dashboard(planted_world, tmp_path_factory):
    """The planted world's graph of the CLI's default prompt, as `make graph` draws it."""
    from part3_attribution_graphs.__main__ import DEFAULT_PROMPTS

    model, tcs = planted_world
    result = attribute(model, tcs, format_prompt(*DEFAULT_PROMPTS["planted"]), batch_size=64)
    out = tmp_path_factory.mktemp("planted")
    create_attribution_dashboard(result, model, tcs, output_dir=out, display=False)
    return result, out / "index.html"


def set_state(cdp, q_params: dict) -> None:
    """Give the page a state as "load state" would (through the page's own applyState)."""
    cdp.evaluate(f"window.dashboard.applyState({{qParams: {json.dumps(q_params)}}})")


def pinned_ids(cdp) -> list[str]:
    return cdp.evaluate("window.dashboard.state.pinned.map(i => window.dashboard.data.nodes[i].id)")


def test_saved_page_is_a_snapshot_and_copies_keep_their_own_state(page, toy_dashboard, tmp_path):
    """Save, go on editing, reopen the save: the save shows what was saved (the later edits are offered);
    a copy of the page elsewhere, or another build of the graph, starts clean (another copy's state is
    offered)."""
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    latents = cdp.evaluate("""window.dashboard.data.nodes.map((n, i) => n.type === 'latent' ? n.id : null)
        .filter(Boolean).slice(0, 3)""")
    set_state(cdp, {"pinnedIds": latents[:1]})
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    cdp.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    cdp.evaluate("document.getElementById('save-btn').click()")
    saved = wait_for_glob(downloads, "*.html")
    # Go on editing the original, then open the save in this browser: it shows what was saved.
    set_state(cdp, {"pinnedIds": latents[:3]})
    cdp.open(saved.resolve().as_uri(), 1400)
    assert pinned_ids(cdp) == latents[:1]
    # Edit the saved page itself, reopen it: still the snapshot, and the later edits are offered.
    set_state(cdp, {"pinnedIds": latents[:2]})
    cdp.open(saved.resolve().as_uri(), 1400)
    assert pinned_ids(cdp) == latents[:1]
    assert cdp.evaluate("!document.getElementById('offer').hidden")
    cdp.evaluate("document.getElementById('offer-btn').click()")
    assert pinned_ids(cdp) == latents[:2]

    # A copy in another folder, and another build of the same graph: neither takes the original's state.
    copy = tmp_path / "copy" / "index.html"
    copy.parent.mkdir()
    shutil.copy(index, copy)
    rebuilt = tmp_path / "rebuilt"
    create_attribution_dashboard(result, None, output_dir=rebuilt, display=False)
    for other in (copy, rebuilt / "index.html"):
        cdp.open(other.resolve().as_uri(), 1400)
        assert pinned_ids(cdp) == [], other
        assert cdp.evaluate("!document.getElementById('offer').hidden"), other  # offered, not imposed
    cdp.open(index.resolve().as_uri(), 1400)
    assert pinned_ids(cdp) == latents[:3]  # the original kept its own
    cdp.evaluate("localStorage.clear()")
    assert_clean(cdp)
    # Saves are named after the prompt and the time, not one name for every save.
    name = re.compile(r"attribution-graph_[a-z0-9-]*large_\d{4}-\d\d-\d\d_\d{4}\.html")
    assert name.fullmatch(saved.name), saved.name


def sweep_signature(pairs, result) -> list[list[int]]:
    """Per (node_t, edge_t): [nodes, edges, node checksum, edge checksum] of view_graph(prune(...))."""
    out = []
    for node_t, edge_t in pairs:
        want = view_graph(prune(result, node_t, edge_t))
        where = want.indices
        out.append(
            [
                len(where),
                len(want.edges),
                sum(i * i for i in where),
                sum(where[s] * 1_000_003 + where[t] for s, t, _ in want.edges),
            ]
        )
    return out


PAGE_SIGNATURE = """(pairs => pairs.map(p => {
    const g = window.dashboard.pruneAt(p[0], p[1]);
    return [g.nodes.length, g.edges.length, g.nodes.reduce((a, i) => a + i * i, 0),
            g.edges.reduce((a, e) => a + e[0] * 1000003 + e[1], 0)];
}))"""


def assert_sliders_exact_everywhere(cdp, result, node_steps) -> None:
    """Through the sliders at 1.0 (edge) for each node step, then without drawing at every edge step."""
    own = float(result.settings["node_threshold"])
    assert_sliders_prune_as_python(cdp, result, [(own, 1.0)])
    assert cdp.evaluate("document.getElementById('node-thr').max") == "1"  # the graph can be widened fully
    assert_sliders_prune_as_python(cdp, result, [(1.0, 1.0), (1.0, 0.85)])
    pairs = [(n, e / 100) for n in node_steps for e in range(5, 101)]
    got = cdp.evaluate(f"{PAGE_SIGNATURE}({json.dumps(pairs)})")
    want = sweep_signature(pairs, result)
    bad = [(p, g, w) for p, g, w in zip(pairs, got, want) if g != w]
    assert not bad, (len(bad), bad[:5])


def test_sliders_equal_prune_at_every_edge_step_on_the_planted_graph(page, planted_dashboard):
    result, index = planted_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    assert_sliders_exact_everywhere(cdp, result, (0.5, 0.8, 0.95, 1.0))
    assert_clean(cdp)


def test_sliders_equal_prune_at_every_edge_step_on_the_toy_graph(page, toy_dashboard):
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    assert_sliders_exact_everywhere(cdp, result, (0.8, 1.0))
    assert_clean(cdp)


def test_sliders_equal_prune_at_every_edge_step_on_a_30k_edge_graph(page, tmp_path):
    result = synthetic_result()
    create_attribution_dashboard(result, None, output_dir=tmp_path, display=False)
    cdp = page
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    assert_sliders_exact_everywhere(cdp, result, (1.0,))
    assert_clean(cdp)


def test_unpinning_a_member_takes_it_out_of_its_supernode(page, toy_dashboard):
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    view = view_graph(result)
    latents = [k for k, i in enumerate(view.indices) if result.graph.nodes[i].node_type.value == "latent"]
    latents.sort(key=lambda k: -float(result.influence[view.indices[k]]))
    three = latents[:3]
    for k in three:
        cdp.evaluate(f"window.dashboard.togglePin({k})")
    assert cdp.evaluate(f"window.dashboard.group('three', {json.dumps(three)})")
    # Unpin one member as a learner does: a ctrl-click on it in the whole graph.
    node_id = result.graph.nodes[view.indices[three[2]]].node_id
    box = centre(cdp, f'.node[data-node-id="{node_id}"]')
    cdp.click(box["x"], box["y"], modifiers=CTRL)
    got = cdp.evaluate("""(() => { const s = window.dashboard.state;
        return {pinned: s.pinned.slice().sort((a, b) => a - b),
                members: s.supernodes.map(sn => sn.members.slice().sort((a, b) => a - b)),
                scores: window.dashboard.subgraphScores()}; })()""")
    assert got["pinned"] == sorted(three[:2]) and got["members"] == [sorted(three[:2])], got
    # The scores are those of the two pins alone (grouped or not, a group is its members).
    cdp.evaluate("window.dashboard.forget()")
    for k in three[:2]:
        cdp.evaluate(f"window.dashboard.togglePin({k})")
    assert got["scores"] == cdp.evaluate("window.dashboard.subgraphScores()")
    # Unpinning one of the last two dissolves the group.
    cdp.evaluate(f"window.dashboard.group('two', {json.dumps(three[:2])})")
    cdp.evaluate(f"window.dashboard.togglePin({three[0]})")
    assert cdp.evaluate("window.dashboard.state.supernodes.length") == 0
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)


def load_state_file(cdp, path: Path) -> None:
    """ "load state" as a learner uses it: the file chooser given `path`."""
    doc = cdp.send("DOM.getDocument")
    node = cdp.send("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#load-file")
    cdp.send("DOM.setFileInputFiles", files=[str(path)], nodeId=node["nodeId"])
    cdp.evaluate("new Promise(r => setTimeout(r, 300))")


def test_load_state_refuses_bad_fields_with_a_message(page, toy_dashboard, tmp_path):
    result, index, _ = toy_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), 1400)
    good = json.loads(cdp.evaluate("window.dashboard.stateJSON()"))
    before = cdp.evaluate("JSON.stringify(window.dashboard.state)")
    latent = next(n["id"] for n in cdp.evaluate("window.dashboard.data.nodes") if n["type"] == "latent")
    cases = {
        "node_threshold": {"node_threshold": -5},
        "edge_threshold": {"edge_threshold": 7},
        "pinnedIds": {"pinnedIds": ["no_such_node"]},
        "supernodes": {"supernodes": [["one", latent]]},
        "linkType": {"linkType": "sideways"},
        "colorBy": {"colorBy": 3},
        "panelWidth": {"panelWidth": "wide"},
        "hiddenIds": {"hiddenIds": "no_such_node"},
        "labels": {"labels": {"no_such_node": "x"}},
    }
    for field, bad in cases.items():
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps({**good, "qParams": {**good["qParams"], **bad}}))
        load_state_file(cdp, path)
        status = cdp.evaluate("document.getElementById('status').textContent")
        assert status.startswith("did not load") and field in status, (field, status)
        assert cdp.evaluate("JSON.stringify(window.dashboard.state)") == before, field  # nothing taken
        assert drawn_graph(cdp)["header_edge_thr"] == "0.85"
    # A good file loads.
    path = tmp_path / "good.json"
    path.write_text(json.dumps({**good, "qParams": {**good["qParams"], "node_threshold": 0.5}}))
    load_state_file(cdp, path)
    assert cdp.evaluate("window.dashboard.state.nodeThr") == 0.5
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)


def test_reset_clears_everything_and_the_header_counts_what_is_drawn(page, world, tmp_path):
    model, tcs, result, _ = world
    utils.create_attribution_dashboard(result, model, tcs, output_dir=tmp_path, display=False)
    cdp = page
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    cdp.evaluate("document.getElementById('suggest-btn').click()")
    assert cdp.evaluate("document.querySelectorAll('#pins .suggest').length") > 0
    # Hide a node: the header counts what is drawn.
    cdp.evaluate("window.dashboard.select(window.dashboard.data.nodes.findIndex(n => n.type === 'latent'))")
    cdp.evaluate("document.getElementById('hide-btn').click()")
    got = drawn_graph(cdp)
    assert got["header_nodes"] == len(got["ids"]) == len(view_graph(result).indices) - 1, got
    # With "show all edges" every drawn edge is drawn: as many as the header says.
    cdp.evaluate("document.getElementById('show-all').click()")
    n_drawn = cdp.evaluate("window.dashboard.drawnEdges().length")
    assert got["header_edges"] == n_drawn < len(view_graph(result).edges)
    # Reset: no pins, no suggestions, nothing hidden, every edge toggle back.
    cdp.evaluate("document.getElementById('forget-btn').click()")
    after = cdp.evaluate("""({suggest: document.querySelectorAll('#pins .suggest').length,
        pins: document.getElementById('pins').textContent,
        hidden: Object.keys(window.dashboard.state.hidden).length,
        showAll: document.getElementById('show-all').checked,
        nodes: document.querySelectorAll('#graph .node').length})""")
    assert after == {
        "suggest": 0,
        "pins": "",
        "hidden": 0,
        "showAll": False,
        "nodes": len(view_graph(result).indices),
    }, after
    assert_clean(cdp)


def label_overlaps(cdp) -> list:
    """Every label that covers a node's shape or another label (boxes as drawn, half a pixel of slack)."""
    return cdp.evaluate("""(() => {
        const box = el => {
            const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
        const hit = (a, b) =>
            a[0] < b[2] - 0.5 && b[0] < a[2] - 0.5 && a[1] < b[3] - 0.5 && b[1] < a[3] - 0.5;
        const labels = [...document.querySelectorAll('#graph .node text')].map(t => ({
            id: t.closest('.node').dataset.nodeId, text: t.textContent, box: box(t)}));
        const shapes = [...document.querySelectorAll('#graph .node .shape')].map(s => ({
            id: s.closest('.node').dataset.nodeId, box: box(s)}));
        const out = [];
        labels.forEach((a, k) => {
            shapes.forEach(s => { if (hit(a.box, s.box)) out.push([a.id, a.text, 'covers node', s.id]); });
            labels.slice(k + 1).forEach(b => {
                if (hit(a.box, b.box)) out.push([a.id, a.text, 'covers label', b.id]); });
        });
        return out; })()""")


@pytest.mark.parametrize("width", [700, 1000, 1400, 1600, 2000])
def test_labels_cover_no_node_and_no_label_at_any_width(page, planted_dashboard, width):
    _, index = planted_dashboard
    cdp = page
    open_fresh(cdp, index.resolve().as_uri(), width)
    assert cdp.evaluate("document.querySelectorAll('#graph .node text.lab:not(.tok)').length") >= 1
    assert label_overlaps(cdp) == []
    # Widened to every node, with the five most influential latents pinned (their labels always wanted).
    set_sliders(cdp, 1.0, 0.85)
    cdp.evaluate("""(() => { const d = window.dashboard, lat = d.items().filter(it => it.type === 'latent');
        lat.sort((a, b) => b.influence - a.influence);
        lat.slice(0, 5).forEach(it => d.togglePin(it.node)); })()""")
    assert label_overlaps(cdp) == []
    assert cdp.evaluate("document.querySelectorAll('#graph .node.pinned text').length") >= 3
    if width == 1600:
        shot(cdp, "labels-planted-1600.png")
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)


@pytest.fixture(scope="module")
def explorer(world):
    from part3_attribution_graphs.explorer import attribution_explorer

    model, tcs, result, _ = world
    return attribution_explorer(
        model, tcs, {"opposites": result.prompt}, results={result.prompt: result}, display=False
    )


LAB_OUTPUTS = """<!DOCTYPE html><body><div class="jp-OutputArea">
<div class="jp-OutputArea-child"><div class="jp-OutputArea-output">{snapshot}</div></div>
<div class="jp-OutputArea-child"><div class="jp-OutputArea-output" id="widget">{widget}</div></div>
</div></body>"""


def test_explorer_shows_a_picture_of_its_graph_where_the_widget_cannot_run(page, explorer, tmp_path):
    """JupyterLab's outputs of the explorer cell: the picture, then the widget. Live, the widget shows and
    the picture hides; reopened without the kernel ("model not found"), the picture shows and the error
    hides; untrusted (no scripts), the picture shows."""
    from part3_attribution_graphs.explorer import ExplorerSnapshot

    snapshot = ExplorerSnapshot(explorer)._repr_html_()
    cdp = page
    shown = "document.querySelector('.p3ag-explorer-snapshot').offsetHeight > 0"
    widget_shown = "document.getElementById('widget').offsetHeight > 0"
    cases = {
        "live": ('<div class="widget-vbox">the live explorer</div>', False, True),
        "reopened": (
            '<div class="jupyter-widgets">Error displaying widget: model not found</div>',
            True,
            False,
        ),
        "untrusted": (
            "Attribution explorer (a live widget: it needs this notebook's kernel; re-run the cell)",
            True,
            True,
        ),
    }
    for case, (widget, picture, widget_visible) in cases.items():
        body = re.sub(r"<script>.*?</script>", "", snapshot, flags=re.S) if case == "untrusted" else snapshot
        path = tmp_path / f"{case}.html"
        path.write_text(LAB_OUTPUTS.format(snapshot=body, widget=widget), encoding="utf-8")
        cdp.open(path.resolve().as_uri(), 1400)
        cdp.evaluate("new Promise(r => setTimeout(r, 800))")
        assert cdp.evaluate(shown) is picture, case
        assert cdp.evaluate(widget_shown) is widget_visible, case
        if picture:  # the picture is the graph the explorer drew: every kept node
            assert (
                cdp.evaluate("document.querySelectorAll('svg circle.node').length") == explorer.counts["kept"]
            )
            shot(cdp, f"explorer-{case}.png")
    assert_clean(cdp)
    assert "re-run the cell" in repr(explorer.widget)  # the widget's plain-text form says what to do


def test_supernode_suggestions_on_the_planted_graph_are_pythons_and_group_the_lands_latents(
    page, planted_world, tmp_path
):
    """With example data, the page's suggestions among the drawn latents are `suggested_groups` of
    `similar_latents` (the pairs the page ships), and on `make graph`'s question (a Caldor town) Caldor's
    latent at the planted site is drawn, and the Caldor latents drawn at the last position are one suggestion
    that holds no other land's latent (measured 2026-12-05: the site has one Caldor latent, so it has no
    partner there)."""
    from part3_attribution_graphs.__main__ import DEFAULT_PROMPTS
    from part3_attribution_graphs.views.examples import features_in_graph
    from part3_attribution_graphs.views.suggestions import similar_latents, suggested_groups
    from part3_attribution_graphs.worlds.planted import LAND_SITE, land_latents

    model, tcs = planted_world
    result = attribute(model, tcs, format_prompt(*DEFAULT_PROMPTS["planted"]), batch_size=64)
    examples = utils.make_toy_example_data(model, tcs, features_by_layer=features_in_graph(result))
    create_attribution_dashboard(
        result, model, tcs, example_data_by_layer=examples, output_dir=tmp_path, display=False
    )
    cdp = page
    open_fresh(cdp, (tmp_path / "index.html").resolve().as_uri(), 1400)
    nodes = cdp.evaluate("window.dashboard.data.nodes")
    drawn = {i: tuple(map(int, n["key"].split("_"))) for i, n in enumerate(nodes) if n["type"] == "latent"}
    cdp.evaluate("document.getElementById('suggest-btn').click()")
    got = [{drawn[i] for i in g["members"]} for g in cdp.evaluate("window.dashboard.suggest()")]
    keys = sorted(set(drawn.values()))
    groups = suggested_groups(keys, similar_latents(keys, tcs, examples))
    at_many = {k for k in keys if list(drawn.values()).count(k) > 1}  # one latent at several positions
    assert sorted(map(sorted, got)) == sorted(sorted(g) for g in groups if len(g) > 1 or g & at_many)
    by_land = land_latents(model, tcs)
    caldor = {(y, k) for y, _, k in by_land["Caldor"]}
    site = {(y, k) for y, p, k in by_land["Caldor"] if (y, p) == LAND_SITE}
    assert site & set(keys), "Caldor's latent at the planted site is not drawn"
    elsewhere = (caldor - site) & set(keys)
    others = {(y, k) for land, ls in by_land.items() if land != "Caldor" for y, _, k in ls}
    assert len(elsewhere) >= 2 and any(elsewhere <= g and not g & others for g in got), (elsewhere, got)
    cdp.evaluate("window.dashboard.forget()")
    assert_clean(cdp)
