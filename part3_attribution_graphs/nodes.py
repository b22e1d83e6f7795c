"""Graph nodes and their reading / writing vectors.

| node           | writes (at)                                   | reads (at)                           |
|----------------|-----------------------------------------------|--------------------------------------|
| embedding      | its embedding row (`blocks.0.hook_resid_pre`) | -                                    |
| latent (l, f)  | `a_f * W_dec[f]` (`blocks.l.hook_mlp_out`)    | `W_enc[:, f]` (`blocks.l.mlp.hook_in`) |
| MLP error (l)  | what the kept latents, `b_dec` and the skip   | -                                    |
|                | miss of the MLP output (`blocks.l.hook_mlp_out`) |                                   |
| logit (v)      | -                                             | `W_U[:, v] - mean(W_U)` (ln_final output) |

Node order: embeddings, then for each layer (positions ascending, latents by activation, then the
error node), then logits. Every edge goes from an earlier node to a later one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor
from transformer_lens import ActivationCache

from .replacement import Transcoder, TranscoderReplacementHooks, hook_names_out

__all__ = [
    "Layer",
    "NodeType",
    "NodeInfo",
    "GraphNodes",
    "SalientToken",
    "compute_salient_logits",
    "build_embedding_nodes",
    "build_intermediate_nodes",
    "build_logit_nodes",
    "build_graph_nodes",
]


# A node's layer: "E" for embeddings, the layer index for latents and errors, "L" for logits.
Layer = int | Literal["E", "L"]


class NodeType(Enum):
    EMBEDDING = "embedding"
    LATENT = "latent"
    MLP_ERROR = "mlp_error"
    LOGIT = "logit"


@dataclass
class NodeInfo:
    """One node of the attribution graph."""

    node_type: NodeType
    layer: Layer  # "E" for embeddings, the layer index for latents and errors, "L" for logits
    ctx_idx: int  # token position
    feature: int  # token id (embeddings, logits) or latent index (latents); 0 for error nodes
    activation: float = 0.0  # latents: activation value
    token_prob: float = 0.0  # logits: predicted probability
    str_token: str = ""  # embeddings and logits: the token as text
    label: str = ""

    @property
    def node_id(self) -> str:
        """Unique within a graph: `{layer}_{feature}_{pos}`, and `{layer}_err_{pos}` for error nodes.

        (Error nodes have feature 0, so the plain pattern would clash with latent 0 at the same spot.)
        """
        if self.node_type == NodeType.MLP_ERROR:
            return f"{self.layer}_err_{self.ctx_idx}"
        return f"{self.layer}_{self.feature}_{self.ctx_idx}"


@dataclass
class GraphNodes:
    """All nodes, with their reading and writing vectors stacked in node order."""

    nodes: list[NodeInfo] = field(default_factory=list)
    writing_vecs: Tensor | None = None  # (n_nodes, d_model)
    reading_vecs: Tensor | None = None  # (n_nodes, d_model)
    node_range_dict: dict[Layer, tuple[int, int]] = field(
        default_factory=dict
    )  # layer -> (start, end) in nodes
    seq_len: int = 0
    n_layers: int = 0

    def __len__(self) -> int:
        return len(self.nodes)


class SalientToken(NamedTuple):
    """One output token the graph explains: its text, its probability, and its vocabulary index.

    The logit nodes take their `feature` from `token_id`, and the exports identify a logit by it, so
    a plain `(str_token, prob)` pair is not enough.
    """

    str_token: str
    prob: float
    token_id: int


def compute_salient_logits(
    model: HookedSAETransformer,
    logits: Float[Tensor, "batch seq d_vocab"],
    n_output_nodes: int = 3,
) -> tuple[Float[Tensor, "n_output d_model"], list[SalientToken]]:
    """Pick the `n_output_nodes` most probable next tokens and return their demeaned unembeddings.

    Returns:
        reading_vecs: `W_U[:, v] - W_U.mean(-1)` for each chosen token v, shape (n_output, d_model).
        top_token_info: `SalientToken(str_token, prob, token_id)` per chosen token, most probable first
            (`prob` a Python float, `token_id` a Python int).
    """
    d_vocab = logits.shape[-1]
    if not isinstance(n_output_nodes, int) or not 1 <= n_output_nodes <= d_vocab:
        raise ValueError(
            f"n_output_nodes must be an integer in [1, {d_vocab}] (the vocabulary size), "
            f"got {n_output_nodes!r}."
        )
    probs = logits[0, -1].detach().float().softmax(dim=-1)
    top_probs, top_ids = probs.topk(n_output_nodes)
    W_U = model.W_U.detach()
    reading_vecs = (W_U[:, top_ids] - W_U.mean(dim=-1, keepdim=True)).T
    info = [
        SalientToken(model.tokenizer.decode([i]), p, i) for p, i in zip(top_probs.tolist(), top_ids.tolist())
    ]
    return reading_vecs, info


def build_embedding_nodes(
    model: HookedSAETransformer,
    cache: ActivationCache,
    tokens: Int[Tensor, "1 seq"],
) -> tuple[list[NodeInfo], list[Tensor], list[Tensor]]:
    """One embedding node per position, writing its (scaled) embedding at `blocks.0.hook_resid_pre`.

    Returns:
        (nodes, writing_vecs, reading_vecs), each of length seq; reading vectors are zero.
    """
    embeds = cache["blocks.0.hook_resid_pre"][0].detach()
    ids = tokens[0].tolist()
    nodes = [
        NodeInfo(NodeType.EMBEDDING, "E", pos, tok, str_token=model.tokenizer.decode([tok]))
        for pos, tok in enumerate(ids)
    ]
    zeros = torch.zeros_like(embeds)
    return nodes, list(embeds.unbind(0)), list(zeros.unbind(0))


def build_intermediate_nodes(
    transcoders: dict[int, Transcoder],
    cache: ActivationCache,
    tc_hooks: TranscoderReplacementHooks,
    tokens: Int[Tensor, "1 seq"],
    d_model: int,
    start_posn: int = 4,
    top_k: int = 5,
) -> tuple[list[NodeInfo], list[Tensor], list[Tensor], dict]:
    """Latent and MLP-error nodes for every layer, at positions `start_posn` onwards.

    At each (layer, position) the `top_k` most active latents become nodes (fewer if fewer fire),
    followed by one error node. The error node writes everything in the MLP output that the graph
    does not otherwise account for: `mlp_out - (kept latents' a * W_dec + b_dec + x @ W_skip.T)`.
    So latents outside the top-k are folded into it rather than silently lost, and the skip term,
    which the linear path already carries, is not counted twice.

    Returns:
        (nodes, writing_vecs, reading_vecs, node_range_dict), the dict mapping each layer to its
        (start, end) slice of the returned lists.
    """
    seq_len = tokens.shape[1]
    positions = torch.arange(start_posn, seq_len)
    nodes: list[NodeInfo] = []
    writing: list[Tensor] = []
    reading: list[Tensor] = []
    node_range_dict: dict[int, tuple[int, int]] = {}

    for layer in sorted(transcoders):
        tc = transcoders[layer]
        start = len(nodes)
        acts = tc_hooks.transcoder_acts[layer][0, start_posn:]  # (n_pos, d_sae)
        mlp_out = cache[hook_names_out(tc)][0, start_posn:].detach()
        W_dec, W_enc = tc.W_dec.detach(), tc.W_enc.detach()

        k = min(top_k, acts.shape[-1])
        top_vals, top_idx = acts.topk(k, dim=-1)  # (n_pos, k), sorted by activation
        kept = top_vals > 0
        # Writing vectors of every kept latent, and their sum per position, in one go.
        latent_writes = top_vals.unsqueeze(-1) * W_dec[top_idx]  # (n_pos, k, d_model)
        kept_sum = (latent_writes * kept.unsqueeze(-1)).sum(1)
        errors = mlp_out - kept_sum - tc.b_dec.detach() - tc_hooks.skip_output[layer][0, start_posn:]
        errors = errors.to(mlp_out.dtype)

        for i, pos in enumerate(positions.tolist()):
            n_kept = int(kept[i].sum())
            for j in range(n_kept):
                f = int(top_idx[i, j])
                nodes.append(NodeInfo(NodeType.LATENT, layer, pos, f, activation=float(top_vals[i, j])))
                writing.append(latent_writes[i, j].to(mlp_out.dtype))
                reading.append(W_enc[:, f].to(mlp_out.dtype))
            nodes.append(NodeInfo(NodeType.MLP_ERROR, layer, pos, 0))
            writing.append(errors[i])
            reading.append(torch.zeros(d_model, dtype=mlp_out.dtype, device=mlp_out.device))
        node_range_dict[layer] = (start, len(nodes))

    return nodes, writing, reading, node_range_dict


def build_logit_nodes(
    reading_vecs_logit: Float[Tensor, "n_output d_model"],
    top_token_info: list[SalientToken],
    seq_len: int,
    d_model: int,
) -> tuple[list[NodeInfo], list[Tensor], list[Tensor]]:
    """One logit node per salient token, at the last position, reading its demeaned unembedding.

    `feature` holds the token id, taken from each `SalientToken` (any `(str_token, prob, token_id)`
    triple works).
    """
    nodes = []
    for info in top_token_info:
        if len(info) != 3:
            # A (str, prob) pair has no token id, and guessing one would mislabel the exported logits.
            raise ValueError(
                f"top_token_info entries must be SalientToken(str_token, prob, token_id), got "
                f"{info!r}: the logit nodes need the token id."
            )
        str_token, prob, token_id = info
        nodes.append(
            NodeInfo(
                NodeType.LOGIT, "L", seq_len - 1, int(token_id), token_prob=float(prob), str_token=str_token
            )
        )
    reading = list(reading_vecs_logit.detach().unbind(0))
    writing = [
        torch.zeros(d_model, dtype=reading_vecs_logit.dtype, device=reading_vecs_logit.device) for _ in nodes
    ]
    return nodes, writing, reading


def build_graph_nodes(
    model: HookedSAETransformer,
    transcoders: dict[int, Transcoder],
    cache: ActivationCache,
    tc_hooks: TranscoderReplacementHooks,
    reading_vecs_logit: Float[Tensor, "n_output d_model"],
    top_token_info: list[SalientToken],
    tokens: Int[Tensor, "1 seq"],
    start_posn: int = 4,
    top_k: int = 5,
) -> GraphNodes:
    """Embedding, intermediate and logit nodes, stacked into one `GraphNodes` in node order."""
    seq_len, d_model = tokens.shape[1], model.cfg.d_model
    e_nodes, e_write, e_read = build_embedding_nodes(model, cache, tokens)
    i_nodes, i_write, i_read, i_ranges = build_intermediate_nodes(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k
    )
    l_nodes, l_write, l_read = build_logit_nodes(reading_vecs_logit, top_token_info, seq_len, d_model)

    n_e, n_i = len(e_nodes), len(i_nodes)
    ranges: dict = {"E": (0, n_e)}
    ranges.update({layer: (s + n_e, e + n_e) for layer, (s, e) in i_ranges.items()})
    ranges["L"] = (n_e + n_i, n_e + n_i + len(l_nodes))
    dtype = e_write[0].dtype
    return GraphNodes(
        nodes=e_nodes + i_nodes + l_nodes,
        writing_vecs=torch.stack([v.to(dtype) for v in e_write + i_write + l_write]),
        reading_vecs=torch.stack([v.to(dtype) for v in e_read + i_read + l_read]),
        node_range_dict=ranges,
        seq_len=seq_len,
        n_layers=len(transcoders),
    )
