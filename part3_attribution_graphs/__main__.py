"""Build one attribution graph and write its files: `python -m part3_attribution_graphs [--world planted]`.

Writes to `--out` (default `out/graph`):
  graph.pt          the whole AttributionResult (read it back with AttributionResult.load)
  nodes.json        every node with its influence, and whether pruning kept it (with --interventions N,
                    the N most influential latents also carry their predicted and measured ablation effect)
  index.html        the self-contained dashboard (open it from disk; no network needed)
  neuronpedia.json  the pruned graph in Neuronpedia's schema

`--result out/graph/graph.pt` redraws a saved graph (re-pruned at the given thresholds) without attributing.

The files are written into a hidden folder inside `--out` and moved in together at the end, when the previous
run's files go: an interrupted run leaves `--out` as it was, never a new nodes.json beside an old index.html.
`--out` keeps a list of the files this program wrote there (`.part3_attribution_graphs.json`); a file of the
same name that is not on it is yours, and is replaced only with `--force`.
"""

from __future__ import annotations

# Only the standard library at module level: `--help` and argument errors answer at once, before
# torch and TransformerLens (many seconds) are imported.
import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

DEFAULT_WORLD = "planted"  # offline, and its mechanisms are known: the graph has something to find
# Each world's default prompt, (user turn, start of the answer). The planted world's is one of its held-out
# two-hop questions (`planted_facts("two_hop", "heldout")`; a test keeps it one): Tansy -> Caldor -> the
# capital, Corvin; its graph's strongest path runs from the town through a Caldor latent to the answer.
# Other worlds get the lesson's couplet of opposites.
DEFAULT_PROMPTS = {"planted": ("Tansy. What is the capital of its land?", "Answer:")}
DEFAULT_USER, DEFAULT_RESPONSE = "What is the opposite of small?", "The opposite of small is **large"
# The files this program writes into --out, and the list it keeps there of the ones it wrote.
GRAPH_FILES = ("graph.pt", "nodes.json")
DASHBOARD_FILES = ("index.html", "neuronpedia.json")
MANIFEST = ".part3_attribution_graphs.json"
# Options that choose what to attribute: meaningless with --result, whose graph is already made.
ATTRIBUTION_ONLY = {
    "user": "--user",
    "response": "--response",
    "n_output_nodes": "--n-output-nodes",
    "top_k": "--top-k",
    "batch_size": "--batch-size",
}


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


def _out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name a folder for the graph's files, e.g. out/graph")
    return Path(text)


_out_dir.__name__ = "folder"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m part3_attribution_graphs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--world", default=DEFAULT_WORLD, choices=world_names())
    # Defaults of the attribution-only options are filled in after parsing, so that --result can tell
    # whether they were given.
    user, response = DEFAULT_PROMPTS[DEFAULT_WORLD]
    parser.add_argument(
        "--user",
        default=None,
        help=f"the user's turn of the chat prompt (planted: {user!r}; other worlds: {DEFAULT_USER!r})",
    )
    parser.add_argument(
        "--response",
        default=None,
        help=f"the start of the model's answer (planted: {response!r}; other worlds: {DEFAULT_RESPONSE!r})",
    )
    parser.add_argument(
        "--out", default="out/graph", type=_out_dir, help="folder for the files (created if needed)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace files in --out named like this program's outputs that it did not write there",
    )
    parser.add_argument("--n-output-nodes", type=_count(1), default=None, help="(default 3)")
    parser.add_argument("--top-k", type=_count(0), default=None, help="(default 5)")
    parser.add_argument("--batch-size", type=_count(1), default=None, help="(default 256)")
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


