"""Build one attribution graph and write its files: `python -m part3_attribution_graphs [--world toy]`.

Writes to `--out` (default `out/graph`):
  graph.pt          the whole AttributionResult (read it back with AttributionResult.load)
  nodes.json        every node with its influence, and whether pruning kept it (with --interventions N,
                    the N most influential latents also carry their predicted and measured ablation effect)
  index.html        the self-contained dashboard (open it from disk; no network needed)
  neuronpedia.json  the pruned graph in Neuronpedia's schema

`--result out/graph/graph.pt` redraws a saved graph (re-pruned at the given thresholds) without attributing.
"""

from __future__ import annotations

# Only the standard library at module level: `--help` and argument errors answer at once, before
# torch and TransformerLens (many seconds) are imported.
import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

DEFAULT_USER = "What is the opposite of small?"
DEFAULT_RESPONSE = "The opposite of small is **large"


def world_names() -> tuple[str, ...]:
    """The worlds `--world` accepts, from the one registry (it imports no heavy module)."""
    from .worlds.registry import WORLD_NAMES

    return WORLD_NAMES


class CLIError(Exception):
    """A problem with the command line or its environment, reported as one line."""


def load_world(name: str):
    """(model, transcoders) of a world in `worlds.registry.WORLD_NAMES` (`gemma` needs HF_TOKEN and the
    hub)."""
    from .worlds.registry import load_world as load_named

    return load_named(name)[1:]


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
        nodes[i]["ablation"] = {
            "predicted": out["live"][i][0],
            "measured_frozen": out["frozen"][i][1],
            "measured_live": out["live"][i][1],
        }
    out["agreement"] = stats
    return out


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in (0, 1] (0.8 keeps 80% of the influence), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m part3_attribution_graphs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--world", default="toy", choices=world_names())
    parser.add_argument("--user", default=DEFAULT_USER, help="the user's turn of the chat prompt")
    parser.add_argument("--response", default=DEFAULT_RESPONSE, help="the start of the model's answer")
    parser.add_argument(
        "--out", default="out/graph", type=Path, help="folder for the files (created if needed)"
    )
    parser.add_argument("--n-output-nodes", type=_count(1), default=3)
    parser.add_argument("--top-k", type=_count(0), default=5)
    parser.add_argument("--batch-size", type=_count(1), default=256)
    parser.add_argument("--node-threshold", type=_fraction, default=0.8)
    parser.add_argument("--edge-threshold", type=_fraction, default=0.85)
    parser.add_argument("--no-dashboard", action="store_true")
    parser.add_argument(
        "--no-examples",
        action="store_true",
        help="skip the latents' example data (the dashboard's activation sections)",
    )
    parser.add_argument(
        "--result",
        type=Path,
        default=None,
        metavar="GRAPH_PT",
        help="redraw a graph saved earlier (its graph.pt) instead of attributing a prompt; "
        "the thresholds re-prune it",
    )
    parser.add_argument(
        "--interventions",
        type=_count(0),
        default=0,
        metavar="N",
        help="ablate the N most influential latents and measure the top logit's change",
    )
    parser.add_argument("--traceback", action="store_true", help="on an error, show the full traceback")
    return parser


