"""The local replacement model: frozen attention patterns and norm scales, MLPs linearised via W_skip.

Two hook sets turn a `HookedSAETransformer` into the linear model that attribution differentiates:

- `FreezeHooks` replaces every attention pattern and every RMSNorm scale (pre and post norms, QK
  norms, the final norm) by its value from one clean forward pass. Each norm becomes a fixed
  diagonal matrix, and attention a fixed mixing of value vectors across positions.
- `TranscoderReplacementHooks` keeps each MLP's forward output exactly, but routes its gradient
  through the transcoder's linear skip, `x @ W_skip.T`, using a stop-gradient.

Both follow TransformerLens' hook discipline: every hook they add is removed by them, and only by
them, so hooks that a learner added for another purpose survive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer, JumpReLUSkipTranscoder, JumpReLUTranscoder
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint

__all__ = [
    "Transcoder",
    "FreezeHooks",
    "TranscoderReplacementHooks",
    "skip_output",
    "hook_names_out",
    "CACHED_SITES",
]

Transcoder: TypeAlias = JumpReLUTranscoder | JumpReLUSkipTranscoder

# What `cache_frozen_values` keeps besides the frozen values: where nodes read and write.
CACHED_SITES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "mlp.hook_in",
    "hook_mlp_out",
    "unembed.hook_in",
)


def hook_names_out(tc: Transcoder) -> str:
    """The hook a transcoder writes to (`blocks.{l}.hook_mlp_out`)."""
    return tc.cfg.metadata.hook_name_out


def skip_output(tc: Transcoder, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
    """The transcoder's linear skip term. SAELens stores W_skip as (d_out, d_in): apply its transpose."""
    if getattr(tc, "W_skip", None) is None:
        return torch.zeros(*x.shape[:-1], tc.cfg.d_out, dtype=x.dtype, device=x.device)
    return x @ tc.W_skip.T.to(x.dtype)


def _add_hook(
    model: HookedSAETransformer, name: str, fn: Callable, *, dir: str = "fwd", is_permanent: bool = False
) -> tuple[HookPoint, object]:
    """Add one TransformerLens hook and return what is needed to remove exactly that hook."""
    hp = model.mod_dict[name]
    hp.add_hook(fn, dir=dir, is_permanent=is_permanent)
    handles = hp.fwd_hooks if dir == "fwd" else hp.bwd_hooks
    return hp, handles[-1]


def _remove_hook(hp: HookPoint, handle) -> None:
    handle.hook.remove()
    hp.fwd_hooks = [h for h in hp.fwd_hooks if h is not handle]
    hp.bwd_hooks = [h for h in hp.bwd_hooks if h is not handle]


