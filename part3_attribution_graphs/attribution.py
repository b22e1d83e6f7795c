"""Edges by backward passes through the local replacement model, and the `attribute` pipeline.

An edge from source s to target t is `A[t, s] = r_t . J(s -> t) w_s`: inject the target's reading
vector as a gradient at its read point, backpropagate through the frozen model, and dot the gradient
at the source's write point with the source's writing vector. The model is frozen, so one forward
pass serves every target; one backward pass serves a whole batch of targets, and one gradient serves
every source at once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from .checks import as_count, check_attribute_inputs, check_finite_adjacency, check_transcoders
from .guard import guarded, world_fingerprint
from .nodes import GraphNodes, Layer, NodeInfo, NodeType, build_graph_nodes, compute_salient_logits
from .progress import tqdm
from .pruning import compute_influence, prune_graph
from .replacement import FreezeHooks, Transcoder, TranscoderReplacementHooks
from .result import AttributionResult
from .transposed import TransposedModel

__all__ = [
    "Batch",
    "read_hook_name",
    "write_hook_name",
    "setup_attribution",
    "prepare_backward_batches",
    "compute_adjacency_matrix",
    "transposed_adjacency_matrix",
    "logit_direct_influence",
    "fold_latents",
    "FrozenForward",
    "run_frozen_forward",
    "AttributionResult",
    "logit_weights_of",
    "attribute",
    "validate_transcoders",
]


class Batch(NamedTuple):
    """One backward pass's targets: consecutive nodes of one layer (a tuple, so it also unpacks in this
    order)."""

    start: (
        int  # index of the first node in graph.nodes (the batch fills rows start : start + len(nodes) of A)
    )
    nodes: list[NodeInfo]
    reading_vecs: Float[Tensor, "batch d_model"]
    positions: Int[Tensor, " batch"]
    layers: list[Layer]


def read_hook_name(layer: Layer) -> str:
    """Where a target reads: a latent reads its MLP input (after ln2), a logit the ln_final output."""
    return "unembed.hook_in" if layer == "L" else f"blocks.{layer}.mlp.hook_in"


def write_hook_name(layer: Layer) -> str:
    """Where a source writes: embeddings into the first residual stream, latents and errors into mlp_out."""
    return "blocks.0.hook_resid_pre" if layer == "E" else f"blocks.{layer}.hook_mlp_out"


@dataclass
class FrozenForward:
    """One forward pass of the local replacement model, with its autograd graph kept for many backwards.

    `reads` and `writes` map hook names to the live activations (1, seq, d_model) where targets read
    and sources write. Differentiating a read w.r.t. the writes goes through the frozen model only.
    """

    reads: dict[str, Tensor]
    writes: dict[str, Tensor]


def run_frozen_forward(
    model: HookedSAETransformer,
    tokens: Int[Tensor, "1 seq"],
    freeze: FreezeHooks,
    read_names: set[str],
) -> FrozenForward:
    """Run the frozen model once (the replacement hooks must be installed) and keep its graph.

    Args:
        read_names: the read points the targets will use (see `read_hook_name`).
    """
    n_layers = model.cfg.n_layers
    write_names = [write_hook_name("E")] + [write_hook_name(layer) for layer in range(n_layers)]
    seen: dict[str, Tensor] = {}

    def leaf_at_embeddings(x: Tensor, hook: HookPoint) -> Tensor:
        # Differentiate from here down: no gradient reaches the weights, nothing piles up in .grad.
        seen[hook.name] = x.detach().requires_grad_(True)
        return seen[hook.name]

    def remember(x: Tensor, hook: HookPoint) -> None:
        seen[hook.name] = x

    last_resid = f"blocks.{n_layers - 1}.hook_resid_post"
    fwd_hooks: list[tuple[str, Callable]] = [(write_names[0], leaf_at_embeddings)]
    fwd_hooks += [
        (name, remember)
        for name in sorted((set(write_names[1:]) | set(read_names) | {last_resid}) - {"unembed.hook_in"})
    ]

    with torch.enable_grad(), model.hooks(fwd_hooks=freeze.fwd_hooks + fwd_hooks):
        # return_type=None stops before the final norm and unembedding (a vocab-sized matmul we don't
        # need); logit targets read the final norm's output, which we apply ourselves (scale frozen).
        model(tokens[:1], return_type=None)
        if "unembed.hook_in" in read_names:
            seen["unembed.hook_in"] = model.ln_final(seen[last_resid])
    return FrozenForward(
        reads={name: seen[name] for name in read_names}, writes={name: seen[name] for name in write_names}
    )


def setup_attribution(
    model: HookedSAETransformer,
    tokens: Tensor,
    freeze: FreezeHooks,
    target_reading_vecs: Float[Tensor, "batch d_model"],
    target_positions: Int[Tensor, " batch"],
    target_layers: list[Layer],
    *,
    forward: FrozenForward | None = None,
) -> dict[str, Tensor]:
    """Gradients of each target's reading at every source write point, one batch row per target.

    Runs the frozen model once (the replacement hooks must be installed), unless `forward` hands in a
    pass made earlier by `run_frozen_forward`. Then one backward pass differentiates all the targets
    together: target i seeds the gradient `r_i` at its read point and position, and
    `is_grads_batched=True` keeps each seed in its own batch row (autograd vectorises the backward
    over the seeds with `torch.vmap`). This gives the same rows as running `batch` copies of the prompt
    with target i reading copy i, without the copies.

    Returns:
        `{write hook name: grad of shape (batch, seq, d_model)}` for `blocks.0.hook_resid_pre` and every
        `blocks.{l}.hook_mlp_out`; write points the targets cannot see get (broadcast) zeros.
    """
    batch = target_reading_vecs.shape[0]
    if not (len(target_layers) == batch == target_positions.shape[0]):
        raise ValueError(
            f"Got {batch} reading vectors, {target_positions.shape[0]} positions and "
            f"{len(target_layers)} layers: one of each per target."
        )
    read_names = sorted({read_hook_name(layer) for layer in target_layers})
    reuse = forward is not None  # then later batches backpropagate through the same graph: keep it
    if forward is None:
        forward = run_frozen_forward(model, tokens, freeze, set(read_names))
    reading = target_reading_vecs.detach()
    positions = target_positions.to(reading.device)

    # One seed per target: zeros except r_i at (row i, its position) of its own read point.
    seeds = []
    for name in read_names:
        read = forward.reads[name]
        mine = [i for i, layer in enumerate(target_layers) if read_hook_name(layer) == name]
        if len(mine) == batch:  # the usual case, one read point per batch: no index list to send to the GPU
            rows = torch.arange(batch, device=read.device)
        else:
            rows = torch.tensor(mine, device=read.device)
        seed = torch.zeros(batch, *read.shape, dtype=read.dtype, device=read.device)
        seed[rows, 0, positions[rows]] = reading[rows].to(read.dtype)
        seeds.append(seed)

    # Autograd visits only the part of the graph below the targets' read points.
    write_names = list(forward.writes)
    grads = torch.autograd.grad(
        [forward.reads[name] for name in read_names],
        [forward.writes[name] for name in write_names],
        grad_outputs=seeds,
        retain_graph=reuse,
        allow_unused=True,
        is_grads_batched=True,
    )
    out = {}
    for name, g in zip(write_names, grads):
        shape = (batch, *forward.writes[name].shape[1:])
        if g is not None:
            out[name] = g[:, 0]
        else:  # in the batched loop, a free broadcast view; on its own, a real tensor one may write to
            zero = forward.writes[name].new_zeros(())
            out[name] = zero.expand(shape) if reuse else zero.expand(shape).clone()
    return out


def prepare_backward_batches(graph: GraphNodes, batch_size: int = 8) -> list[Batch]:
    """Split the targets (every node but the embeddings) into per-layer batches of `batch_size`.

    Returns:
        `(global_start_idx, batch_nodes, reading_vecs (b, d_model), positions (b,), layers)` per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    device = graph.reading_vecs.device
    batches = []
    for key, (start, end) in graph.node_range_dict.items():
        if key == "E":
            continue
        for lo in range(start, end, batch_size):
            hi = min(lo + batch_size, end)
            nodes = graph.nodes[lo:hi]
            positions = torch.tensor([n.ctx_idx for n in nodes], device=device, dtype=torch.long)
            batches.append(Batch(lo, nodes, graph.reading_vecs[lo:hi], positions, [n.layer for n in nodes]))
    return batches


