"""The worlds the tests run on: the toy Gemma 3 world (or the learner's model) with one prompt and
everything the reference pipeline computes on it, built once and cached."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import attribution as _attribution
from ..attribution import (
    Batch,
    compute_adjacency_matrix,
    logit_weights_of,
    prepare_backward_batches,
    validate_transcoders,
)
from ..nodes import GraphNodes, build_graph_nodes, compute_salient_logits
from ..replacement import FreezeHooks, TranscoderReplacementHooks
from ..worlds.gemma import START_POSN, format_prompt
from .messages import _Fail

# Short prompts keep every test to a fraction of a second on the toy world (14 tokens, ~260 nodes).
TOY_PROMPT = ("opposite of small?", "large")
REAL_PROMPT = ("What is the opposite of small?", "The opposite of small is")
SECOND_PROMPT = ("Tell me a fact.", "yes")


# --------------------------------------------------------------------------------------------------
# The worlds the tests run on
# --------------------------------------------------------------------------------------------------


@dataclass
class _World:
    """A model, its transcoders, one prompt and everything the reference pipeline computes on it."""

    model: Any
    transcoders: dict
    toy: bool
    tokens: Int[Tensor, "1 seq"]
    start_posn: int
    top_k: int
    batch_size: int
    freeze: FreezeHooks
    cache: Any
    logits: Float[Tensor, "1 seq d_vocab"]
    graph: GraphNodes
    batches: list[Batch]
    adjacency: Float[Tensor, "n n"]
    logit_weights: Float[Tensor, " n_logits"]
    tol: float
    small: bool  # tiny matrices: one thread is faster (the toy world, or a test double of similar size)
    extra: dict = field(default_factory=dict)  # lazily computed extras (second cases, reference gradients)

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def name(self) -> str:
        return "the toy graph" if self.toy else "your model's graph"

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def tc_hooks(self, transcoders: dict | None = None) -> TranscoderReplacementHooks:
        """A fresh, uninstalled reference hook object (cheap: one encode per layer)."""
        return TranscoderReplacementHooks(
            self.model, self.transcoders if transcoders is None else transcoders, self.cache
        )


_TOY: _World | None = None
_REAL: _World | None = None  # only the latest real model is kept, so an old one can be freed


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for comparing two correct computations done in a different order."""
    return {torch.float64: 1e-8, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}.get(
        dtype, 2e-4
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence the reference pipeline's tqdm bar, so a passing test prints exactly one line."""
    saved = _attribution.tqdm
    _attribution.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        _attribution.tqdm = saved


class _NoSkipHooks:
    """Stands in for TranscoderReplacementHooks when we want gradients through the real MLPs."""

    installed = True

    def install(self) -> _NoSkipHooks:
        return self

    def remove(self) -> None:
        pass


def _reference_adjacency(
    w: _World, graph: GraphNodes, batches: list, start_posn: int, tc_hooks: Any = None
) -> Tensor:
    hooks = w.tc_hooks() if tc_hooks is None else tc_hooks
    with _no_progress_bars():
        return compute_adjacency_matrix(w.model, w.tokens, graph, w.freeze, hooks, batches, start_posn)


def _build_world(model: Any, transcoders: dict, toy: bool) -> _World:
    prompt = format_prompt(*(TOY_PROMPT if toy else REAL_PROMPT))
    tokens = model.to_tokens(prompt)
    # A real model is big: fewer latents per position, and few small batches of targets (see _subset).
    top_k, batch_size = (5, 64) if toy else (3, 4)
    freeze = FreezeHooks(model)
    cache = freeze.cache_frozen_values(tokens)
    tc_hooks = TranscoderReplacementHooks(model, transcoders, cache)
    with torch.no_grad():
        logits = model(tokens)
    reading, info = compute_salient_logits(model, logits, 3)
    graph = build_graph_nodes(model, transcoders, cache, tc_hooks, reading, info, tokens, START_POSN, top_k)
    world = _World(
        model=model,
        transcoders=transcoders,
        toy=toy,
        tokens=tokens,
        start_posn=START_POSN,
        top_k=top_k,
        batch_size=batch_size,
        freeze=freeze,
        cache=cache,
        logits=logits.detach(),
        graph=graph,
        batches=[],
        adjacency=torch.empty(0),
        logit_weights=torch.empty(0),
        tol=_tolerance(model.cfg.dtype),
        small=sum(p.numel() for p in model.parameters()) < 20_000_000,
    )
    world.batches = batches = _subset(world, prepare_backward_batches(graph, batch_size))
    world.adjacency = _reference_adjacency(world, graph, batches, START_POSN, tc_hooks)
    world.logit_weights = logit_weights_of(graph, world.adjacency.dtype, world.adjacency.device)
    return world


def _subset(w: _World, batches: list[Batch]) -> list[Batch]:
    """All batches on the toy world; on a real model, the first batch of the first, middle and last layer
    and of the logits: enough to compare edges of every kind, and cheap even on a CPU."""
    if w.toy:
        return batches
    n = w.n_layers
    firsts = {}
    for b in batches:
        firsts.setdefault(b.layers[0], b)
    return [firsts[key] for key in (0, n // 2, n - 1, "L") if key in firsts]


def _forget_world(w: _World) -> None:
    """Drop a cached world whose tensors learner code changed: the next test rebuilds it."""
    global _TOY, _REAL
    if _TOY is w:
        _TOY = None
    if _REAL is w:
        _REAL = None


def _get_world(model: Any, transcoders: Any) -> _World:
    global _TOY, _REAL
    if (model is None) != (transcoders is None):
        raise _Fail("Pass both `model=` and `transcoders=` (or neither, to test on the toy world).")
    if model is None:
        if _TOY is None:
            from ..worlds.toy import make_toy_world

            with _one_thread(True):
                toy_model, toy_tcs = make_toy_world()
                _TOY = _build_world(toy_model, toy_tcs, toy=True)
        return _TOY
    if _REAL is None or _REAL.model is not model or _REAL.transcoders is not transcoders:
        if not hasattr(model, "hook_dict") or not hasattr(model, "cfg"):
            raise _Fail(f"`model` should be the HookedSAETransformer you loaded, got {type(model).__name__}.")
        if not isinstance(transcoders, dict):
            raise _Fail(
                f"`transcoders` should be the dict {{layer: transcoder}} you loaded, got "
                f"{type(transcoders).__name__}."
            )
        try:
            validate_transcoders(model, transcoders)
        except ValueError as e:
            raise _Fail(f"These transcoders don't fit this model: {e}") from None
        _REAL = None
        small = sum(p.numel() for p in model.parameters()) < 20_000_000
        with _one_thread(small):
            _REAL = _build_world(model, transcoders, toy=False)
    return _REAL


@contextlib.contextmanager
def _one_thread(active: bool) -> Iterator[None]:
    """The toy world's matrices are tiny: one thread avoids costly thread hand-offs on a busy CPU."""
    if not active:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
