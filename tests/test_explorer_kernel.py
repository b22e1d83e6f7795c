"""The explorer in a real kernel: a prompt picked in the widget shows its progress bar inside the explorer.

From a widget event the kernel's output has no cell to go to (JupyterLab sends it to its log
console), so the explorer captures it into its plot area while it computes a new prompt's graph.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import need

need("ipykernel")
from jupyter_client.manager import start_new_kernel  # noqa: E402

from part3_attribution_graphs.tools import notebook_builder as nbb  # noqa: E402

SETUP = """
import json
from part3_attribution_graphs.explorer import attribution_explorer
from part3_attribution_graphs.toy import make_toy_world
from part3_attribution_graphs.worlds.gemma import START_POSN, format_prompt
model, transcoders = make_toy_world()
prompts = {"opposites": format_prompt("What is the opposite of small?", "The opposite of small is"),
           "couplet": format_prompt("Write me a short rhyming couplet.", "The sun")}
explorer = attribution_explorer(model, transcoders, prompts, start_posn=START_POSN, batch_size=16)
print(json.dumps([explorer.prompt_picker.model_id, explorer.plot.model_id]))
"""


def _run(kc, code: str) -> list[dict]:
    msg_id = kc.execute(code)
    messages = []
    while True:
        msg = kc.get_iopub_msg(timeout=300)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages


@pytest.mark.notebook
def test_picking_a_new_prompt_shows_the_progress_bar_in_the_explorer(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    km, kc = start_new_kernel(kernel_name=nbb.ensure_kernel(), env={**os.environ, "P3AG_WORLD": "toy"})
    try:
        out = _run(kc, SETUP)
        streams = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        errors = [m["content"] for m in out if m["msg_type"] == "error"]
        assert not errors, errors
        picker_id, plot_id = json.loads(streams.strip().splitlines()[-1])

        # What the front end sends when the learner picks the second prompt.
        event = kc.session.msg(
            "comm_msg",
            content={
                "comm_id": picker_id,
                "data": {"method": "update", "state": {"index": 1}, "buffer_paths": []},
            },
        )
        kc.shell_channel.send(event)
        event_id = event["header"]["msg_id"]
        seen = []
        while True:
            msg = kc.get_iopub_msg(timeout=300)
            if msg["parent_header"].get("msg_id") != event_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            seen.append(msg)
    finally:
        km.shutdown_kernel(now=True)

    def plot_capture(msg) -> str | None:
        content = msg["content"]
        if msg["msg_type"] == "comm_msg" and content["comm_id"] == plot_id:
            return content["data"].get("state", {}).get("msg_id")
        return None

    captures = [i for i, m in enumerate(seen) if plot_capture(m) == event_id]
    releases = [i for i, m in enumerate(seen) if plot_capture(m) == ""]
    bars = [
        i
        for i, m in enumerate(seen)
        if m["msg_type"] == "display_data"
        and m["content"]["data"].get("text/plain", "").startswith("Backward batches")
    ]
    assert captures and bars, "the progress bar was not shown inside the explorer"
    assert captures[0] < bars[0] and all(b < releases[0] for b in bars)
    figures = [
        m
        for m in seen
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == plot_id
        and any(
            "application/vnd.plotly.v1+json" in o.get("data", {})
            for o in m["content"]["data"].get("state", {}).get("outputs", [])
        )
    ]
    assert figures, "the new prompt's graph was not drawn in the explorer"