def _source_groups(graph: GraphNodes, start_posn: int) -> list[tuple[Layer, str, slice, Tensor, Tensor]]:
    """Sources grouped by write point: (layer key, hook name, node slice, slots, writing vectors by slot).

    Within a write point the sources are laid out by position: slot (p, k) holds the k-th source at
    position p, and `slots` gives each source's flat slot `p * k_max + k` in node order. Then one
    batched matmul per write point contracts each position's gradient with the sources there.
    """
    groups = []
    for key, (start, end) in graph.node_range_dict.items():
        if key == "L" or end == start:
            continue
        positions = [n.ctx_idx for n in graph.nodes[start:end]]
        rank, seen_at = [], {}
        for p in positions:  # k: how many sources came before this one at its position
            rank.append(seen_at.get(p, 0))
            seen_at[p] = rank[-1] + 1
        k_max, device = max(seen_at.values()), graph.writing_vecs.device
        slots = torch.tensor([p * k_max + k for p, k in zip(positions, rank)], device=device)
        # Sources at masked positions (the chat-template prefix) send no edges.
        keep = torch.tensor(positions, device=device) >= start_posn
        by_slot = graph.writing_vecs.new_zeros(graph.seq_len * k_max, graph.writing_vecs.shape[1])
        by_slot[slots] = graph.writing_vecs[start:end] * keep.unsqueeze(-1)
        groups.append(
            (key, write_hook_name(key), slice(start, end), slots, by_slot.view(graph.seq_len, k_max, -1))
        )
    return groups


