"""What `attribute` returns, how to keep it on disk, and how to prune it again without new backward passes.

    result = attribute(model, transcoders, prompt)
    result.save("out/graph/graph.pt")
    result = AttributionResult.load("out/graph/graph.pt")
    looser = prune(result, node_threshold=0.9, edge_threshold=0.95)

A saved result holds only tensors, strings and numbers, so `load` reads it with `torch.load(...,
weights_only=True)`: opening a file someone sent you runs none of its code. `save` writes a temporary file
beside the target and renames it, so the path holds the old result or the new one, never half of one; `load`
checks that every shape fits the node list. A result records the world it was made in (`world`: the model's
name and shapes, a hash of its weights and of each transcoder's), so the functions that use it with a model
can refuse another world's (`guard.check_result_fits`), and a hash of its own contents, so `load` refuses a
file edited after it was saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .fingerprints import tensor_digest
from .guard import guarded
from .nodes import GraphNodes, NodeInfo, NodeType
from .pruning import check_threshold, prune_graph

__all__ = ["AttributionResult", "FORMAT", "FORMAT_VERSION", "contents_digest", "prune"]

# The file's own name and version: `load` refuses files that are not ours or are newer than this code.
FORMAT = "part3_attribution_graphs.AttributionResult"
FORMAT_VERSION = 2  # 2: `world` holds the model's weight digest and the result's own (`contents_digest`)

PruneFn = Callable[..., tuple[Int[Tensor, " n_kept"], Float[Tensor, "n_kept n_kept"]]]


@dataclass
class AttributionResult:
    """Everything `attribute` computed: the full graph, its adjacency, and the pruned subgraph.

    Attributes:
        graph: every node, with its reading and writing vectors.
        adjacency_matrix: `A[target, source]` over all nodes.
        kept_indices: the nodes pruning kept, ascending (indices into `graph.nodes`).
        pruned_matrix: `adjacency_matrix` restricted to the kept nodes, with pruned edges zeroed.
        prompt: the text attributed (chat template applied); `str_tokens` its tokens as text.
        logit_weights: the logit nodes' probabilities, in node order: where influence starts.
        influence: every node's influence on the logits, over the full graph.
        settings: the arguments `attribute` ran with (and the thresholds of the latest pruning).
        world: the model and transcoders it was made with (`guard.world_fingerprint`); None if unknown.
    """

    graph: GraphNodes
    adjacency_matrix: Float[Tensor, "n_nodes n_nodes"]
    kept_indices: Int[Tensor, " n_kept"]
    pruned_matrix: Float[Tensor, "n_kept n_kept"]
    prompt: str
    str_tokens: list[str]
    logit_weights: Float[Tensor, " n_logits"]
    influence: Float[Tensor, " n_nodes"]
    settings: dict[str, Any]
    world: dict[str, Any] | None

    def __post_init__(self) -> None:
        # A result made from a world (attribute's) records a digest of its own contents, which `load` checks a
        # file against; a copy made by `prune` (dataclasses.replace) keeps the original's.
        if isinstance(self.world, dict) and "contents" not in self.world:
            self.world = {**self.world, "contents": contents_digest(self)}

    @property
    def kept_nodes(self) -> list[NodeInfo]:
        return [self.graph.nodes[i] for i in self.kept_indices.tolist()]

    @guarded(result="self")
    def prune(
        self, node_threshold: float = 0.8, edge_threshold: float = 0.85, prune_fn: PruneFn = prune_graph
    ) -> AttributionResult:
        """This graph pruned at new thresholds (see the module-level `prune`)."""
        return prune(self, node_threshold, edge_threshold, prune_fn)

    @guarded()
    def save(self, path: str | Path) -> Path:
        """Write the result to `path` (a `.pt` file; parent folders are created). Returns the path."""
        if not isinstance(self.world, dict) or "contents" not in self.world:
            raise ValueError(
                "This result does not record what it was made from (its world is "
                f"{'None' if self.world is None else 'missing the digest of its contents'}), so a loaded "
                "copy could not be checked: save a result that attribute returned."
            )
        path = _writable_file(path)
        g = self.graph
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "nodes": [_node_to_dict(n) for n in g.nodes],
            "writing_vecs": g.writing_vecs,
            "reading_vecs": g.reading_vecs,
            # JSON-like keys only: layer keys are ints or "E" / "L"; store them as pairs to keep their type.
            "node_ranges": [[key, start, end] for key, (start, end) in g.node_range_dict.items()],
            "seq_len": g.seq_len,
            "n_layers": g.n_layers,
            "adjacency_matrix": self.adjacency_matrix,
            "kept_indices": self.kept_indices,
            "pruned_matrix": self.pruned_matrix,
            "prompt": self.prompt,
            "str_tokens": list(self.str_tokens),
            "logit_weights": self.logit_weights,
            "influence": self.influence,
            "settings": dict(self.settings),
            "world": self.world,
        }
        # A unique temporary name beside the target, renamed at the end: a reader never sees half a file,
        # and an interrupted save leaves nothing behind.
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(tmp, "wb") as f:  # opened here, so an unwritable folder is an OSError, not torch's
                torch.save(payload, f)
            tmp.replace(path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise OSError(
                    err.errno, f"cannot write {path} ({err.strerror or err}): choose a file you can write"
                ) from None
            raise
        return path

    @classmethod
    @guarded()
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> AttributionResult:
        """Read a result written by `save` (safely: tensors and plain data only), and check that its contents
        are what `attribute` computed (`contents_digest`)."""
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise TypeError(
                f"path must be the file a result was saved to (a str or Path such as 'out/graph/graph.pt'), "
                f"got {type(path).__name__} {path!r}."
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No saved attribution result at {path}: write one with result.save(path), "
                "or `python -m part3_attribution_graphs --out DIR` (DIR/graph.pt)."
            )
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for a file that isn't ours
            raise ValueError(
                f"{path} is not a saved attribution result readable here ({type(e).__name__}: {e})."
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a saved AttributionResult (no {FORMAT!r} marker). Files written "
                "by older versions of this course (before save/load existed) cannot be read: "
                "re-run attribute and save the result."
            )
        version = payload.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written in format version {version!r}; this code reads up to "
                f"{FORMAT_VERSION}. Update the package."
            )
        try:
            graph = GraphNodes(
                nodes=[_node_from_dict(d) for d in payload["nodes"]],
                writing_vecs=payload["writing_vecs"],
                reading_vecs=payload["reading_vecs"],
                node_range_dict={key: (start, end) for key, start, end in payload["node_ranges"]},
                seq_len=payload["seq_len"],
                n_layers=payload["n_layers"],
            )
            result = cls(
                graph=graph,
                adjacency_matrix=payload["adjacency_matrix"],
                kept_indices=payload["kept_indices"],
                pruned_matrix=payload["pruned_matrix"],
                prompt=payload["prompt"],
                str_tokens=list(payload["str_tokens"]),
                logit_weights=payload["logit_weights"],
                influence=payload["influence"],
                settings=dict(payload["settings"]),
                world=None,  # set below as the file has it: __post_init__ would make up a missing digest
            )
            result.world = payload.get("world")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is damaged: {type(e).__name__} {e}. Save the result again.") from None
        problem = _shape_problem(result)
        if problem:
            raise ValueError(f"{path} is damaged: {problem}. Save the result again.")
        if version < 2:
            warnings.warn(
                f"{path} was written in format version {version}, which does not record a digest of its "
                "contents or the model's weights: edits to the file, or use with a changed model, cannot be "
                "detected. Run attribute again and save the result to get a checked file.",
                stacklevel=3,
            )
            if isinstance(result.world, dict):  # from here on it is checked like a new result
                result.world = {**result.world, "contents": contents_digest(result)}
            return result
        world = result.world
        if not isinstance(world, dict) or not isinstance(world.get("contents"), str):
            raise ValueError(
                f"{path} does not record what it was made from (its world is {world!r:.60}): it was edited "
                "or written by other code. Run attribute again and save the result."
            )
        if contents_digest(result) != world["contents"]:
            raise ValueError(
                f"{path}'s graph or adjacency values differ from what attribute computed (the file was "
                "edited after it was saved): run attribute again and save the result."
            )
        return result


@guarded(result="result")
def contents_digest(result: AttributionResult) -> str:
    """A hash of what `attribute` computed and pruning leaves alone: the nodes (without labels), their
    vectors, the adjacency matrix, the logit weights, the influence and the prompt
    (`fingerprints.tensor_digest`)."""
    g = result.graph
    h = hashlib.sha256()
    for n in g.nodes:
        kind = getattr(n.node_type, "value", n.node_type)
        fields = (kind, n.layer, n.ctx_idx, n.feature, float(n.activation), float(n.token_prob), n.str_token)
        h.update(repr(fields).encode())
    h.update(repr((result.prompt, list(result.str_tokens), g.seq_len, g.n_layers)).encode())
    for t in (
        g.writing_vecs,
        g.reading_vecs,
        result.adjacency_matrix,
        result.logit_weights,
        result.influence,
    ):
        h.update(tensor_digest(t).encode())
    return h.hexdigest()[:16]


def _writable_file(path: str | Path) -> Path:
    """`path` as a file path whose folder exists (created if needed); a folder or an empty path is refused."""
    if not str(path):
        raise ValueError("path is empty: pass a file path such as 'out/graph.pt'.")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: pass a file path inside it, e.g. {path / 'graph.pt'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            err.errno, f"cannot create the folder {path.parent} ({err.strerror or err}): choose another path"
        ) from None
    return path


def _shape_problem(result: AttributionResult) -> str | None:
    """What in `result` does not fit its own node list (None when every shape agrees)."""
    g = result.graph
    n = len(g.nodes)
    tensors = {
        "writing_vecs": g.writing_vecs,
        "reading_vecs": g.reading_vecs,
        "adjacency_matrix": result.adjacency_matrix,
        "kept_indices": result.kept_indices,
        "pruned_matrix": result.pruned_matrix,
        "logit_weights": result.logit_weights,
        "influence": result.influence,
    }
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
    n_logits = sum(node.node_type == NodeType.LOGIT for node in g.nodes)
    k = len(result.kept_indices) if result.kept_indices.dim() == 1 else -1
    expected = {
        "writing_vecs": (n, g.writing_vecs.shape[-1]),
        "reading_vecs": (n, g.writing_vecs.shape[-1]),
        "adjacency_matrix": (n, n),
        "kept_indices": (k,),
        "pruned_matrix": (k, k),
        "logit_weights": (n_logits,),
        "influence": (n,),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            return f"{name} has shape {tuple(tensors[name].shape)}, expected {shape} for {n} nodes"
    kept = result.kept_indices
    if kept.is_floating_point() or (len(kept) and (kept.min() < 0 or kept.max() >= n)):
        return f"kept_indices must be node indices in 0..{n - 1}"
    if len(result.str_tokens) != g.seq_len:
        return f"{len(result.str_tokens)} str_tokens for seq_len {g.seq_len}"
    for key, (start, end) in g.node_range_dict.items():
        if not 0 <= start <= end <= n:
            return f"node range {key!r} = ({start}, {end}) lies outside the {n} nodes"
    return None


def _node_to_dict(node: NodeInfo) -> dict[str, Any]:
    d = dataclasses.asdict(node)
    d["node_type"] = node.node_type.value
    return d


def _node_from_dict(d: dict[str, Any]) -> NodeInfo:
    known = {f.name for f in dataclasses.fields(NodeInfo)}
    return NodeInfo(**{**{k: v for k, v in d.items() if k in known}, "node_type": NodeType(d["node_type"])})


@guarded(result="result")
def prune(
    result: AttributionResult,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.85,
    prune_fn: PruneFn = prune_graph,
) -> AttributionResult:
    """The same graph pruned at new thresholds: reuses the adjacency matrix, so no backward pass runs.

    Args:
        node_threshold, edge_threshold: fractions of influence to keep, in (0, 1].
        prune_fn: `fn(adjacency, logit_weights, n_layers, node_threshold, edge_threshold) -> (kept, pruned)`;
            pass your own `prune_graph` to see your pruning at work.
    """
    node_threshold = check_threshold("node_threshold", node_threshold)
    edge_threshold = check_threshold("edge_threshold", edge_threshold)
    kept, pruned = prune_fn(
        result.adjacency_matrix, result.logit_weights, result.graph.n_layers, node_threshold, edge_threshold
    )
    settings = {**result.settings, "node_threshold": node_threshold, "edge_threshold": edge_threshold}
    return dataclasses.replace(result, kept_indices=kept, pruned_matrix=pruned, settings=settings)
