"""Benchmark the dashboard on a big synthetic graph in headless Chromium: page size, render, redraw, hover.

    python -m part3_attribution_graphs.tools.bench_dashboard               # this checkout
    python part3_attribution_graphs/tools/bench_dashboard.py --checkout /path/to/other/checkout

The graph has ~800 kept nodes (20 tokens, 18 layers) and ~30k edges, every edge going up at least one
row. `--checkout` writes the page with another checkout's package (in a subprocess, with that
checkout on PYTHONPATH), to compare before and after a change; Chromium is driven from here.

Numbers (milliseconds, medians where repeated):
  load       navigation start to the end of the load event (HTML parsed, the page's script run)
  render     navigation start to the first frame painted after that (what a learner waits for)
  redraw     `window.dashboard.redraw()` to the next frame
  hover      a mouseover on a node to the next frame (logits and latents)
  wheel      one wheel step over the graph to the next frame
  show_all_* the same with "show all edges" on
  slider_*   a slider moved (re-pruning as `prune` does) to the next frame: median and max over
             SLIDER_MOVES, with and without "show all edges"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

N_TOKENS, N_LAYERS, LATENTS_PER_LAYER, N_LOGITS, N_EDGES = 20, 18, 40, 10, 30_000
# The slider moves timed (each from where the last left the sliders): both sliders, up and down, 1.0 included.
SLIDER_MOVES = [("edge-thr", e) for e in (0.7, 0.5, 0.95, 1.0, 0.3, 0.85)] + [
    ("node-thr", n) for n in (0.5, 0.3, 0.8, 0.95, 1.0, 0.6)
]


@dataclass
class SyntheticResult:
    """The fields every version of the dashboard reads."""

    graph: object
    adjacency_matrix: torch.Tensor
    kept_indices: torch.Tensor
    pruned_matrix: torch.Tensor
    prompt: str
    str_tokens: list
    logit_weights: torch.Tensor
    influence: torch.Tensor
    settings: dict


def synthetic_result(seed: int = 0) -> SyntheticResult:
    """A graph shaped like a pruned Gemma graph: embeddings, latents and errors per layer, logits on top."""
    from part3_attribution_graphs.nodes import GraphNodes, NodeInfo, NodeType
    from part3_attribution_graphs.pruning import compute_influence

    gen = torch.Generator().manual_seed(seed)
    tokens = [f"tok{p}" if p % 7 else "\n" for p in range(N_TOKENS)]
    nodes, rows = [], []
    for p in range(N_TOKENS):
        nodes.append(NodeInfo(NodeType.EMBEDDING, "E", p, 1000 + p, str_token=tokens[p]))
        rows.append(0)
    for layer in range(N_LAYERS):
        for k in range(LATENTS_PER_LAYER):
            p = int(torch.randint(N_TOKENS // 2, N_TOKENS, (1,), generator=gen)) if k % 3 else k % N_TOKENS
            nodes.append(NodeInfo(NodeType.LATENT, layer, p, 100 * layer + k, activation=1.0 + k / 10))
            rows.append(layer + 1)
        for p in range(N_TOKENS // 2, N_TOKENS, 3):
            nodes.append(NodeInfo(NodeType.MLP_ERROR, layer, p, 0))
            rows.append(layer + 1)
    probs = torch.softmax(torch.randn(N_LOGITS, generator=gen), 0).tolist()
    for v in range(N_LOGITS):
        nodes.append(
            NodeInfo(NodeType.LOGIT, "L", N_TOKENS - 1, 5000 + v, token_prob=probs[v], str_token=f"out{v}")
        )
        rows.append(N_LAYERS + 1)
    n = len(nodes)
    row = torch.tensor(rows)
    allowed = row[:, None] > row[None, :]  # allowed[target, source]: edges go up
    scores = torch.rand(n, n, generator=gen) * allowed
    cutoff = scores.flatten().topk(N_EDGES).values[-1]
    A = torch.randn(n, n, generator=gen) * (scores >= cutoff) * allowed
    graph = GraphNodes(nodes=nodes, seq_len=N_TOKENS, n_layers=N_LAYERS)
    weights = torch.tensor(probs)
    influence = compute_influence(A, weights, N_LAYERS)
    settings = {"node_threshold": 0.8, "edge_threshold": 0.85}
    return SyntheticResult(
        graph, A, torch.arange(n), A.clone(), "".join(tokens), tokens, weights, influence, settings
    )


def write_page(out: Path) -> dict:
    """Write the synthetic graph's dashboard into `out`; return its sizes."""
    from part3_attribution_graphs.views.dashboard import create_attribution_dashboard

    result = synthetic_result()
    create_attribution_dashboard(result, None, output_dir=out, display=False)
    return {
        "nodes": len(result.graph.nodes),
        "edges": int((result.pruned_matrix != 0).sum()),
        "page_bytes": (out / "index.html").stat().st_size,
    }


