"""Open the committed solutions notebook in a real JupyterLab, headless, as a reader meets it: untrusted,
then trusted, then reopened; print what every dashboard output and the explorer cell show.

    python -m part3_attribution_graphs.tools.jupyterlab_check     # needs the `lab` extra and Chromium
    python -m part3_attribution_graphs.tools.jupyterlab_check some.ipynb   # another executed notebook

JupyterLab runs with throwaway settings and trust database (nothing of yours is read or changed) on a
copy of the notebook. Exits 1 if any dashboard output is blank (neither a graph nor the line that
says what to do), if the explorer cell shows neither its widget nor its picture (given the picture's 10 s
wait), or if opening the notebook changed the file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .chromium import INSTALL_HINT, find_chromium, launch
from .notebook_builder import NOTEBOOKS

# What each dashboard output shows: frames, whether the "trust the notebook" line is visible, drawn nodes.
PROBE = """(() => {
  const outs = [...document.querySelectorAll('.jp-OutputArea-output')];
  const dash = outs.filter(o => o.querySelector('iframe') || o.textContent.includes('Attribution dashboard'));
  return {
    dashboards: dash.map(o => {
      const f = o.querySelector('iframe'), note = [...o.querySelectorAll('div')]
        .find(d => d.textContent.startsWith('No dashboard here?'));
      let nodes = null;
      try { nodes = f ? f.contentDocument.querySelectorAll('#graph .node').length : null; }
      catch (e) { nodes = -1; }
      return {frame: !!f, note_visible: !!note && note.offsetHeight > 0, nodes: nodes,
              note_height: note ? note.offsetHeight : null,
              note_width: note ? [note.scrollWidth, note.clientWidth] : null};
    }),
    explorer_note: outs.some(o => o.textContent.includes('Attribution explorer: live')),
    // The explorer's stand-in picture (shown where the widget cannot run) and the widget's own state.
    explorer_picture: [...document.querySelectorAll('.p3ag-explorer-snapshot')].map(p => p.offsetHeight > 0),
    explorer_state: [...document.querySelectorAll('.p3ag-explorer-snapshot')]
      .map(p => p.getAttribute('data-state')),
    explorer_live: document.querySelectorAll('.widget-vbox').length,
    widget_errors_visible: outs.filter(o => o.offsetHeight > 0 &&
      /Error displaying widget|model not found|Loading widget/.test(o.innerText)).length,
    trust_line_heights: [...document.querySelectorAll('[data-p3ag-untrusted]')].map(d => d.offsetHeight),
  };
})()"""
SCROLL = """(() => { const p = document.querySelector('.jp-WindowedPanel-outer');
  if (p) p.scrollTop += 1500; })()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _look(chromium: str, url: str) -> dict:
    """Open `url` in a fresh headless Chromium, scroll through the notebook (JupyterLab renders cells as
    they come into view), and probe the outputs."""
    with launch(chromium, width=1400, height=1000, timeout=120) as cdp:
        for domain in ("Page", "Runtime"):
            cdp.send(f"{domain}.enable")
        cdp.send("Page.navigate", url=url)
        time.sleep(20)
        for _ in range(80):
            cdp.evaluate(SCROLL)
            time.sleep(0.15)
        # The explorer's picture waits 10 s for a widget before it stands in: look at it, then wait that out.
        cdp.evaluate("document.querySelector('.p3ag-explorer-snapshot')?.scrollIntoView()")
        time.sleep(12)
        return cdp.evaluate(PROBE)


def main() -> int:
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit(f"Chromium not found: {INSTALL_HINT}")
    jupyter = Path(sys.executable).with_name("jupyter")
    if subprocess.run([sys.executable, "-c", "import jupyterlab"], capture_output=True).returncode:
        raise SystemExit('JupyterLab is not installed here: pip install -e ".[lab]"')
    work = Path(tempfile.mkdtemp(prefix="p3ag-lab-"))
    root = work / "nb"
    root.mkdir()
    notebook = root / "solutions.ipynb"
    shutil.copy(Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOKS["solutions"], notebook)
    before = notebook.read_bytes()
    env = {
        **os.environ,
        **{f"JUPYTER_{k}_DIR": str(work / k.lower()) for k in ("DATA", "CONFIG", "RUNTIME")},
    }
    port = _free_port()
    server = subprocess.Popen(
        [
            str(jupyter),
            "lab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.token=",
            "--ServerApp.password=",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
        ],  # fmt: skip
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen = {}
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api", timeout=2)
                break
            except OSError:
                time.sleep(1)
        url = f"{base}/lab/tree/{notebook.name}"
        seen["untrusted"] = _look(chromium, url)
        subprocess.run([str(jupyter), "trust", str(notebook)], env=env, check=True, capture_output=True)
        seen["trusted"] = _look(chromium, url)
        seen["reopened"] = _look(chromium, url)
    finally:
        server.terminate()
        server.wait(timeout=20)
    changed = notebook.read_bytes() != before
    shutil.rmtree(work, ignore_errors=True)
    blank = [
        (case, k)
        for case, probe in seen.items()
        for k, d in enumerate(probe["dashboards"])
        if not (d["note_visible"] or (d["frame"] and (d["nodes"] or 0) > 0))
    ]
    # The explorer cell: a live widget, or its picture standing in (never neither).
    blank += [
        (case, "explorer")
        for case, probe in seen.items()
        if probe["explorer_picture"] and not (probe["explorer_live"] or any(probe["explorer_picture"]))
    ]
    print(json.dumps({**seen, "file_changed_by_opening": changed, "blank_outputs": blank}, indent=1))
    return 1 if blank or changed or not all(p["dashboards"] for p in seen.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
