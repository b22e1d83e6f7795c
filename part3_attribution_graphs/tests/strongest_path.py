"""Autograder test for `strongest_path`: the strongest input-to-top-logit path of a pruned graph.

Any path that is valid (embedding first, top logit last, an edge of the pruned graph at every step) and as
strong as the strongest passes, so a correct answer that breaks a tie differently is not failed.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import torch
from torch import Tensor

from ..case_study import strongest_path as _ref_strongest_path
from ..nodes import GraphNodes, NodeInfo, NodeType
from ..pruning import normalize_matrix, prune_graph
from ..result import AttributionResult
from .compare import _float, _int
from .handmade import _hand_made_result
from .messages import _Fail, _fmt
from .running import _public_test, _run
from .worlds import _World

__all__ = ["test_strongest_path"]

_TOL = 1e-6  # relative, on strengths (products of a handful of shares)


def _hand_result() -> AttributionResult:
    """Twelve nodes, ten kept. The strongest path runs through a negative edge; a greedy walk back from the
    logit, raw |A|, signed weights, sums, column shares or a start at an error node each pick another."""
    E, L, R, G = NodeType.EMBEDDING, NodeType.LATENT, NodeType.MLP_ERROR, NodeType.LOGIT
    nodes = [
        NodeInfo(E, "E", 0, 10, str_token="Dallas"),
        NodeInfo(E, "E", 1, 11, str_token="?"),
        NodeInfo(E, "E", 2, 12, str_token="\n"),
        NodeInfo(L, 0, 0, 5, activation=1.0),
        NodeInfo(L, 0, 1, 7, activation=2.0),
        NodeInfo(R, 0, 0, 0),
        NodeInfo(L, 0, 2, 4, activation=1.0),
        NodeInfo(L, 1, 1, 3, activation=1.5),
        NodeInfo(L, 1, 1, 9, activation=0.5),
        NodeInfo(R, 1, 1, 0),
        NodeInfo(G, "L", 1, 20, token_prob=0.6, str_token="Austin"),
        NodeInfo(G, "L", 1, 21, token_prob=0.3, str_token="Texas"),
    ]
    kept = torch.tensor([0, 1, 3, 4, 5, 7, 8, 9, 10, 11])
    # Local (kept) indices: 0, 1 embeddings; 2, 3 layer-0 latents; 4 error; 5, 6 layer-1 latents; 7 error;
    # 8 the top logit; 9 the second logit. {(source, target): weight}. Shares, row by row: 2 <- 0: .75;
    # 3 <- 1: .6; 5 <- 2: .6 (negative); 6 <- 3: .6; 8 <- 5: .25, 6: .29, 7: .21, 1: .25 (direct).
    # Strongest: 0 -> 2 -> 5 -> 8 (0.1125). Greedy takes 6 first (1 -> 3 -> 6 -> 8: 0.105).
    edges = {
        (0, 2): 3.0,
        (1, 2): 1.0,
        (0, 3): 16.0,
        (1, 3): 24.0,
        (2, 5): -60.0,
        (3, 5): 10.0,
        (4, 5): 20.0,
        (1, 5): 10.0,
        (2, 6): 1.0,
        (3, 6): 6.0,
        (4, 6): 3.0,
        (5, 8): 3.0,
        (6, 8): -3.5,
        (7, 8): 2.5,
        (1, 8): 3.0,
        (5, 9): 1.0,
        (6, 9): 4.0,
        (3, 9): 2.0,
    }
    A = torch.zeros(10, 10, dtype=torch.float64)
    for (s, t), v in edges.items():
        A[t, s] = v
    graph = GraphNodes(nodes=nodes, seq_len=3, n_layers=2)
    return _hand_made_result(graph, torch.tensor([0.6, 0.3]), kept=kept, pruned=A)


def _kinds(result: Any) -> list[str]:
    return [result.graph.nodes[i].node_type.value for i in result.kept_indices.tolist()]


def _weights(result: Any, mode: str = "") -> Tensor:
    """The edge weights a known mistake uses (the reference's for any other `mode`)."""
    A = result.pruned_matrix.double()
    kinds = _kinds(result)
    B = {
        "raw": A.abs(),
        "signed": A / A.abs().sum(1, keepdim=True).clamp(min=1e-30),
        "columns": A.abs() / A.abs().sum(0, keepdim=True).clamp(min=1e-30),
    }.get(mode, normalize_matrix(A))
    if mode != "direct":  # drop the direct edges from embeddings to logits
        is_logit = torch.tensor([k == "logit" for k in kinds])
        is_embedding = torch.tensor([k == "embedding" for k in kinds])
        B = B * ~(is_logit[:, None] & is_embedding[None, :])
    if mode == "renormalised":  # shares recomputed after dropping the direct edges
        B = B / B.sum(1, keepdim=True).clamp(min=1e-30)
    return B


def _sweep(B: Tensor, is_input: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """`best` and `parent` after `n` sweeps of the reference's dynamic programme."""
    best = is_input.double()
    parent = torch.zeros(len(best), dtype=torch.long)
    for _ in range(n):
        via, parent = (B * best).max(1)
        best = torch.where(is_input, best, via)
    return best, parent


def _path_variant(result: Any, mode: str) -> list[int]:
    """The path a known mistake finds (global node indices), to name the mistake in the message."""
    if mode == "full":  # the reference's search, on the full matrix over every node
        whole = _hand_made_result(result.graph, result.logit_weights, adjacency=result.adjacency_matrix)
        return _path_variant(whole, "")
    kinds = _kinds(result)
    is_input = torch.tensor([k == "embedding" for k in kinds])
    if mode == "error_start":
        is_input = torch.tensor([k in ("embedding", "mlp_error") for k in kinds])
    B = _weights(result, mode)
    end = kinds.index("logit")
    if mode == "last_logit":
        end = len(kinds) - 1
    if mode == "greedy":
        path = [end]
        while not is_input[path[-1]] and B[path[-1]].abs().sum() > 0:
            path.append(int(B[path[-1]].argmax()))
        return result.kept_indices[path[::-1]].tolist()
    if mode == "sum":
        best = torch.where(is_input, 0.0, float("-inf")).double()
        for _ in range(len(kinds)):
            cand = torch.where(B > 0, B + best, torch.tensor(float("-inf"), dtype=B.dtype))
            via, parent = cand.max(1)
            best = torch.where(is_input, best, via)
    else:
        best, parent = _sweep(B, is_input, result.graph.n_layers if mode == "early" else len(kinds))
    path = [end]
    while not is_input[path[-1]] and len(path) <= len(kinds):
        path.append(int(parent[path[-1]]))
    return result.kept_indices[path[::-1]].tolist()


_EARLY = (
    "your sweeps stopped before the strongest path reached the logit: after k sweeps, best[t] covers only "
    "paths of at most k edges, and a path can have n_layers + 1 edges or more (embedding, latents at "
    "several layers, logit). Sweep until a sweep changes nothing (at most once per node)"
)
_RENORMALISED = (
    "you renormalised the weights after dropping the direct edges: an edge's weight is its share of ALL of "
    "its target's input, |A[t, s]| / sum |A[t, :]| with the direct edges counted in the sum. Normalise "
    "first, then zero the embedding -> logit entries, and do not normalise again"
)

_FULL = (
    "you searched result.adjacency_matrix, the full graph; the path runs in the pruned graph: "
    "result.pruned_matrix, whose rows and columns are the nodes of result.kept_indices"
)

_PATH_MISTAKES = (
    ("full", _FULL),
    (
        "direct",
        "your path is a direct edge from an embedding to the logit; it says only that this token matters, "
        "not how: leave out the edges from embeddings straight to logits, so that the path passes through "
        "at least one latent",
    ),
    (
        "greedy",
        "walking back from the logit along the strongest incoming edge is greedy, and greedy is not optimal "
        "here: a weaker edge can lead to a much stronger path. Keep, for every node, the strength of the "
        "strongest path reaching it (dynamic programming in topological order)",
    ),
    (
        "raw",
        "normalise first: an edge's weight is |A[t, s]| divided by the sum of |A[t, :]| (the share of t's "
        "input that comes from s), as in normalize_matrix; raw |A| favours nodes with big inputs",
    ),
    (
        "signed",
        "take absolute values: a strong negative edge (inhibition) is as much part of the mechanism as a "
        "positive one, so the weight is |A[t, s]| / sum |A[t, :]|",
    ),
    (
        "columns",
        "normalise each ROW of A (a target's incoming edges: A[t, s] is target by source), not each column",
    ),
    (
        "sum",
        "a path's strength is the PRODUCT of its edges' normalised weights (or the sum of their logs), not "
        "their sum",
    ),
    ("early", _EARLY),
    ("renormalised", _RENORMALISED),
)


def _strength_hint(result: Any, local: Tensor, strength: float) -> str:
    """What a wrong strength for the right path probably comes from."""

    def matches(value: float) -> bool:
        return abs(strength - value) <= _TOL * abs(value)

    if matches(float(result.pruned_matrix.double().abs()[local[1:], local[:-1]].prod())):
        return "return the product of the edges' normalised weights |A[t, s]| / sum |A[t, :]|, not of raw |A|"
    if matches(float(_weights(result, "renormalised")[local[1:], local[:-1]].prod())):
        return _RENORMALISED
    whole = _hand_made_result(result.graph, result.logit_weights, adjacency=result.adjacency_matrix)
    path = [int(k) for k in result.kept_indices[local].tolist()]
    if matches(float(_weights(whole)[path[1:], path[:-1]].prod())):
        return _FULL
    kinds = _kinds(result)
    is_input = torch.tensor([k == "embedding" for k in kinds])
    B, end = _weights(result), kinds.index("logit")
    final = float(_sweep(B, is_input, len(kinds))[0][end])
    for n in range(1, len(kinds)):
        value = float(_sweep(B, is_input, n)[0][end])
        if value == final:
            break
        if matches(value):
            return _EARLY
    return "return the product of its edges' normalised weights"


def _check_path(fn: Any, result: Any, label: str) -> None:
    out = _run(fn, result, what=f"strongest_path(result) on {label}")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise _Fail(f"{label}: return a tuple (path, strength), got {type(out).__name__} {_fmt(out)}.")
    path, strength = out
    if isinstance(path, Tensor):
        path = path.tolist()
    if not isinstance(path, (list, tuple)) or not path:
        raise _Fail(f"{label}: the path should be a non-empty list of node indices, got {_fmt(path)}.")
    path = [_int(p, f"{label}: each node of the path") for p in path]
    strength = _float(strength, f"{label}: the strength")
    nodes, kept = result.graph.nodes, result.kept_indices.tolist()
    ref_path, ref_strength = _ref_strongest_path(result)
    where = {node: k for k, node in enumerate(kept)}
    kinds = _kinds(result)
    top = kept[kinds.index("logit")]

    def is_type(node: int, kind: str) -> bool:
        return 0 <= node < len(nodes) and nodes[node].node_type.value == kind

    if is_type(path[0], "logit") and is_type(path[-1], "embedding"):
        raise _Fail(
            f"{label}: your path runs from the logit back to the input ({_fmt(path)}); return it in the "
            "order the information flows: path[0] is the embedding node, path[-1] the top logit."
        )
    if any(p not in where for p in path):
        local = [p for p in path if 0 <= p < len(kept)]
        if len(local) == len(path) and [kept[p] for p in path] == ref_path:
            raise _Fail(
                f"{label}: your path {_fmt(path)} indexes the pruned matrix; return indices into "
                "result.graph.nodes: map each one through result.kept_indices."
            )
        raise _Fail(
            f"{label}: nodes {[p for p in path if p not in where]} of your path are not in the pruned graph "
            "(result.kept_indices): a path goes along edges of result.pruned_matrix."
        )
    if not is_type(path[0], "embedding"):
        raise _Fail(
            f"{label}: your path starts at a {nodes[path[0]].node_type.value} node; start at an input token, "
            "an embedding node (error nodes have no incoming edges either, but they are not the prompt)."
        )
    if path[-1] != top:
        raise _Fail(
            f"{label}: your path ends at node {path[-1]}, not the top logit (node {top}, the first logit "
            "node kept: logit nodes come most probable first)."
        )
    A = result.pruned_matrix
    for s, t in zip(path, path[1:]):
        if A[where[t], where[s]] == 0:
            raise _Fail(
                f"{label}: your path steps from node {s} to node {t}, but the pruned graph has no edge "
                f"from {s} to {t}: A[t, s] = 0. Each step must be an edge of result.pruned_matrix, and A is "
                "target by source: the edges into t are row t, those out of s column s."
            )
    B = normalize_matrix(A.double())
    local = torch.tensor([where[p] for p in path])
    actual = float(B[local[1:], local[:-1]].prod())
    if abs(actual - ref_strength) > _TOL * ref_strength:
        for mode, hint in _PATH_MISTAKES:
            if path == _path_variant(result, mode):
                raise _Fail(f"{label}: {hint}.")
        raise _Fail(
            f"{label}: your path {_fmt(path)} has strength {actual:.4g}, but a stronger one exists "
            f"({ref_strength:.4g}): {_fmt(ref_path)}."
        )
    if abs(strength - actual) > _TOL * actual:
        raise _Fail(
            f"{label}: you return strength {strength:.4g} for your path, which has strength {actual:.4g}: "
            f"{_strength_hint(result, local, strength)}."
        )


def _node_at_a_time(fn: Any) -> int | None:
    """The line of a `for` loop that assigns one node's entry at a time (`best[t] = ...` with `t` the loop
    variable), if `fn`'s source has one: a correct programme, but not the sweep the lesson asks for."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        first = inspect.getsourcelines(fn)[1]
    except (OSError, TypeError, SyntaxError):
        return None  # no source to read (a built-in, a lambda in an odd place): no note
    for loop in ast.walk(tree):
        if not isinstance(loop, ast.For):
            continue
        names = {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
        for node in ast.walk(loop):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Subscript) and any(
                        isinstance(n, ast.Name) and n.id in names for n in ast.walk(sub.slice)
                    ):
                        return first + loop.lineno - 1
    return None


_SWEEP_NOTE = (
    "your strongest_path passes; it updates one node at a time in a Python loop (line {line}). The lesson's "
    "sweep updates every node at once, `via, parent = (B * best).max(dim=1)` then `best = "
    "torch.where(is_input, best, via)`: one matrix operation per sweep, repeated until a sweep changes "
    "nothing (once per edge of the longest path). Same answer, and it scales to graphs of thousands of nodes."
)


@_public_test("strongest_path")
def test_strongest_path(fn: Any, w: _World) -> str | None:
    """The strongest path on a hand-made graph and on the toy (or your) pruned graph."""
    _check_path(fn, _hand_result(), "a hand-made graph (a negative edge on the strongest path)")
    for node_threshold, edge_threshold in ((0.8, 0.85), (0.9, 0.95), (1.0, 1.0)):
        # the lesson's thresholds, looser where they leave no path through a latent to the top logit
        kept, pruned = prune_graph(w.adjacency, w.logit_weights, w.n_layers, node_threshold, edge_threshold)
        result = _hand_made_result(w.graph, w.logit_weights, kept=kept, pruned=pruned, adjacency=w.adjacency)
        try:
            _ref_strongest_path(result)
        except ValueError:
            continue
        break
    _check_path(fn, result, f"{w.name} (pruned at {node_threshold} / {edge_threshold})")
    line = _node_at_a_time(fn)
    return None if line is None else _SWEEP_NOTE.format(line=line)