def settle_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse attribution options next to --result (they would be ignored); fill in their defaults."""
    if args.result is not None:
        given = [flag for name, flag in ATTRIBUTION_ONLY.items() if getattr(args, name) is not None]
        if given:
            parser.error(
                f"{', '.join(given)} choose(s) what to attribute, but --result redraws a graph already made "
                f"(its own prompt and settings): drop {', '.join(given)}, or drop --result to attribute anew."
            )
    user, response = DEFAULT_PROMPTS.get(args.world, (DEFAULT_USER, DEFAULT_RESPONSE))
    defaults = {"user": user, "response": response, "n_output_nodes": 3, "top_k": 5}
    for name, value in {**defaults, "batch_size": 256}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def planned_files(args: argparse.Namespace) -> tuple[str, ...]:
    """The files this run will write into --out."""
    return GRAPH_FILES + (() if args.no_dashboard else DASHBOARD_FILES)


def ours(out: Path) -> set[str]:
    """The files an earlier run of this program wrote into `out` (from its list there)."""
    try:
        listed = json.loads((out / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    known = set(GRAPH_FILES + DASHBOARD_FILES)
    return {name for name in listed if name in known}


def check_out_dir(out: Path, planned: tuple[str, ...] = GRAPH_FILES, force: bool = False) -> Path:
    """Create `out` if needed and check that files can be written there and that none of the user's own
    would be replaced (unless `force`), before any slow work starts."""
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
    folders = [name for name in planned if (out / name).is_dir()]
    if folders:
        raise CLIError(f"--out {out} holds the folder(s) {', '.join(folders)} where a file goes: move them.")
    theirs = sorted(name for name in planned if (out / name).exists() and name not in ours(out))
    if theirs and not force:
        raise CLIError(
            f"--out {out} already holds {', '.join(theirs)}, which this program did not write there and "
            "would overwrite: choose another folder, move them away, or pass --force to replace them."
        )
    return out


@contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold Ctrl-C back until the block ends (main thread only), so the block runs whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def commit(stage: Path, out: Path, written: list[str]) -> None:
    """Move the staged files into `out` together: the previous run's files go, the new ones come, and the
    list of ours is rewritten last. Ctrl-C waits until this is done."""
    with _no_interrupt():
        old = ours(out)
        manifest = json.dumps({"files": sorted(old | set(written))})
        (stage / MANIFEST).write_text(manifest)
        os.replace(stage / MANIFEST, out / MANIFEST)  # while both sets are in flux, both count as ours
        for name in old - set(written):
            (out / name).unlink(missing_ok=True)
        for name in written:
            os.replace(stage / name, out / name)
        (stage / MANIFEST).write_text(json.dumps({"files": sorted(written)}))
        os.replace(stage / MANIFEST, out / MANIFEST)


def run(args: argparse.Namespace) -> dict:
    """Load the world, attribute the prompt, write the files (see the module docstring for how); returns the
    summary that `main` prints."""
    stage = Path(tempfile.mkdtemp(dir=args.out, prefix=".partial-"))
    try:
        summary = _run(args, stage)
        commit(stage, args.out, summary["files"])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _run(args: argparse.Namespace, stage: Path) -> dict:
    """Load the world, attribute the prompt, write the files into `stage`; returns the summary."""
    import torch

    from .attribution import attribute
    from .scores import compute_graph_scores
    from .worlds.gemma import START_POSN, format_prompt

    t0 = time.perf_counter()
    model, transcoders = load_world(args.world)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.result is not None:  # a graph saved earlier: re-prune it and redraw, no backward pass
        from .guard import check_result_fits
        from .result import AttributionResult, prune

        result = prune(AttributionResult.load(args.result), args.node_threshold, args.edge_threshold)
        try:
            check_result_fits(result, model, transcoders)
        except ValueError as err:
            raise CLIError(f"--result {args.result} does not fit --world {args.world}: {err}") from None
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
    (stage / "nodes.json").write_text(
        json.dumps(
            {"prompt": prompt, "str_tokens": result.str_tokens, "settings": result.settings, "nodes": nodes},
            indent=1,
        )
    )
    result.save(stage / "graph.pt")  # AttributionResult.load(path) reads it back
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
        if (args.out / "neuronpedia.json").is_file():  # a state saved from the page carries over
            shutil.copyfile(args.out / "neuronpedia.json", stage / "neuronpedia.json")
        create_attribution_dashboard(
            result,
            model,
            transcoders=transcoders,
            output_dir=stage,
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
        "files": sorted(planned_files(args)),
    }
    if measured:
        summary["interventions"] = measured["agreement"]
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, check `--out`, run; an error is printed as one line (exit status 1), not a
    traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and a usage line on a bad argument
    settle_arguments(parser, args)
    try:
        check_out_dir(args.out, planned_files(args), args.force)
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
