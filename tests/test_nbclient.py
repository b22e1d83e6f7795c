"""The solutions notebook under plain nbclient, with no environment override (no TQDM_DISABLE, no patient
client).

nbclient plays the front end for ipywidgets' Output widget: when a cell captures a display into one,
nbclient sends the widget's new state to the kernel on the shell channel while it is waiting there for
the cell's reply, and that reply could then go unnoticed until the cell timed out (the explorer cell
stalled for the whole timeout, or for good under papermill's default of none). No cell may capture
output into a widget, and no finished progress bar may stay behind as a widget reference (a saved
notebook would show "Error displaying widget: model not found" there).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from part3_attribution_graphs.tools import notebook_builder as nbb

SOLUTIONS = Path(__file__).resolve().parents[1] / "solutions" / "part3_attribution_graphs_solutions.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"


class RecordingClient(NotebookClient):
    """nbclient's own client, noting every Output-widget capture it is asked to mimic."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captures: list[str] = []

    def register_output_hook(self, msg_id, hook):
        self.captures.append(msg_id)
        super().register_output_hook(msg_id, hook)


@pytest.mark.notebook
def test_solutions_notebook_runs_under_plain_nbclient(tmp_path, monkeypatch):
    for key in ("TQDM_DISABLE", "HF_TOKEN", "PLOTLY_RENDERER"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("P3AG_WORLD", "toy")
    monkeypatch.setenv("P3AG_OUTPUT_DIR", str(tmp_path))
    nb = nbformat.read(SOLUTIONS, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    # A cell that stalled would wait out this timeout and then fail on the captures below.
    client = RecordingClient(
        nb,
        timeout=300,
        kernel_name=nbb.ensure_kernel(),
        resources={"metadata": {"path": str(SOLUTIONS.parent)}},
    )
    client.execute()

    assert client.captures == [], "a cell captured output into an Output widget (see the module docstring)"
    left = {
        cell.get("id"): [
            out["data"].get("text/plain", "")[:60] for out in cell.outputs if WIDGET in out.get("data", {})
        ]
        for cell in nb.cells
        if cell.cell_type == "code"
    }
    left = {cell_id: outs for cell_id, outs in left.items() if outs and cell_id != "explorer"}
    assert left == {}, f"widgets left in the saved notebook: {json.dumps(left)}"
    assert (tmp_path / "couplet" / "index.html").exists()
