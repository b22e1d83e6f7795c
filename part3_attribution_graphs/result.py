"""What `attribute` returns, how to keep it on disk, and how to prune it again without new backward passes.

    result = attribute(model, transcoders, prompt)
    result.save("out/graph/graph.pt")
    result = AttributionResult.load("out/graph/graph.pt")
    looser = prune(result, node_threshold=0.9, edge_threshold=0.95)

A saved result holds only tensors, strings and numbers, so `load` reads it with `torch.load(...,
weights_only=True)`: opening a file someone sent you runs none of its code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .nodes import GraphNodes, NodeInfo, NodeType
from .pruning import check_threshold, prune_graph

__all__ = ["AttributionResult", "FORMAT", "FORMAT_VERSION", "prune"]

# The file's own name and version: `load` refuses files that are not ours or are newer than this code.
FORMAT = "part3_attribution_graphs.AttributionResult"
FORMAT_VERSION = 1

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

    @property
    def kept_nodes(self) -> list[NodeInfo]:
        return [self.graph.nodes[i] for i in self.kept_indices.tolist()]

    def prune(
        self, node_threshold: float = 0.8, edge_threshold: float = 0.85, prune_fn: PruneFn = prune_graph
    ) -> AttributionResult:
        """This graph pruned at new thresholds (see the module-level `prune`)."""
        return prune(self, node_threshold, edge_threshold, prune_fn)

    def save(self, path: str | Path) -> Path:
        """Write the result to `path` (a `.pt` file; parent folders are created). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
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
        }
        tmp = path.with_name(path.name + ".partial")
        torch.save(payload, tmp)
        tmp.replace(path)  # a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> AttributionResult:
        """Read a result written by `save` (safely: tensors and plain data only)."""
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
        graph = GraphNodes(
            nodes=[_node_from_dict(d) for d in payload["nodes"]],
            writing_vecs=payload["writing_vecs"],
            reading_vecs=payload["reading_vecs"],
            node_range_dict={key: (start, end) for key, start, end in payload["node_ranges"]},
            seq_len=payload["seq_len"],
            n_layers=payload["n_layers"],
        )
        return cls(
            graph=graph,
            adjacency_matrix=payload["adjacency_matrix"],
            kept_indices=payload["kept_indices"],
            pruned_matrix=payload["pruned_matrix"],
            prompt=payload["prompt"],
            str_tokens=list(payload["str_tokens"]),
            logit_weights=payload["logit_weights"],
            influence=payload["influence"],
            settings=dict(payload["settings"]),
        )


def _node_to_dict(node: NodeInfo) -> dict[str, Any]:
    d = dataclasses.asdict(node)
    d["node_type"] = node.node_type.value
    return d


def _node_from_dict(d: dict[str, Any]) -> NodeInfo:
    known = {f.name for f in dataclasses.fields(NodeInfo)}
    return NodeInfo(**{**{k: v for k, v in d.items() if k in known}, "node_type": NodeType(d["node_type"])})


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
