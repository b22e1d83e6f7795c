"""compute_adjacency_matrix: every edge, against the reference backward passes."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable

import torch
from torch import Tensor

from .. import attribution as _attribution
from ..attribution import (
    Batch,
    prepare_backward_batches,
    read_hook_name,
    run_frozen_forward,
    setup_attribution,
)
from ..nodes import (
    GraphNodes,
    build_graph_nodes,
    compute_salient_logits,
)
from .compare import _bad, _close, _copy_graph, _ntype, _tensor, _worst
from .messages import _Fail
from .running import _public_test, _run
from .worlds import _NoSkipHooks, _reference_adjacency, _subset, _tolerance, _World


def _second_adjacency_case(w: _World) -> tuple[GraphNodes, list[Batch], int, Tensor]:
    """Another start_posn (6) and top_k (2) on the same prompt, so hard-coded values show up."""
    if "adjacency2" not in w.extra:
        start = w.start_posn + 2
        tc_hooks = w.tc_hooks()
        reading, info = compute_salient_logits(w.model, w.logits, 2)
        graph = build_graph_nodes(
            w.model, w.transcoders, w.cache, tc_hooks, reading, info, w.tokens, start, 2
        )
        batches = _subset(w, prepare_backward_batches(graph, 16 if w.toy else w.batch_size))
        w.extra["adjacency2"] = (graph, batches, start, _reference_adjacency(w, graph, batches, start))
    return w.extra["adjacency2"]


_HOOK_HINT = "call tc_hooks.remove() once the backward passes are done (also when they fail: use try/finally)"
_SLOTS_HINT = (
    "edges.flatten(1) has one column per (position, k) slot of the layout, padding included, not one per "
    "source: take each source's column with [:, slots], which also keeps node order"
)


def _chained_store(fn: Callable) -> str | None:
    """The learner's first assignment into chained indexing (`A[rows][:, cols] = ...`), if their source shows
    one."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Subscript):
                return (ast.get_source_segment(src, node) or "").strip().splitlines()[0]
    return None


def _copy_message(fn: Callable, label: str, what: str) -> str:
    line = _chained_store(fn)
    if line is None:
        return ""
    return (
        f"Your adjacency matrix{label} {what}: `{line}` writes into a copy. Indexing A with a tensor or list "
        "of rows (A[rows]) makes a new tensor, so the assignment fills that copy and A never changes. Index "
        "A once: A[rows, cols] = ... ."
    )


def _adjacency_variant(
    w: _World,
    graph: GraphNodes,
    batches: list,
    start_posn: int,
    pick: Callable[[Tensor, Tensor, int], Tensor],
) -> Tensor | None:
    """The reference's loop with `pick(edges.flatten(1), slots, n_sources)` placing each group's edges (None
    if the reference's helpers have changed shape)."""
    try:
        n = len(graph.nodes)
        A = torch.zeros(n, n, dtype=graph.writing_vecs.dtype, device=graph.writing_vecs.device)
        groups = _attribution._source_groups(graph, start_posn)
        targets = _attribution._reading_targets(graph, batches)
        read_names = {read_hook_name(layer) for *_, layers in targets for layer in layers}
        hooks = w.tc_hooks().install()
        try:
            forward = run_frozen_forward(w.model, w.tokens, w.freeze, read_names)
            for rows, reading, positions, layers in targets:
                grads = setup_attribution(
                    w.model, w.tokens, w.freeze, reading, positions, layers, forward=forward
                )
                for key, name, cols, slots, writes in groups:
                    if _attribution._can_reach(key, layers):
                        edges = torch.einsum("bpd,pkd->bpk", grads[name].to(writes.dtype), writes).flatten(1)
                        A[rows, cols] = pick(edges, slots, cols.stop - cols.start)
        finally:
            hooks.remove()
        return A
    except Exception:  # noqa: BLE001 - a diagnosis that cannot be formed simply does not match
        return None