def _reading_targets(graph: GraphNodes, batches: list[Batch]) -> list[tuple[Tensor, Tensor, Tensor, list]]:
    """The batches without the targets that read nothing (error nodes), as (rows of A, readings, positions,
    layers).

    Their rows of A are zero whatever the gradients, so they would only take room in a backward pass.
    The index tensors are made here, once, so that the loop over batches never waits for the host.
    """
    reads_something = graph.reading_vecs.ne(0).any(dim=-1).tolist()  # one device -> host copy
    out = []
    for lo, nodes, reading, positions, layers in batches:
        keep = [i for i in range(len(nodes)) if reads_something[lo + i]]
        if keep:
            idx = torch.tensor(keep, device=reading.device)
            out.append((lo + idx, reading[idx], positions[idx], [layers[i] for i in keep]))
    return out


def _can_reach(source_key: Layer, target_layers: list[Layer]) -> bool:
    """Whether a source in layer `source_key` can send an edge to any of these targets (earlier layers
    only)."""
    return source_key == "E" or "L" in target_layers or source_key < max(target_layers)


def compute_adjacency_matrix(
    model: HookedSAETransformer,
    tokens: Tensor,
    graph: GraphNodes,
    freeze: FreezeHooks,
    tc_hooks: TranscoderReplacementHooks,
    batches: list[Batch],
    start_posn: int = 4,
) -> Float[Tensor, "n_nodes n_nodes"]:
    """Fill `A[target, source]` one batch of targets at a time.

    One forward pass of the frozen model serves every batch. Each batch then costs one backward
    pass, whose gradients are contracted with every source's writing vector in one einsum per write
    point: no loop over source nodes, and nothing in the loop makes the host wait for the GPU.

    Returns:
        A of shape (n_nodes, n_nodes); `A[j, i]` is the edge from node i to node j.
    """
    n = len(graph.nodes)
    A = torch.zeros(n, n, dtype=graph.writing_vecs.dtype, device=graph.writing_vecs.device)
    groups = _source_groups(graph, start_posn)
    targets = _reading_targets(graph, batches)
    read_names = {read_hook_name(layer) for *_, layers in targets for layer in layers}
    installed_here = not tc_hooks.installed
    tc_hooks.install()
    try:
        forward = run_frozen_forward(model, tokens, freeze, read_names)
        for rows, reading, positions, layers in tqdm(targets, desc="Backward batches", leave=False):
            grads = setup_attribution(model, tokens, freeze, reading, positions, layers, forward=forward)
            for key, name, cols, slots, writes in groups:
                if _can_reach(key, layers):
                    # (b, seq, d) x (seq, k_max, d) -> (b, seq, k_max): each position's gradient . its sources
                    edges = torch.einsum("bpd,pkd->bpk", grads[name].to(writes.dtype), writes)
                    A[rows, cols] = edges.flatten(1)[:, slots]
    finally:
        if installed_here:
            tc_hooks.remove()
    return A


