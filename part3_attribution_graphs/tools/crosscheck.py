"""Adapters to circuit-tracer (`pip install circuit-tracer==0.5.0`), to check our graphs against theirs.

`ct_replacement_model` rebuilds one of our worlds as circuit-tracer's TransformerLens-backed
`ReplacementModel`, sharing the model's weights and copying each SAELens transcoder into a
`SingleLayerTranscoder`; no file or network access. `ct_attribute` runs circuit-tracer's `attribute`
on the same tokens and logit targets as ours, and `aligned_adjacency` lays both adjacency matrices
out in one node order.

The two engines define the graph the same way (frozen attention patterns and norm scales, MLP
gradients through `W_skip`, latents read after ln2 and write at `hook_mlp_out`, logits read the
ln_final output along the demeaned unembedding, `b_dec` is a constant and not a node), except for:

- latents. Ours: the `top_k` most active per (layer, position). circuit-tracer: every active latent.
- error node. Ours: `mlp_out` minus kept latents, `b_dec` and skip. circuit-tracer: `mlp_out` minus
  *all* active latents, `b_dec` and skip.
- masked prefix (`start_posn` / `zero_positions`). Ours: no latent or error nodes, and the embeddings
  there send no edges. circuit-tracer: no latents, zero error vectors, but the embeddings still send
  edges.
- logits. Ours: the `n_output_nodes` most probable tokens. circuit-tracer: tokens up to
  `desired_logit_prob` (we pass ours in).
- node order. Ours: embeddings, then per layer per position (latents, error), logits. circuit-tracer:
  latents, errors (layer-major), embeddings, logits.

With `top_k` at least the number of active latents, both have the same latents and error nodes;
with `start_posn=0` and `zero_positions=slice(0, 0)` they have the same graph, edge for edge.
"""

from __future__ import annotations

import copy

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor

from ..nodes import NodeInfo, NodeType
from ..replacement import Transcoder
from ..result import AttributionResult

__all__ = [
    "ct_transcoder_set",
    "ct_replacement_model",
    "ct_attribute",
    "our_node_key",
    "ct_node_keys",
    "aligned_adjacency",
    "to_ct_graph",
]

NodeKey = tuple  # ("E", pos) | ("latent", layer, pos, feature) | ("error", layer, pos) | ("logit", token id)