def _adjacency_case(
    fn: Callable, w: _World, graph: GraphNodes, batches: list, start_posn: int, expected: Tensor, label: str
) -> None:
    n = len(graph.nodes)
    given = _copy_graph(graph)
    given_batches = [
        Batch(b.start, list(b.nodes), b.reading_vecs.clone(), b.positions.clone(), list(b.layers))
        for b in batches
    ]
    tc_hooks = w.tc_hooks()
    A = _run(
        fn,
        w.model,
        w.tokens,
        given,
        w.freeze,
        tc_hooks,
        given_batches,
        start_posn,
        what="compute_adjacency_matrix",
        hook_hint=_HOOK_HINT,
        hints=[
            (
                KeyError,
                "hook_resid_post",
                "setup_attribution returns gradients at blocks.0.hook_resid_pre "
                "and blocks.{l}.hook_mlp_out (which equals the gradient at "
                "hook_resid_post): latents and errors of layer l write at "
                "hook_mlp_out",
            ),
            (RuntimeError, "shape mismatch", _SLOTS_HINT),
        ],
    )
    A = _tensor(A, f"The adjacency matrix{label}", shape=(n, n), device=w.device)
    if _close(A, expected, w.tol):
        return

    tol = max(w.tol, _tolerance(A.dtype))  # `a` below is float64: keep the tolerance of the learner's dtype
    a, e = A.double().cpu(), expected.double().cpu()
    bad = _bad(a, e, tol)
    key_of = [key for key, (s, t) in graph.node_range_dict.items() for _ in range(s, t)]
    masked = torch.tensor([nd.ctx_idx < start_posn and nd.layer != "L" for nd in graph.nodes])
    if _close(a, e.T, tol):
        raise _Fail(
            f"Edge weights{label} come back transposed: A[j, i] is the edge from i to j (row = target, "
            "column = source)."
        )
    if a.abs().max() == 0:
        raise _Fail(
            _copy_message(fn, label, "is all zeros")
            or f"Your adjacency matrix{label} is all zeros: for each batch, write the edge weights into rows "
            "global_start_idx : global_start_idx + len(batch_nodes) (and index A once, A[rows, cols] = "
            "...: A[rows][:, cols] = ... would fill a copy)."
        )
    if _close(a, -e, tol):
        raise _Fail(f"Your edge weights{label} have the wrong sign.")
    if bad[:, masked].any() and not bad[:, ~masked].any():
        raise _Fail(
            f"Edges from sources at positions < start_posn (={start_posn}){label} must be zero: mask the "
            f"chat-template prefix ({_worst(a[:, masked], e[:, masked], 'A[:, masked]')})."
        )
    free = _reference_adjacency(w, graph, batches, start_posn, _NoSkipHooks())
    if _close(a, free, tol):
        raise _Fail(
            f"Your edges{label} match gradients through the real MLPs: install the transcoder hooks "
            "(tc_hooks.install()) before calling setup_attribution, and remove them afterwards."
        )
    # Checked before the all-zero rows: both mistakes empty whole rows too (targets whose only sources sit
    # at start_posn, or read only embeddings, whose reading vectors are zero).
    at_start = torch.tensor([nd.ctx_idx == start_posn and nd.layer != "L" for nd in graph.nodes])
    if bad[:, at_start].any() and not bad[:, ~at_start].any() and a[:, at_start].abs().max() == 0:
        raise _Fail(
            f"Edges from sources at position start_posn (={start_posn}){label} are zero: mask only the "
            "positions before it (ctx_idx < start_posn, not <=)."
        )
    misread = _copy_graph(graph)
    misread.writing_vecs = graph.reading_vecs.clone()
    if _close(a, _reference_adjacency(w, misread, batches, start_posn).double().cpu(), tol):
        raise _Fail(
            f"Your edges{label} contract the gradient with each source's READING vector: an edge is what the "
            "source writes, so use graph.writing_vecs[source]."
        )
    zero_rows = [i for i in range(n) if a[i].abs().max() == 0 and e[i].abs().max() > 0]
    if zero_rows:
        raise _Fail(
            _copy_message(fn, label, f"has {len(zero_rows)} all-zero rows")
            or f"{len(zero_rows)} rows{label} are all zero but should not be (e.g. row {zero_rows[0]}, a "
            f"{_ntype(graph.nodes[zero_rows[0]])} target): fill rows global_start_idx + b for every batch."
        )
    unslotted = _adjacency_variant(
        w, graph, batches, start_posn, lambda edges, slots, n_src: edges[:, :n_src]
    )
    if unslotted is not None and _close(a, unslotted.double().cpu(), tol):
        raise _Fail(f"Edges from latents and errors{label} land in the wrong columns: {_SLOTS_HINT}.")
    bad_src = {key_of[i] for i in range(n) if bad[:, i].any()}
    bad_tgt = {key_of[j] for j in range(n) if bad[j].any()}
    j, i = (int(v) for v in torch.unravel_index((a - e).abs().argmax(), a.shape))
    example = f"A[{j}, {i}] = {a[j, i].item():.4g}, expected {e[j, i].item():.4g}"
    if "E" not in bad_src:
        hint = (
            "edges from embeddings are right, but not those from latents and errors: check that a source in "
            "layer l uses the gradient at blocks.{l}.hook_mlp_out, and that each source's edge lands in its "
            "own column (edges.flatten(1)[:, slots] lists them in node order)"
        )
    elif bad_src == {"E"}:
        hint = (
            "edges from latents and errors are right, but not those from embeddings: they write at "
            "blocks.0.hook_resid_pre, so use that gradient at the embedding's position"
        )
    else:
        hint = "check which gradient you contract with which writing vector, and at which position"
    raise _Fail(
        f"Edge weights{label} differ from the reference ({example}; wrong edges from sources in "
        f"{sorted(bad_src, key=str)} into targets in {sorted(bad_tgt, key=str)}): {hint}."
    )


@_public_test("compute_adjacency_matrix")
def test_compute_adjacency_matrix(fn: Callable, w: _World) -> None:
    """Every edge A[target, source] of the graph, compared with the reference backward passes."""
    _adjacency_case(fn, w, w.graph, w.batches, w.start_posn, w.adjacency, "")
    graph, batches, start, expected = _second_adjacency_case(w)
    _adjacency_case(fn, w, graph, batches, start, expected, f" (start_posn={start}, top_k=2)")