def transposed_adjacency_matrix(
    model: HookedSAETransformer,
    graph: GraphNodes,
    freeze: FreezeHooks,
    transcoders: dict[int, Transcoder],
    batches: list[Batch],
    start_posn: int = 4,
) -> Float[Tensor, "n_nodes n_nodes"]:
    """`compute_adjacency_matrix`'s result, with the backward passes written out (`TransposedModel`).

    Needs no forward pass and no hooks (the frozen values hold everything), and each batch's gradients
    stop at its last target's position and its highest target's layer. For the models
    `TransposedModel.supports`; `attribute` uses it when it can.
    """
    n = len(graph.nodes)
    A = torch.zeros(n, n, dtype=graph.writing_vecs.dtype, device=graph.writing_vecs.device)
    transposed = TransposedModel(model, transcoders, freeze)
    groups = {}
    for key, _, cols, slots, writes in _source_groups(graph, start_posn):
        # Sources are in position order, so those before position P are the first `before[P]` of the group.
        positions = [node.ctx_idx for node in graph.nodes[cols]]
        before = [bisect_left(positions, p) for p in range(graph.seq_len + 1)]
        groups[key] = (cols.start, slots, writes, before)
    for rows, reading, positions, layers in tqdm(
        _reading_targets(graph, batches), desc="Backward batches", leave=False
    ):
        for key, g in transposed.gradients(reading, positions, layers):
            if key not in groups:
                continue
            start, slots, writes, before = groups[key]
            m = before[g.shape[1]]
            if m:
                edges = torch.einsum("bpd,pkd->bpk", g.to(writes.dtype), writes[: g.shape[1]])
                A[rows, start : start + m] = edges.flatten(1)[:, slots[:m]]
    return A


