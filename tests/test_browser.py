"""Render the toy dashboard in headless Chromium, offline, and check what a user would see.

Chromium is driven over the Chrome DevTools Protocol with a small client on `websocket-client`.
The page is opened from a file:// URL; every http(s)/ws(s) request is blocked and recorded, so the
test fails if the page tries to reach the network. A screenshot (after clicking a latent) is saved
to `out/test-artifacts/dashboard.png`.

Needs Debian's `chromium` (`bash scripts/install_chromium.sh`); if it is missing and cannot be
installed, the test is skipped. Set CHROMIUM=/path/to/binary to use another Chromium build.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

websocket = pytest.importorskip("websocket", reason="pip install websocket-client")

from part3_attribution_graphs import utils  # noqa: E402
from part3_attribution_graphs.attribution import attribute  # noqa: E402
from part3_attribution_graphs.scores import compute_graph_scores  # noqa: E402
from part3_attribution_graphs.toy import make_toy_world  # noqa: E402
from part3_attribution_graphs.worlds.gemma import format_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "out" / "test-artifacts"
INSTALL_HINT = ("install it with `bash scripts/install_chromium.sh` (Debian/Ubuntu: `sudo apt-get install chromium`), "
                "or set CHROMIUM=/path/to/chromium")


def find_chromium(try_install: bool = True) -> str | None:
    """Path of a Chromium binary; runs scripts/install_chromium.sh once if none is found."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    if try_install and os.environ.get("SKIP_CHROMIUM_INSTALL") != "1":
        try:
            subprocess.run(["bash", str(REPO / "scripts" / "install_chromium.sh")], capture_output=True,
                           timeout=300, env={**os.environ, "NONINTERACTIVE": "1"}, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return find_chromium(try_install=False)
    return None


class DevTools:
    """A minimal synchronous Chrome DevTools Protocol client for one page."""

    def __init__(self, ws_url: str, timeout: float = 30.0):
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})
            self._on_event(msg)

    def _on_event(self, msg: dict) -> None:
        if "method" not in msg:
            return
        self.events.append(msg)
        # Refuse every request that leaves the machine, and remember that it was tried.
        if msg["method"] == "Fetch.requestPaused":
            self.ws.send(json.dumps({"id": 10**9 + len(self.events), "method": "Fetch.failRequest",
                                     "params": {"requestId": msg["params"]["requestId"],
                                                "errorReason": "BlockedByClient"}}))

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.time() + timeout
        seen = len(self.events)
        for ev in self.events:
            if ev["method"] == method:
                return ev
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            self._on_event(msg)
            for ev in self.events[seen:]:
                if ev["method"] == method:
                    return ev
            seen = len(self.events)
        raise TimeoutError(f"no {method} within {timeout}s")

    def evaluate(self, expression: str):
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"page raised: {out['exceptionDetails']}")
        return out["result"].get("value")

    def click(self, x: float, y: float) -> None:
        for kind, extra in (("mouseMoved", {}), ("mousePressed", {"button": "left", "clickCount": 1}),
                            ("mouseReleased", {"button": "left", "clickCount": 1})):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(f"Chromium not found and could not be installed: {INSTALL_HINT}.")
    return path


@pytest.fixture(scope="module")
def toy_dashboard(tmp_path_factory):
    model, tcs = make_toy_world()
    result = attribute(model, tcs, format_prompt("What is the opposite of small?", "The opposite of small is **large"),
                       batch_size=64)
    examples = utils.make_toy_example_data(model, tcs)
    out = tmp_path_factory.mktemp("dashboard")
    scores = compute_graph_scores(result)
    utils.create_attribution_dashboard(result, model, tcs, example_data_by_layer=examples, output_dir=out,
                                       display=False, scores=scores)
    return result, out / "index.html", scores