def check_out_dir(out: Path) -> Path:
    """Create `out` if needed and check that files can be written there, before any slow work starts."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder: choose a folder for the graph's files.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise CLIError(
            f"cannot write to --out {out} ({err.strerror or err}): choose a folder you can write to."
        ) from None
    return out


def run(args: argparse.Namespace) -> dict:
    """Load the world, attribute the prompt, write the files; returns the summary that `main` prints."""
    import torch

    from .attribution import attribute
    from .scores import compute_graph_scores
    from .worlds.gemma import START_POSN, format_prompt

    t0 = time.perf_counter()
    model, transcoders = load_world(args.world)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.result is not None:  # a graph saved earlier: re-prune it and redraw, no backward pass
        from .result import AttributionResult, prune

        result = prune(AttributionResult.load(args.result), args.node_threshold, args.edge_threshold)
        if (
            result.graph.n_layers != model.cfg.n_layers
            or result.graph.writing_vecs.shape[1] != model.cfg.d_model
        ):
            raise CLIError(
                f"--result {args.result} was made on another model than --world {args.world} "
                f"({result.graph.n_layers} layers, d_model {result.graph.writing_vecs.shape[1]}): "
                "pass the world it was made on."
            )
        prompt = result.prompt
    else:
        prompt = format_prompt(args.user, args.response)
        result = attribute(
            model,
            transcoders,
            prompt,
            n_output_nodes=args.n_output_nodes,
            start_posn=START_POSN,
            top_k=args.top_k,
            batch_size=args.batch_size,
            node_threshold=args.node_threshold,
            edge_threshold=args.edge_threshold,
        )
    t_graph = time.perf_counter() - t0

    kept = set(result.kept_indices.tolist())
    nodes = [
        {
            **asdict(n),
            "node_type": n.node_type.value,
            "node_id": n.node_id,
            "influence": float(result.influence[i]),
            "kept": i in kept,
        }
        for i, n in enumerate(result.graph.nodes)
    ]
    measured = _measure_interventions(model, transcoders, result, args.interventions, nodes)
    (args.out / "nodes.json").write_text(
        json.dumps(
            {"prompt": prompt, "str_tokens": result.str_tokens, "settings": result.settings, "nodes": nodes},
            indent=1,
        )
    )
    result.save(args.out / "graph.pt")  # AttributionResult.load(path) reads it back
    scores = compute_graph_scores(result)
    if not args.no_dashboard:
        from .utils import create_attribution_dashboard, features_in_graph, make_toy_example_data
        from .views.neuronpedia import view_graph

        shown = set(view_graph(result).indices)

        # Example data generated from the world itself (offline); a real world's come from
        # utils.load_example_data_parallel, which needs the hub.
        examples = (
            None
            if args.no_examples
            else make_toy_example_data(model, transcoders, features_by_layer=features_in_graph(result))
        )
        create_attribution_dashboard(
            result,
            model,
            transcoders=transcoders,
            output_dir=args.out,
            display=False,
            scores=scores,
            example_data_by_layer=examples,
            # The dashboard shows the nodes of view_graph only; an influential latent can be pruned away
            # (nodes.json keeps every measurement).
            interventions={i: v for i, v in measured["live"].items() if i in shown} if measured else None,
        )

    summary = {
        "world": args.world,
        "prompt_tokens": len(result.str_tokens),
        "nodes": len(result.graph),
        "kept_nodes": len(result.kept_indices),
        "kept_edges": int(torch.count_nonzero(result.pruned_matrix)),
        "scores": {k: round(float(v), 4) for k, v in scores.items()},
        "top_logits": [
            (n.str_token, round(n.token_prob, 4)) for n in result.graph.nodes if n.node_type.value == "logit"
        ],
        "load_s": round(t_load, 2),
        "attribute_s": round(t_graph, 2),
        "files": sorted(p.name for p in args.out.iterdir()),
    }
    if measured:
        summary["interventions"] = measured["agreement"]
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, check `--out`, run; an error is printed as one line (exit status 1), not a
    traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and a usage line on a bad argument
    try:
        check_out_dir(args.out)
        summary = run(args)
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    except Exception as err:  # noqa: BLE001 - every failure becomes one readable line
        if args.traceback:
            raise
        message = (
            " ".join(str(err).split()) or type(err).__name__
        )  # one line, however the message was wrapped
        if not isinstance(err, CLIError):
            if not isinstance(err, (ValueError, TypeError, RuntimeError, OSError)):
                message = f"{type(err).__name__}: {message}"
            message += " (--traceback shows where)"
        parser.exit(1, f"{parser.prog}: error: {message}\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