def logit_direct_influence(
    model: HookedSAETransformer,
    tokens: Int[Tensor, "1 seq"],
    graph: GraphNodes,
    freeze: FreezeHooks,
    tc_hooks: TranscoderReplacementHooks,
    start_posn: int = 4,
) -> Float[Tensor, " n_nodes"]:
    """An influence estimate from the logit rows alone: `sum_l p_l |A[l, s]| / sum_s' |A[l, s']|`.

    One backward pass (the logit targets only). Through the replacement model's linear paths it
    already counts a latent's effect via later layers' skips and attention, but not via other latents.
    """
    start, end = graph.node_range_dict["L"]
    nodes = graph.nodes[start:end]
    positions = torch.tensor([n.ctx_idx for n in nodes], device=graph.reading_vecs.device)
    layers: list[Layer] = [n.layer for n in nodes]
    with tc_hooks:
        grads = setup_attribution(model, tokens, freeze, graph.reading_vecs[start:end], positions, layers)
    rows = torch.zeros(
        end - start, len(graph), dtype=graph.writing_vecs.dtype, device=graph.writing_vecs.device
    )
    for _, name, cols, slots, writes in _source_groups(graph, start_posn):
        rows[:, cols] = torch.einsum("bpd,pkd->bpk", grads[name].to(writes.dtype), writes).flatten(1)[
            :, slots
        ]
    shares = rows.abs() / rows.abs().sum(dim=1, keepdim=True).clamp(min=1e-30)
    return logit_weights_of(graph, shares.dtype, shares.device) @ shares


def fold_latents(graph: GraphNodes, keep: Tensor) -> GraphNodes:
    """The graph without the latents where `keep` is False, each folded into its (layer, position)'s error
    node.

    An error node writes what the graph's latents miss of the MLP output, so it takes on the dropped
    latents' writing vectors and every target's edges plus biases still add up to its reading.
    """
    keep_list = keep.tolist()
    kept: list[int] = []
    into: list[tuple[int, int]] = []  # (dropped latent, position in `kept` of its error node)
    pending: list[int] = []
    for i, node in enumerate(graph.nodes):
        if node.node_type == NodeType.LATENT and not keep_list[i]:
            pending.append(i)
            continue
        if node.node_type == NodeType.MLP_ERROR:  # the latents before it share its layer and position
            into += [(j, len(kept)) for j in pending]
            pending = []
        kept.append(i)
    index = torch.tensor(kept, device=graph.writing_vecs.device)
    writing = graph.writing_vecs[index]
    if into:
        src, dst = (torch.tensor(v, device=writing.device) for v in zip(*into))
        writing = writing.index_add(0, dst, graph.writing_vecs[src])
    # `kept` is sorted: a group's new range is where its old bounds fall in it.
    ranges = {
        key: (bisect_left(kept, start), bisect_left(kept, end))
        for key, (start, end) in graph.node_range_dict.items()
    }
    return GraphNodes(
        nodes=[graph.nodes[i] for i in kept],
        writing_vecs=writing,
        reading_vecs=graph.reading_vecs[index],
        node_range_dict=ranges,
        seq_len=graph.seq_len,
        n_layers=graph.n_layers,
    )