@pytest.fixture(scope="module")
def page(chromium):
    profile = tempfile.mkdtemp(prefix="p3ag-chromium-")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-allow-origins=*",
            # Belt and braces: a dead proxy for anything the DevTools block might miss.
            "--proxy-server=127.0.0.1:9", "--window-size=1600,1000", "about:blank"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()) and time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"chromium exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.loads(resp.read())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        cdp = DevTools(ws_url)
        yield cdp
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_renders_offline(page, toy_dashboard):
    result, index, scores = toy_dashboard
    cdp = page
    for domain in ("Page", "Runtime", "Log", "Network"):
        cdp.send(f"{domain}.enable")
    cdp.send("Fetch.enable", patterns=[{"urlPattern": p} for p in ("http://*", "https://*", "ws://*", "wss://*")])
    cdp.send("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
    cdp.send("Page.navigate", url=index.resolve().as_uri())
    cdp.wait_for("Page.loadEventFired")
    cdp.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    n_nodes = len(result.kept_indices)
    n_edges = int((result.pruned_matrix != 0).sum())
    assert cdp.evaluate("document.querySelectorAll('#graph .node').length") == n_nodes
    assert cdp.evaluate("document.querySelectorAll('#graph .edge').length") == n_edges
    assert cdp.evaluate("new Set([...document.querySelectorAll('.node')].map(e => e.dataset.nodeId)).size") == n_nodes
    header = cdp.evaluate("document.querySelector('header').innerText")
    for name, value in scores.items():  # the graph's own scores, as a reader sees them (3 significant figures)
        label = name.removesuffix("_score").replace("_", " ")
        assert f"{label} score {float(f'{value:.3g}'):g}" in header, header
    assert cdp.evaluate("document.getElementById('panel').classList.contains('empty')")
    assert not cdp.evaluate("document.querySelector('#panel .logit-table')")

    # Hovering a logit node highlights exactly its edges; moving away clears the highlight.
    hover = cdp.evaluate("""(() => {
        const el = document.querySelector('.node[data-type=logit]');
        const i = +el.dataset.index, n = window.dashboard.data.edges.filter(e => e[1] === i).length;
        const r = el.getBoundingClientRect();
        return {x: r.x + r.width / 2, y: r.y + r.height / 2, n};
    })()""")
    cdp.send("Input.dispatchMouseEvent", type="mouseMoved", x=hover["x"], y=hover["y"])
    assert cdp.evaluate("document.getElementById('graph-svg').classList.contains('focus')")
    assert cdp.evaluate("document.querySelectorAll('.edge.hl').length") == hover["n"] > 0
    cdp.send("Input.dispatchMouseEvent", type="mouseMoved", x=5, y=5)
    assert cdp.evaluate("document.querySelectorAll('.edge.hl').length") == 0

    # Click the most influential latent, as a user would (a real mouse event at its centre).
    box = cdp.evaluate("""(() => {
        const els = [...document.querySelectorAll('.node[data-type=latent]')];
        els.sort((a, b) => b.getAttribute('r') - a.getAttribute('r'));
        const el = els[0]; el.scrollIntoView({block: 'center', inline: 'center'});
        const r = el.getBoundingClientRect();
        return {x: r.x + r.width / 2, y: r.y + r.height / 2, id: el.dataset.nodeId};
    })()""")
    cdp.click(box["x"], box["y"])
    panel = cdp.evaluate("""(() => {
        const p = document.getElementById('panel');
        const t = p.querySelector('table.logit-table');
        return {visible: !p.classList.contains('empty') && p.offsetWidth > 0, title: p.querySelector('h2').textContent,
                panel_for: p.dataset.nodeId,
                rows: t ? t.querySelectorAll('tbody tr').length : 0,
                selected: document.querySelector('.node.selected')?.dataset.nodeId,
                seqs: p.querySelectorAll('.seq').length, hists: p.querySelectorAll('svg.hist').length};
    })()""")
    assert panel["visible"], panel
    assert panel["selected"] == panel["panel_for"] == box["id"]
    assert panel["title"].startswith("Latent L"), panel
    assert panel["rows"] == 10, panel
    assert panel["seqs"] > 0 and panel["hists"] == 2, panel

    cdp.send("Input.dispatchMouseEvent", type="mouseMoved", x=5, y=5)  # hide the tooltip for the screenshot
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cdp.evaluate("window.scrollTo(0, 0); document.getElementById('graph-wrap').scrollLeft = 0")
    shot = cdp.send("Page.captureScreenshot", format="png")
    (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))

    methods = [e["method"] for e in cdp.events]
    errors = [e["params"] for e in cdp.events if e["method"] == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in cdp.events
               if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")]
    errors += [e["params"]["entry"] for e in cdp.events
               if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    assert not errors, errors
    tried = [e["params"]["request"]["url"] for e in cdp.events if e["method"] == "Network.requestWillBeSent"]
    assert all(u.startswith(("file://", "data:", "about:")) for u in tried), tried
    assert "Fetch.requestPaused" not in methods


def test_chromium_missing_gives_install_hint(monkeypatch):
    monkeypatch.setenv("CHROMIUM", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert find_chromium(try_install=False) is None
    assert "scripts/install_chromium.sh" in INSTALL_HINT

