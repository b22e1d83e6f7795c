"""build_embedding_nodes: one embedding node per position, writing its embedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..worlds.gemma import format_prompt
from .compare import _close, _diagnose, _items, _list, _node_attr, _node_number, _ntype, _stack, _worst
from .messages import _Fail
from .running import _public_test, _run
from .worlds import SECOND_PROMPT, _World


def _resid_after_block0(model: Any, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    return cache["blocks.0.hook_resid_post"][0]


def _normalised_in_block0(model: Any, tokens: Tensor) -> Tensor:
    name = "blocks.0.ln1.hook_normalized"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=name)
    return cache[name][0]


def _embedding_case(fn: Callable, w: _World, cache: Any, tokens: Tensor, label: str) -> None:
    model, d_model, seq = w.model, w.model.cfg.d_model, tokens.shape[1]
    out = _run(fn, model, cache, tokens, what="build_embedding_nodes")
    nodes, writing, reading = _items(out, 3, "build_embedding_nodes")
    nodes = _list(nodes, f"nodes{label}")
    if len(nodes) != seq:
        raise _Fail(
            f"You returned {len(nodes)} embedding nodes{label} for {seq} tokens: one embedding node per "
            "position, <bos> included."
        )
    writing = _list(writing, f"writing_vecs{label}", seq)
    reading = _list(reading, f"reading_vecs{label}", seq)
    ids = tokens[0].tolist()
    for pos, node in enumerate(nodes):
        what = f"Embedding node {pos}{label}"
        if _ntype(node) != "embedding":
            raise _Fail(
                f"{what} has node_type {_node_attr(node, 'node_type', what)}, expected NodeType.EMBEDDING."
            )
        if _node_attr(node, "layer", what) != "E":
            raise _Fail(f'{what} has layer {node.layer!r}; embedding nodes have layer "E".')
        if _node_number(node, "ctx_idx", what, int) != pos:
            raise _Fail(f"{what} has ctx_idx {node.ctx_idx!r}, expected its position {pos}.")
        feature = _node_number(node, "feature", what, int)
        if feature != ids[pos]:
            extra = " (that is the position: `feature` holds the token id)" if feature == pos else ""
            raise _Fail(f"{what} has feature {feature!r}, expected the token id {ids[pos]}{extra}.")
        if _node_attr(node, "str_token", what) != model.tokenizer.decode([ids[pos]]):
            raise _Fail(
                f"{what} has str_token {node.str_token!r}, expected "
                f"{model.tokenizer.decode([ids[pos]])!r} (model.tokenizer.decode([token_id]))."
            )
    W = _stack(writing, f"writing_vecs{label}", d_model, w.device)
    R = _stack(reading, f"reading_vecs{label}", d_model, w.device)
    exp = cache["blocks.0.hook_resid_pre"][0].detach()
    if not _close(W, exp, w.tol):
        hint = _diagnose(
            W,
            [
                (
                    "you indexed W_E by position; index it by token id (W_E[tokens[0]]), or simply use "
                    "cache['blocks.0.hook_resid_pre'][0]",
                    lambda: model.W_E.detach()[: len(ids)],
                ),
                (
                    "you scaled the embeddings by sqrt(d_model), but TransformerLens already folds Gemma's "
                    "scale into W_E, so they are scaled twice: use cache['blocks.0.hook_resid_pre'][0] as "
                    "it is",
                    lambda: exp * d_model**0.5,
                ),
                (
                    "your writing vectors are the residual stream after block 0; an embedding node writes "
                    "what enters block 0: cache['blocks.0.hook_resid_pre'][0]",
                    lambda: _resid_after_block0(model, tokens),
                ),
                (
                    "you divided the embeddings by sqrt(d_model); TransformerLens already folds Gemma's "
                    "scale into W_E: use cache['blocks.0.hook_resid_pre'][0] as it is",
                    lambda: exp / d_model**0.5,
                ),
                (
                    "your writing vectors are the normalised input of block 0's first layer norm "
                    "(ln1.hook_normalized); an embedding node writes the raw embedding: "
                    "cache['blocks.0.hook_resid_pre'][0]",
                    lambda: _normalised_in_block0(model, tokens),
                ),
                (
                    "your writing vectors are unembedding columns (W_U[:, token]); an embedding node writes "
                    "its embedding, W_E[token] = cache['blocks.0.hook_resid_pre'][0, pos]",
                    lambda: model.W_U.detach()[:, ids].T,
                ),
                (
                    "your writing vectors are shifted by one position (off by one?): node pos writes "
                    "cache['blocks.0.hook_resid_pre'][0, pos], the embedding of its own token",
                    lambda: torch.roll(exp, -1, 0),
                ),
                (
                    "your writing vectors are shifted by one position (off by one?): node pos writes "
                    "cache['blocks.0.hook_resid_pre'][0, pos], the embedding of its own token",
                    lambda: torch.roll(exp, 1, 0),
                ),
                (
                    "your writing vectors are zeros: each embedding node writes its embedding, "
                    "cache['blocks.0.hook_resid_pre'][0, pos]",
                    lambda: torch.zeros_like(exp),
                ),
            ],
            w.tol,
        )
        raise _Fail(
            hint
            or f"writing_vecs{label} should be cache['blocks.0.hook_resid_pre'][0], "
            f"{_worst(W, exp, 'writing')}."
        )
    if R.abs().max() > 0:
        hint = " (they equal the writing vectors)" if _close(R, exp, w.tol) else ""
        raise _Fail(
            "Embedding nodes read nothing (they are inputs only): their reading vectors should be "
            f"zeros{hint}."
        )


@_public_test("build_embedding_nodes")
def test_build_embedding_nodes(fn: Callable, w: _World) -> None:
    """One EMBEDDING node per position, writing its scaled embedding, reading nothing."""
    _embedding_case(fn, w, w.cache, w.tokens, "")
    tokens = w.model.to_tokens(format_prompt(*SECOND_PROMPT))
    with torch.no_grad():
        _, cache = w.model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    _embedding_case(fn, w, cache, tokens, " (a second prompt)")
