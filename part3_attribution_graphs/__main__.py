"""Build one attribution graph and write its files: `python -m part3_attribution_graphs [--world toy]`.

Writes to `--out` (default `out/graph`):
  graph.pt          the whole AttributionResult (read it back with AttributionResult.load)
  nodes.json        every node with its influence, and whether pruning kept it
  index.html        the self-contained dashboard (open it from disk; no network needed)
  neuronpedia.json  the pruned graph in Neuronpedia's schema
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .attribution import attribute
from .scores import compute_graph_scores
from .worlds.gemma import START_POSN, format_prompt
from .worlds.registry import WORLD_NAMES

DEFAULT_USER = "What is the opposite of small?"
DEFAULT_RESPONSE = "The opposite of small is **large"


def load_world(name: str):
    """(model, transcoders) of a world in `worlds.registry.WORLD_NAMES` (`gemma` needs HF_TOKEN and the hub)."""
    from .worlds.registry import load_world as load_named

    return load_named(name)[1:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="toy", choices=WORLD_NAMES)
    parser.add_argument("--user", default=DEFAULT_USER, help="the user's turn of the chat prompt")
    parser.add_argument("--response", default=DEFAULT_RESPONSE, help="the start of the model's answer")
    parser.add_argument("--out", default="out/graph", type=Path)
    parser.add_argument("--n-output-nodes", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.85)
    parser.add_argument("--no-dashboard", action="store_true")
    parser.add_argument("--no-examples", action="store_true",
                        help="skip the latents' example data (the dashboard's activation sections)")
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
    (args.out / "nodes.json").write_text(json.dumps({"prompt": prompt, "str_tokens": result.str_tokens,
                                                     "settings": result.settings, "nodes": nodes}, indent=1))
    result.save(args.out / "graph.pt")  # AttributionResult.load(path) reads it back
    scores = compute_graph_scores(result)
    if not args.no_dashboard:
        from .utils import create_attribution_dashboard, features_in_graph, make_toy_example_data

        # Example data generated from the world itself (offline); a real world's come from
        # utils.load_example_data_parallel, which needs the hub.
        examples = None if args.no_examples else make_toy_example_data(
            model, transcoders, features_by_layer=features_in_graph(result))
        create_attribution_dashboard(result, model, transcoders=transcoders, output_dir=args.out, display=False,
                                     scores=scores, example_data_by_layer=examples)

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
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