def logit_weights_of(
    graph: GraphNodes, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Float[Tensor, " n_logits"]:
    """The logit nodes' probabilities in node order: the weights that influence and pruning start from."""
    probs = [n.token_prob for n in graph.nodes if n.node_type == NodeType.LOGIT]
    return torch.tensor(probs, dtype=dtype, device=device)


def validate_transcoders(model: HookedSAETransformer, transcoders: dict[int, Transcoder]) -> None:
    """Raise a clear error unless there is one transcoder per layer, matching `d_model`, reading and writing
    that layer's MLP, with finite weights (see `checks.check_transcoders`)."""
    check_transcoders(model, transcoders)


@guarded(model="model")
def attribute(
    model: HookedSAETransformer,
    transcoders: dict[int, Transcoder],
    prompt: str,
    n_output_nodes: int = 3,
    start_posn: int = 4,
    top_k: int = 5,
    batch_size: int = 256,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.85,
    max_feature_nodes: int | None = None,
) -> AttributionResult:
    """The whole pipeline: freeze, find active latents, build nodes, compute edges, prune.

    Edges come from `transposed_adjacency_matrix` when `TransposedModel.supports` the model (the same
    numbers as `compute_adjacency_matrix`, faster), else from `compute_adjacency_matrix`.

    Args:
        prompt: text (the chat template, if any, already applied).
        n_output_nodes: how many of the most probable next tokens become logit nodes.
        start_posn: positions before this (the chat-template prefix) get no intermediate nodes or edges.
        top_k: latents kept per (layer, position); the rest are folded into the error node.
        batch_size: targets per backward pass. Larger batches mostly save per-pass overhead (on a GPU);
            the gradients held at once take about `batch_size * seq * d_model` numbers (times
            `n_layers + 1` on the autograd path, for models `TransposedModel` does not support).
        node_threshold, edge_threshold: fractions of influence kept by pruning, in (0, 1].
        max_feature_nodes: keep at most this many latents, those with the largest influence estimate
            (`logit_direct_influence`), and fold the rest into the error nodes; for long prompts, where
            the dense adjacency (nodes x nodes) and the backward passes grow with the number of latents.
            None keeps every latent that `top_k` lets through.

    To re-prune the result at other thresholds without new backward passes, use `result.prune` /
    `prune(result, node_threshold, edge_threshold)`.
    """
    # The guard has taken the model's lock, checked the model and warned of hooks already on it; clear
    # errors for bad input, before any hook goes on.
    n_output_nodes, start_posn, top_k, batch_size, node_threshold, edge_threshold = check_attribute_inputs(
        model,
        transcoders,
        prompt,
        n_output_nodes,
        start_posn,
        top_k,
        batch_size,
        node_threshold,
        edge_threshold,
    )
    if max_feature_nodes is not None:
        max_feature_nodes = as_count("max_feature_nodes", max_feature_nodes)
    tokens = model.to_tokens(prompt)
    str_tokens = [model.tokenizer.decode([i]) for i in tokens[0].tolist()]

    freeze = FreezeHooks(model)
    cache = freeze.cache_frozen_values(tokens)
    tc_hooks = TranscoderReplacementHooks(model, transcoders, cache)
    with torch.no_grad():
        logits = model(tokens)
    reading_vecs, top_token_info = compute_salient_logits(model, logits, n_output_nodes)
    graph = build_graph_nodes(
        model, transcoders, cache, tc_hooks, reading_vecs, top_token_info, tokens, start_posn, top_k
    )
    is_latent = torch.tensor([n.node_type == NodeType.LATENT for n in graph.nodes])
    if max_feature_nodes is not None and int(is_latent.sum()) > max_feature_nodes:
        estimate = logit_direct_influence(model, tokens, graph, freeze, tc_hooks, start_posn).cpu()
        estimate = torch.where(is_latent, estimate, torch.tensor(-1.0, dtype=estimate.dtype))
        keep = torch.zeros(len(graph), dtype=torch.bool)
        keep[estimate.topk(max_feature_nodes).indices] = True
        graph = fold_latents(graph, keep | ~is_latent)

    batches = prepare_backward_batches(graph, batch_size)
    if TransposedModel.supports(model, freeze):
        adjacency = transposed_adjacency_matrix(model, graph, freeze, transcoders, batches, start_posn)
    else:
        adjacency = compute_adjacency_matrix(model, tokens, graph, freeze, tc_hooks, batches, start_posn)

    check_finite_adjacency(adjacency)
    logit_weights = logit_weights_of(graph, adjacency.dtype, adjacency.device)
    kept, pruned = prune_graph(adjacency, logit_weights, model.cfg.n_layers, node_threshold, edge_threshold)
    return AttributionResult(
        graph=graph,
        adjacency_matrix=adjacency,
        kept_indices=kept,
        pruned_matrix=pruned,
        prompt=prompt,
        str_tokens=str_tokens,
        logit_weights=logit_weights,
        influence=compute_influence(adjacency, logit_weights, model.cfg.n_layers),
        settings=dict(
            n_output_nodes=n_output_nodes,
            start_posn=start_posn,
            top_k=top_k,
            batch_size=batch_size,
            max_feature_nodes=max_feature_nodes,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        ),
        world=world_fingerprint(model, transcoders),
    )