def measure(index: Path, width: int = 1400) -> dict:
    from part3_attribution_graphs.tools.chromium import find_chromium, launch, page_errors

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("Chromium not found: bash scripts/install_chromium.sh")
    frame = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now()))))"
    with launch(chromium, width=width, timeout=600) as cdp:
        # Warm the browser (renderer, fonts) on a small page, so the numbers are the dashboard's own.
        warm = index.parent / "warm.html"
        warm.write_text("<!DOCTYPE html><p>warm</p><svg width='9' height='9'><text y='8'>x</text></svg>")
        cdp.open(warm.resolve().as_uri(), width)
        cdp.open(index.resolve().as_uri(), width)
        load = cdp.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        first_frame = cdp.evaluate(frame)
        redraws = [
            cdp.evaluate(
                f"(async () => {{ const t = performance.now(); window.dashboard.redraw(); "
                f"return (await {frame}) - t; }})()"
            )
            for _ in range(3)
        ]
        hovers = {}
        for show_all in (False, True):
            if show_all:
                cdp.evaluate("document.getElementById('show-all').click()")
            for kind in ("logit", "latent"):
                times = []
                for k in range(4):
                    times.append(
                        cdp.evaluate(f"""(async () => {{
                        const els = [...document.querySelectorAll('.node[data-type={kind}]')];
                        const el = els[{k} % els.length], target = el.querySelector('.shape') || el;
                        const t = performance.now();
                        target.dispatchEvent(new MouseEvent('mouseover', {{bubbles: true}}));
                        const dt = (await {frame}) - t;
                        target.dispatchEvent(new MouseEvent('mouseout', {{bubbles: true}}));
                        await {frame};
                        return dt;
                    }})()""")
                    )
                hovers[kind + ("_all" if show_all else "")] = statistics.median(times)
            # One wheel step over the graph (zoom in, then out again), to the next frame.
            times = [
                cdp.evaluate(f"""(async () => {{
                const g = document.getElementById('graph'), r = g.getBoundingClientRect();
                const t = performance.now();
                g.dispatchEvent(new WheelEvent('wheel', {{deltaY: {dy}, clientX: r.x + r.width / 2,
                    clientY: r.y + r.height / 2, bubbles: true, cancelable: true}}));
                return (await {frame}) - t;
            }})()""")
                for dy in (-120, 120, -120, 120)
            ]
            hovers["wheel" + ("_all" if show_all else "")] = statistics.median(times)
        slides = {}
        for show_all in (False, True):  # "show all edges" is on after the hovers: off, then on again
            cdp.evaluate("document.getElementById('show-all').click()")
            times = []
            for slider_id, value in SLIDER_MOVES:
                times.append(
                    cdp.evaluate(f"""(async () => {{
                    const s = document.getElementById('{slider_id}'), t = performance.now();
                    s.value = {value}; s.dispatchEvent(new Event('input', {{bubbles: true}}));
                    return (await {frame}) - t;
                }})()""")
                )
            slides["all" if show_all else "plain"] = times
        errors = page_errors(cdp)
    return {
        "load_ms": round(load, 1),
        "render_ms": round(first_frame, 1),
        "redraw_ms": round(statistics.median(redraws), 1),
        "hover_logit_ms": round(hovers["logit"], 1),
        "hover_latent_ms": round(hovers["latent"], 1),
        "wheel_ms": round(hovers["wheel"], 1),
        "show_all_hover_logit_ms": round(hovers["logit_all"], 1),
        "show_all_hover_latent_ms": round(hovers["latent_all"], 1),
        "show_all_wheel_ms": round(hovers["wheel_all"], 1),
        "slider_median_ms": round(statistics.median(slides["plain"]), 1),
        "slider_max_ms": round(max(slides["plain"]), 1),
        "show_all_slider_median_ms": round(statistics.median(slides["all"]), 1),
        "show_all_slider_max_ms": round(max(slides["all"]), 1),
        "page_errors": len(errors),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkout", type=Path, help="write the page with this checkout's package")
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    if args.write_only:  # the subprocess for --checkout
        print(json.dumps(write_page(args.write_only)))
        return {}
    out = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    if args.checkout:
        env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve())}
        proc = subprocess.run(
            [sys.executable, __file__, "--write-only", str(out)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        sizes = write_page(out)
    summary = {
        "checkout": str(args.checkout or Path(__file__).resolve().parents[2]),
        **sizes,
        **measure(out / "index.html", args.width),
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    if (
        __package__ in (None, "") and "--write-only" not in sys.argv
    ):  # as a file: this checkout drives Chromium
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