class FreezeHooks:
    """Freezes attention patterns and RMSNorm scales at the values of one cached forward pass.

    Use as a context manager (`with freeze: model(tokens)`) or pass `freeze.fwd_hooks` to
    `model.hooks(...)` together with other hooks.
    """

    def __init__(self, model: HookedSAETransformer):
        self.model = model
        self.frozen_values: dict[str, Tensor] = {}
        self._ctx = None

    def _freeze_hook(self, value: Tensor, hook: HookPoint) -> Tensor:
        """Return the frozen value, tiled along dim 0 when the live batch is larger.

        Most frozen tensors have a leading batch dim of 1. QK-norm scales fold (batch, pos, head)
        into dim 0, so the frozen block is tiled `live // frozen` times: the same rule covers both.
        """
        frozen = self.frozen_values[hook.name]
        if frozen.shape[0] != value.shape[0]:
            if value.shape[0] % frozen.shape[0]:
                raise RuntimeError(
                    f"{hook.name}: live shape {tuple(value.shape)} is not a whole number of copies of the "
                    f"frozen shape {tuple(frozen.shape)}; run on the same tokens you cached."
                )
            frozen = frozen.repeat(value.shape[0] // frozen.shape[0], *([1] * (frozen.dim() - 1)))
        return frozen.to(value.dtype)

    @property
    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, hook fn) pairs, for `model.hooks(fwd_hooks=...)`."""
        if not self.frozen_values:
            raise RuntimeError("Nothing is frozen yet: call `cache_frozen_values(tokens)` first.")
        return [(name, self._freeze_hook) for name in self.frozen_values]

    @torch.no_grad()
    def cache_frozen_values(self, tokens: Int[Tensor, "1 seq"]) -> ActivationCache:
        """Run one clean forward pass; keep patterns and norm scales to freeze, plus node read/write sites."""

        def wanted(name: str) -> bool:
            return name.endswith(("hook_pattern", "hook_scale")) or name.endswith(CACHED_SITES)

        _, cache = self.model.run_with_cache(tokens, names_filter=wanted)
        self.frozen_values = {
            name: cache[name].detach()
            for name in cache.keys()
            if name.endswith(("hook_pattern", "hook_scale"))
        }
        return cache

    def __enter__(self) -> FreezeHooks:
        self._ctx = self.model.hooks(fwd_hooks=self.fwd_hooks)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(*exc)


class TranscoderReplacementHooks:
    """Keeps each MLP's forward output, but sends its gradient through the transcoder's linear skip.

    At `blocks.{l}.hook_mlp_out` the output becomes `skip + (mlp_out - skip).detach()` with
    `skip = x @ W_skip.T`, where `x` is the *live* `blocks.{l}.mlp.hook_in` of the same forward pass.
    The forward value is unchanged; the backward pass sees only `W_skip`.

    It also stores, per layer, the transcoder's activations, its decoder output (`decode(acts)`,
    which SAELens defines *without* the skip term) and the skip term itself, all from the cache.
    The hooks are permanent (they survive `model.reset_hooks()` calls made by others) and
    `remove()` takes away exactly the hooks `install()` added.
    """

    def __init__(
        self, model: HookedSAETransformer, transcoders: dict[int, Transcoder], cache: ActivationCache
    ):
        self.model = model
        self.transcoders = transcoders
        self.cache = cache
        self.transcoder_acts: dict[int, Tensor] = {}
        self.transcoder_output: dict[int, Tensor] = {}
        self.skip_output: dict[int, Tensor] = {}
        self.current_ln_inputs: dict[int, Tensor] = {}
        self._handles: list[tuple[HookPoint, object]] = []
        self._compute_activations()

    @torch.no_grad()
    def _compute_activations(self) -> None:
        for layer, tc in self.transcoders.items():
            x = self.cache[tc.cfg.metadata.hook_name].to(tc.dtype)
            acts = tc.encode(x)
            self.transcoder_acts[layer] = acts.detach()
            self.transcoder_output[layer] = tc.decode(acts).detach()
            self.skip_output[layer] = skip_output(tc, x).detach()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> TranscoderReplacementHooks:
        """Add the capture and skip hooks for every layer (a no-op if they are already in)."""
        if self.installed:
            return self
        for layer, tc in self.transcoders.items():
            self._handles.append(
                _add_hook(
                    self.model, tc.cfg.metadata.hook_name, self._make_capture_hook(layer), is_permanent=True
                )
            )
            self._handles.append(
                _add_hook(self.model, hook_names_out(tc), self._make_skip_hook(layer, tc), is_permanent=True)
            )
        return self

    def _make_capture_hook(self, layer: int) -> Callable:
        def capture(x: Tensor, hook: HookPoint) -> None:
            # The live tensor, not the cached one: the cache's graph is gone after the first backward.
            self.current_ln_inputs[layer] = x

        return capture

    def _make_skip_hook(self, layer: int, tc: Transcoder) -> Callable:
        def skip_trick(mlp_out: Tensor, hook: HookPoint) -> Tensor:
            skip = skip_output(tc, self.current_ln_inputs[layer]).to(mlp_out.dtype)
            return skip + (mlp_out - skip).detach()

        return skip_trick

    def remove(self) -> None:
        """Remove exactly the hooks `install()` added."""
        while self._handles:
            _remove_hook(*self._handles.pop())
        self.current_ln_inputs.clear()

    def __enter__(self) -> TranscoderReplacementHooks:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