def ct_transcoder_set(transcoders: dict[int, Transcoder]):
    """Our SAELens skip transcoders as a circuit-tracer `TranscoderSet` (same maths, their layout).

    SAELens keeps `W_enc` as (d_in, d_sae), circuit-tracer as (d_sae, d_in); both apply the skip as
    `x @ W_skip.T` and JumpReLU as `pre * (pre > threshold)` (SAELens adds a ReLU, which changes nothing
    when the thresholds are positive).
    """
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    out = {}
    for layer in sorted(transcoders):
        tc = transcoders[layer]
        if (tc.threshold <= 0).any():
            raise ValueError(
                f"transcoders[{layer}] has thresholds <= 0: SAELens and circuit-tracer differ there."
            )
        W_skip = getattr(tc, "W_skip", None)
        ct = SingleLayerTranscoder(
            tc.cfg.d_in,
            tc.cfg.d_sae,
            JumpReLU(tc.threshold.detach().clone()),
            layer,
            skip_connection=W_skip is not None,
            device=tc.W_enc.device,
            dtype=tc.W_enc.dtype,
        )
        with torch.no_grad():
            ct.W_enc.copy_(tc.W_enc.T)
            ct.W_dec.copy_(tc.W_dec)
            ct.b_enc.copy_(tc.b_enc)
            ct.b_dec.copy_(tc.b_dec)
            if W_skip is not None:
                ct.W_skip.copy_(W_skip)
        out[layer] = ct
    # Read where our latents read (the ln2 output, which circuit-tracer's MLP wrapper names mlp.hook_in)
    # and write where ours write (after the post-MLP norm).
    return TranscoderSet(out, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")


def ct_replacement_model(
    model: HookedSAETransformer, transcoders: dict[int, Transcoder], start_posn: int = 1
):
    """circuit-tracer's TransformerLens `ReplacementModel` of this world, with the same weights.

    Args:
        start_posn: circuit-tracer zeroes latents and errors at positions before this (its
            `zero_positions`); it otherwise picks 1, or 4 for models named like Gemma 3 IT.
    """
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    cfg = copy.deepcopy(model.cfg)
    cfg.init_weights = False  # the weights come from `model` below
    ct_model = TransformerLensReplacementModel(cfg, tokenizer=model.tokenizer, move_to_device=False)
    # assign=True shares the tensors instead of copying them (a 1B model is not duplicated).
    ct_model.load_state_dict(model.state_dict(), strict=True, assign=True)
    torch.nn.Module.to(ct_model, model.cfg.device)  # (TransformerLens' own `.to` prints a line)
    ct_model._configure_replacement_model(ct_transcoder_set(transcoders))
    # circuit-tracer 0.5.0 shares one rotary table across all layers (`_deduplicate_attention_buffers`
    # keeps the last layer's), but Gemma 3's global layers rotate with base 1e6, its local ones with
    # 1e4: without this fix its model is not Gemma 3 (the logits move by ~0.6 in the toy world).
    for ours, theirs in zip(model.blocks, ct_model.blocks):
        if hasattr(ours.attn, "rotary_sin"):
            theirs.attn.rotary_sin, theirs.attn.rotary_cos = ours.attn.rotary_sin, ours.attn.rotary_cos
    ct_model.zero_positions = slice(0, start_posn)
    ct_model.eval()
    return ct_model


def ct_attribute(
    ct_model,
    tokens: Int[Tensor, "1 seq"],
    token_ids: list[int],
    batch_size: int = 512,
    max_feature_nodes: int | None = None,
):
    """circuit-tracer's `attribute` on these tokens, with these logit targets (every active latent kept,
    unless `max_feature_nodes` caps them)."""
    from circuit_tracer import attribute

    ids = torch.tensor(token_ids, dtype=torch.long, device=tokens.device)
    return attribute(
        tokens[0],
        ct_model,
        attribution_targets=ids,
        batch_size=batch_size,
        verbose=False,
        max_feature_nodes=max_feature_nodes,
    )


def our_node_key(node: NodeInfo) -> NodeKey:
    """An engine-independent name for one of our nodes."""
    if node.node_type == NodeType.EMBEDDING:
        return ("E", node.ctx_idx)
    if node.node_type == NodeType.LATENT:
        return ("latent", node.layer, node.ctx_idx, node.feature)
    if node.node_type == NodeType.MLP_ERROR:
        return ("error", node.layer, node.ctx_idx)
    return ("logit", node.feature)


def ct_node_keys(ct_graph) -> list[NodeKey]:
    """Names of circuit-tracer's nodes, in its adjacency order: latents, errors, embeddings, logits."""
    n_pos, n_layers = ct_graph.n_pos, ct_graph.cfg.n_layers
    feats = ct_graph.active_features[ct_graph.selected_features].tolist()
    keys: list[NodeKey] = [("latent", layer, pos, f) for layer, pos, f in feats]
    keys += [("error", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    keys += [("E", pos) for pos in range(n_pos)]
    keys += [("logit", t.vocab_idx) for t in ct_graph.logit_targets]
    return keys


def aligned_adjacency(
    result: AttributionResult,
    ct_graph,
    skip_masked_embeddings: bool = True,
) -> tuple[Float[Tensor, "n n"], Float[Tensor, "n n"], list[NodeKey]]:
    """Both adjacency matrices restricted to the nodes both graphs have, in our node order.

    Args:
        skip_masked_embeddings: leave out embeddings before our `start_posn`: we drop their edges
            by definition, circuit-tracer keeps them.

    Returns:
        (ours, theirs, keys), with `ours[i, j]` and `theirs[i, j]` the edge from keys[j] to keys[i].
    """
    start_posn = result.settings.get("start_posn", 0)
    theirs_index = {key: i for i, key in enumerate(ct_node_keys(ct_graph))}
    ours_idx, theirs_idx, keys = [], [], []
    for i, node in enumerate(result.graph.nodes):
        key = our_node_key(node)
        if key in theirs_index and not (skip_masked_embeddings and key[0] == "E" and key[1] < start_posn):
            ours_idx.append(i)
            theirs_idx.append(theirs_index[key])
            keys.append(key)
    o, t = torch.tensor(ours_idx), torch.tensor(theirs_idx)
    ours = result.adjacency_matrix.detach().cpu()[o][:, o]
    theirs = ct_graph.adjacency_matrix.detach().cpu()[t][:, t]
    return ours, theirs, keys


def to_ct_graph(result: AttributionResult, cfg):
    """Our graph in circuit-tracer's `Graph` layout (for its pruning and scoring functions).

    Error and latent nodes that we do not have (masked positions) get zero rows and columns.

    Args:
        cfg: the model's `HookedTransformerConfig`.
    """
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph

    graph = result.graph
    nodes = graph.nodes
    latents = sorted((our_node_key(n)[1:], i) for i, n in enumerate(nodes) if n.node_type == NodeType.LATENT)
    n_pos, n_layers = graph.seq_len, graph.n_layers
    logit_nodes = [i for i, n in enumerate(nodes) if n.node_type == NodeType.LOGIT]
    n_feat = len(latents)
    size = n_feat + (n_layers + 1) * n_pos + len(logit_nodes)
    position = {}  # our node index -> circuit-tracer's
    for j, (_, i) in enumerate(latents):
        position[i] = j
    for i, n in enumerate(nodes):
        if n.node_type == NodeType.MLP_ERROR:
            position[i] = n_feat + n.layer * n_pos + n.ctx_idx
        elif n.node_type == NodeType.EMBEDDING:
            position[i] = n_feat + n_layers * n_pos + n.ctx_idx
    for j, i in enumerate(logit_nodes):
        position[i] = size - len(logit_nodes) + j
    ours, theirs = torch.tensor(list(position.keys())), torch.tensor(list(position.values()))
    A = torch.zeros(size, size, dtype=torch.float32)
    A[theirs[:, None], theirs[None, :]] = result.adjacency_matrix.detach().cpu().float()[ours][:, ours]
    features = torch.tensor([key for key, _ in latents], dtype=torch.long).reshape(-1, 3)
    tokens = torch.tensor([n.feature for n in nodes if n.node_type == NodeType.EMBEDDING])
    return Graph(
        input_string=result.prompt,
        input_tokens=tokens,
        active_features=features,
        adjacency_matrix=A,
        cfg=cfg,
        selected_features=torch.arange(n_feat),
        activation_values=torch.tensor([nodes[i].activation for _, i in latents]),
        logit_targets=[LogitTarget(nodes[i].str_token, nodes[i].feature) for i in logit_nodes],
        logit_probabilities=result.logit_weights.detach().cpu().float(),
        scan="toy",
    )
