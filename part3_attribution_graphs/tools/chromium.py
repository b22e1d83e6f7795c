"""Headless Chromium over the DevTools protocol, for the browser tests and the dashboard benchmark.

A small synchronous client on `websocket-client`; every http(s)/ws(s) request the page makes is
refused and recorded. Needs Debian's `chromium` (`bash scripts/install_chromium.sh`) or CHROMIUM=path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["INSTALL_HINT", "DevTools", "find_chromium", "launch", "page_errors", "network_requests"]

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    "install it with `bash scripts/install_chromium.sh` (Debian/Ubuntu: `sudo apt-get install chromium`), "
    "or set CHROMIUM=/path/to/chromium"
)


def find_chromium(try_install: bool = True) -> str | None:
    """Path of a Chromium binary; runs scripts/install_chromium.sh once if none is found."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    script = REPO / "scripts" / "install_chromium.sh"
    if try_install and script.exists() and os.environ.get("SKIP_CHROMIUM_INSTALL") != "1":
        try:
            subprocess.run(
                ["bash", str(script)],
                capture_output=True,
                timeout=300,
                env={**os.environ, "NONINTERACTIVE": "1"},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return find_chromium(try_install=False)
    return None


class DevTools:
    """A minimal synchronous Chrome DevTools Protocol client for one page."""

    def __init__(self, ws_url: str, timeout: float = 60.0):
        import websocket

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
            self.ws.send(
                json.dumps(
                    {
                        "id": 10**9 + len(self.events),
                        "method": "Fetch.failRequest",
                        "params": {"requestId": msg["params"]["requestId"], "errorReason": "BlockedByClient"},
                    }
                )
            )

    def wait_for(self, method: str, timeout: float = 30.0, since: int = 0) -> dict:
        """The first event `method` recorded after the first `since` events, waiting for it if needed."""
        deadline = time.time() + timeout
        seen = since
        while True:
            for ev in self.events[seen:]:
                if ev["method"] == method:
                    return ev
            seen = len(self.events)
            if time.time() > deadline:
                raise TimeoutError(f"no {method} within {timeout}s")
            self._on_event(json.loads(self.ws.recv()))

    def evaluate(self, expression: str):
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"page raised: {out['exceptionDetails']}")
        return out["result"].get("value")

    def mouse(self, kind: str, x: float, y: float, modifiers: int = 0) -> None:
        extra = {"button": "left", "clickCount": 1} if kind in ("mousePressed", "mouseReleased") else {}
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, modifiers=modifiers, **extra)

    def click(self, x: float, y: float, modifiers: int = 0) -> None:
        """A real click; modifiers: 2 = ctrl, 8 = shift."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.mouse(kind, x, y, modifiers)

    def open(self, url: str, width: int, height: int = 1000) -> None:
        """Navigate at a viewport size, offline, and wait for the page to load and paint."""
        for domain in ("Page", "Runtime", "Log", "Network", "DOM"):
            self.send(f"{domain}.enable")
        self.send(
            "Fetch.enable",
            patterns=[{"urlPattern": p} for p in ("http://*", "https://*", "ws://*", "wss://*")],
        )
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        since = len(self.events)
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", since=since)
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def close(self) -> None:
        self.ws.close()


def page_errors(cdp: DevTools) -> list[dict]:
    """Exceptions, console errors and log errors the page produced."""
    errors = [e["params"] for e in cdp.events if e["method"] == "Runtime.exceptionThrown"]
    errors += [
        e["params"]
        for e in cdp.events
        if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
    ]
    errors += [
        e["params"]["entry"]
        for e in cdp.events
        if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    return errors


def network_requests(cdp: DevTools) -> list[str]:
    """URLs the page asked for that are not local (file:, data:, blob:, about:)."""
    tried = [e["params"]["request"]["url"] for e in cdp.events if e["method"] == "Network.requestWillBeSent"]
    tried += [e["params"]["request"]["url"] for e in cdp.events if e["method"] == "Fetch.requestPaused"]
    return [u for u in tried if not u.startswith(("file://", "data:", "about:", "blob:"))]


@contextmanager
def launch(chromium: str, width: int = 1600, height: int = 1000, timeout: float = 60.0) -> Iterator[DevTools]:
    """Start headless Chromium with a throwaway profile; yield a DevTools client for its page."""
    profile = tempfile.mkdtemp(prefix="p3ag-chromium-")
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        # Belt and braces: a dead proxy for anything the DevTools block might miss.
        "--proxy-server=127.0.0.1:9",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cdp = None
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError("chromium did not start within 30 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.loads(resp.read())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        cdp = DevTools(ws_url, timeout=timeout)
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
