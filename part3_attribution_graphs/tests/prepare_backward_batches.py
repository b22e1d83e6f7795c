"""prepare_backward_batches: per-layer batches of every target node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..nodes import (
    GraphNodes,
    NodeInfo,
    NodeType,
)
from .compare import _copy_graph, _int, _items, _tensor
from .messages import _Fail, _fmt
from .running import _public_test, _run
from .worlds import _World


def _hand_graph() -> GraphNodes:
    """E: 3 nodes, layer 0: 2, layer 1: none, layer 2: 3, one logit; d_model = 4."""
    gen = torch.Generator().manual_seed(1)
    spec = [("E", NodeType.EMBEDDING, p) for p in range(3)] + [
        (0, NodeType.LATENT, 1),
        (0, NodeType.MLP_ERROR, 1),
    ]
    spec += [
        (2, NodeType.LATENT, 1),
        (2, NodeType.LATENT, 2),
        (2, NodeType.MLP_ERROR, 2),
        ("L", NodeType.LOGIT, 2),
    ]
    nodes = [NodeInfo(t, layer, pos, i) for i, (layer, t, pos) in enumerate(spec)]
    ranges = {"E": (0, 3), 0: (3, 5), 1: (5, 5), 2: (5, 8), "L": (8, 9)}
    return GraphNodes(
        nodes=nodes,
        writing_vecs=torch.randn(9, 4, generator=gen),
        reading_vecs=torch.randn(9, 4, generator=gen),
        node_range_dict=ranges,
        seq_len=3,
        n_layers=3,
    )


def _batches_case(fn: Callable, graph: GraphNodes, batch_size: int, label: str) -> None:
    given = _copy_graph(graph)
    out = _run(fn, given, batch_size, what="prepare_backward_batches")
    if not isinstance(out, (list, tuple)):
        raise _Fail(f"prepare_backward_batches should return a list of batches, got {type(out).__name__}.")
    index_of = {id(n): i for i, n in enumerate(given.nodes)}
    key_of = {i: key for key, (s, e) in graph.node_range_dict.items() for i in range(s, e)}
    d_model = graph.reading_vecs.shape[1]
    device = graph.reading_vecs.device
    seen: list[int] = []
    sizes: dict[Any, list[tuple[int, int]]] = {}
    for b, item in enumerate(out):
        what = f"Batch {b}{label}"
        start, batch_nodes, reading, positions, layers = _items(item, 5, f"{what}: each batch")
        start = _int(start, f"{what}: global_start_idx")
        batch_nodes = list(batch_nodes) if isinstance(batch_nodes, (list, tuple)) else batch_nodes
        if not isinstance(batch_nodes, list):
            raise _Fail(
                f"{what}: batch_nodes should be a list of NodeInfo, got {type(batch_nodes).__name__}."
            )
        if not batch_nodes:
            raise _Fail(f"{what} is empty: skip layers that have no nodes.")
        idx = []
        for n in batch_nodes:
            i = index_of.get(id(n))
            if i is None:
                i = next((j for j, m in enumerate(given.nodes) if m == n), None)
            if i is None:
                raise _Fail(
                    f"{what} holds a node that is not in graph.nodes: batch_nodes should be slices of "
                    "graph.nodes."
                )
            idx.append(i)
        if any(key_of[i] == "E" for i in idx):
            raise _Fail(
                f"{what} holds embedding nodes: skip the embeddings ('E'), which are "
                "sources only, never targets."
            )
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise _Fail(
                f"{what}: batch_nodes should be consecutive nodes of graph.nodes, got indices {_fmt(idx)}."
            )
        keys = {key_of[i] for i in idx}
        if len(keys) > 1:
            raise _Fail(
                f"{what} mixes nodes of layers {sorted(keys, key=str)}: each batch must hold nodes of a "
                "single layer (use graph.node_range_dict to walk the layers)."
            )
        key = keys.pop()
        layer_start = graph.node_range_dict[key][0]
        if start != idx[0]:
            extra = (
                " - that is its offset within the layer; add the layer's start index"
                if start == idx[0] - layer_start
                else ""
            )
            raise _Fail(
                f"{what}: global_start_idx is {start}, but its first node is graph.nodes[{idx[0]}]{extra}. "
                "global_start_idx is the index in the whole node list."
            )
        if len(idx) > batch_size:
            raise _Fail(f"{what} has {len(idx)} nodes, more than batch_size={batch_size}.")
        reading = _tensor(reading, f"{what}: reading_vecs", shape=(len(idx), d_model), device=device)
        if not torch.allclose(reading.to(graph.reading_vecs.dtype), graph.reading_vecs[idx]):
            cause = (
                " You passed their writing vectors: a target is read through its reading vector (the "
                "gradient flows back from what the node reads)."
                if torch.allclose(reading.to(graph.writing_vecs.dtype), graph.writing_vecs[idx])
                else ""
            )
            raise _Fail(
                f"{what}: reading_vecs should be graph.reading_vecs[{idx[0]}:{idx[-1] + 1}], the reading "
                f"vectors of the batch's own nodes.{cause}"
            )
        if isinstance(positions, (list, tuple)):
            raise _Fail(
                f"{what}: positions should be a tensor (torch.tensor([n.ctx_idx for n in batch_nodes])), "
                f"got a {type(positions).__name__}."
            )
        positions = _tensor(positions, f"{what}: positions", shape=(len(idx),), device=device, floating=False)
        ctx = [graph.nodes[i].ctx_idx for i in idx]
        if positions.tolist() != ctx:
            cause = (
                " (those are the nodes' indices in graph.nodes; a position is where the node sits in the "
                "prompt, its ctx_idx)"
                if positions.tolist() == idx and idx != ctx
                else ""
            )
            raise _Fail(
                f"{what}: positions should be the nodes' ctx_idx {ctx}, got {positions.tolist()}{cause}."
            )
        node_layers = [graph.nodes[i].layer for i in idx]
        if list(layers) != node_layers:
            cause = (
                " (those are the nodes' positions, ctx_idx; take each node's .layer)"
                if list(layers) == ctx and ctx != node_layers
                else ""
            )
            raise _Fail(
                f"{what}: layers should be the nodes' layer entries {node_layers}, got {_fmt(list(layers))}"
                f"{cause}."
            )
        seen += idx
        sizes.setdefault(key, []).append((idx[0], len(idx)))

    targets = [i for i in range(len(graph.nodes)) if key_of.get(i) != "E"]
    if len(seen) != len(set(seen)):
        raise _Fail(f"Some nodes{label} appear in more than one batch: every target exactly once.")
    missing = sorted(set(targets) - set(seen))
    if missing:
        if all(key_of[i] == "L" for i in missing):
            raise _Fail(f"The logit nodes{label} are in no batch: logit nodes ('L') are targets too.")
        raise _Fail(
            f"{len(missing)} target nodes{label} are in no batch (e.g. graph.nodes[{missing[0]}], layer "
            f"{key_of[missing[0]]!r}): every node except the embeddings is a target."
        )
    for key, chunks in sizes.items():
        lengths = [n for _, n in sorted(chunks)]
        if any(n != batch_size for n in lengths[:-1]):
            raise _Fail(
                f"Layer {key!r}{label} is split into batches of {lengths}: split each layer into consecutive "
                f"chunks of batch_size={batch_size} (only its last chunk may be smaller)."
            )


@_public_test("prepare_backward_batches")
def test_prepare_backward_batches(fn: Callable, w: _World) -> None:
    """Per-layer batches of every target, with their global start index, vectors, positions and layers."""
    for batch_size in (8, 7, 10_000):
        _batches_case(fn, w.graph, batch_size, f" (batch_size={batch_size})")
    _batches_case(fn, _hand_graph(), 2, " (a hand-made graph with an empty layer, batch_size=2)")
