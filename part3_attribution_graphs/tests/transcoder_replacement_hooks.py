"""TranscoderReplacementHooks: forward values unchanged, gradients through the skip path only."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ..attribution import setup_attribution
from ..replacement import skip_output
from .compare import _close, _diagnose, _tensor, _worst
from .hygiene import _hook_state, _new_hooks, _new_lens_handles, _remove_new_hooks
from .messages import _Fail
from .running import _public_test, _run
from .worlds import _World


class _VariantHooks:
    """Known-wrong versions of the skip trick, used only to name the mistake a learner's hooks make."""

    def __init__(self, model: Any, transcoders: dict, mode: str):
        self.model, self.transcoders, self.mode = model, transcoders, mode
        self.inputs: dict[int, Tensor] = {}
        self.state: tuple | None = None

    def install(self) -> None:
        self.state = _hook_state(self.model)
        if self.mode == "full_mlp":
            return
        for layer, tc in self.transcoders.items():
            read = f"blocks.{layer}.hook_resid_mid" if self.mode == "resid_mid" else tc.cfg.metadata.hook_name
            self.model.mod_dict[read].add_hook(
                functools.partial(self._capture, layer=layer), is_permanent=True
            )
            self.model.mod_dict[tc.cfg.metadata.hook_name_out].add_hook(
                functools.partial(self._skip, layer=layer, tc=tc), is_permanent=True
            )

    def _capture(self, x: Tensor, hook: Any, layer: int) -> None:
        self.inputs[layer] = x

    def _skip(self, mlp_out: Tensor, hook: Any, layer: int, tc: Any) -> Tensor:
        x = self.inputs[layer]
        if self.mode == "transposed":
            skip = x @ tc.W_skip.to(x.dtype)
        elif self.mode == "detached":
            skip = skip_output(tc, x.detach())
        else:
            skip = skip_output(tc, x)
        if self.mode == "both_paths":
            return mlp_out + (skip - skip.detach())
        if self.mode == "detach_swapped":
            return skip.detach() + (mlp_out - skip)
        return skip + (mlp_out - skip).detach()

    def remove(self) -> None:
        if self.state is not None:
            _remove_new_hooks(self.model, self.state)


_TC_HOOK_MISTAKES = (
    (
        "full_mlp",
        "the gradient flows through the real MLP, not the skip: return skip + (mlp_out - skip).detach() "
        "at hook_mlp_out; without the .detach() (or without the hook) backward sees the whole MLP",
    ),
    (
        "transposed",
        "your skip term is x @ W_skip, but SAELens stores W_skip as (d_out, d_in): use x @ W_skip.T",
    ),
    (
        "detached",
        "no gradient flows through your skip term: compute it from the LIVE MLP input captured by a "
        "hook at mlp.hook_in during this forward pass, not from the cached activations (the cache is "
        "not part of this pass's graph)",
    ),
    (
        "both_paths",
        "the gradient flows through the real MLP AND the skip: mlp_out + skip - skip.detach() keeps the "
        "MLP's own gradient; detach the MLP's part instead: skip + (mlp_out - skip).detach()",
    ),
    (
        "detach_swapped",
        "you detached the wrong term: skip.detach() + (mlp_out - skip) sends the gradient through the "
        "MLP minus the skip; detach the difference instead: skip + (mlp_out - skip).detach()",
    ),
    (
        "resid_mid",
        "your skip term reads hook_resid_mid; the transcoder's input is blocks.{l}.mlp.hook_in "
        "(after ln2), i.e. tc.cfg.metadata.hook_name",
    ),
)


def _gradient_targets(w: _World) -> tuple[Tensor, Tensor, list]:
    """Three targets: a logit, a latent in the last layer and one in a middle layer."""
    g = w.graph
    picks = [
        g.node_range_dict["L"][0],
        g.node_range_dict[w.n_layers - 1][0],
        g.node_range_dict[w.n_layers // 2][0],
    ]
    reading = g.reading_vecs[picks]
    positions = torch.tensor([g.nodes[i].ctx_idx for i in picks], device=w.device)
    return reading, positions, [g.nodes[i].layer for i in picks]


def _grads_with(w: _World, hooks: Any, what: str) -> dict[str, Tensor]:
    """Gradients of the three targets at every write point, with `hooks` installed."""
    reading, positions, layers = _gradient_targets(w)
    return _run(
        setup_attribution,
        w.model,
        w.tokens,
        w.freeze,
        reading,
        positions,
        layers,
        what=what,
        hints=[
            (
                RuntimeError,
                "second time",
                "your hooks reuse a tensor from an earlier forward pass (probably the cached MLP input): "
                "capture the live blocks.{l}.mlp.hook_in tensor in a hook and use that",
            )
        ],
    )


def _reference_grads(w: _World) -> dict[str, Tensor]:
    if "grads" not in w.extra:
        ref = w.tc_hooks().install()
        try:
            w.extra["grads"] = _grads_with(w, ref, "the reference")
        finally:
            ref.remove()
    return w.extra["grads"]


def _grads_match(got: dict[str, Tensor], want: dict[str, Tensor], tol: float) -> str | None:
    """None if every gradient matches, else a short description of the first that does not."""
    for name, g in want.items():
        if name not in got:
            return f"no gradient at {name}"
        if not _close(got[name], g, tol):
            return f"the gradient at {name} differs, {_worst(got[name], g, 'grad')}"
    return None


def _check_tc_dicts(obj: Any, w: _World) -> None:
    ref = w.tc_hooks()
    layers = sorted(w.transcoders)
    for attr in ("transcoder_acts", "transcoder_output"):
        d = getattr(obj, attr, None)
        if not isinstance(d, dict) or sorted(d) != layers:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise _Fail(
                f"After install(), `{attr}` should be a dict with one entry per layer {layers}, got {got}. "
                "Fill it in __init__ or install() from the cached MLP input "
                "(cache[tc.cfg.metadata.hook_name])."
            )
    for layer in layers:
        tc = w.transcoders[layer]
        exp_acts, exp_out = ref.transcoder_acts[layer], ref.transcoder_output[layer]
        acts = _tensor(obj.transcoder_acts[layer], f"transcoder_acts[{layer}]", device=w.device)
        if tuple(acts.shape) != tuple(exp_acts.shape):
            raise _Fail(
                f"transcoder_acts[{layer}] has shape {tuple(acts.shape)}, expected {tuple(exp_acts.shape)} "
                "(batch, seq, d_sae): encode the whole cached input cache[tc.cfg.metadata.hook_name]."
            )
        if not _close(acts, exp_acts, w.tol):
            hint = _diagnose(
                acts,
                [
                    (
                        "you encoded the MLP's output (hook_mlp_out); a transcoder reads the MLP's input: "
                        "encode cache[tc.cfg.metadata.hook_name] (mlp.hook_in)",
                        lambda tc=tc: tc.encode(w.cache[tc.cfg.metadata.hook_name_out]),
                    ),
                    (
                        "you encoded the residual stream before ln2 (hook_resid_mid); a transcoder reads the "
                        "MLP's input after the norm: encode cache[tc.cfg.metadata.hook_name] (mlp.hook_in)",
                        lambda layer=layer, tc=tc: tc.encode(w.cache[f"blocks.{layer}.hook_resid_mid"]),
                    ),
                ],
                w.tol,
            )
            raise _Fail(
                f"transcoder_acts[{layer}]: {hint}."
                if hint
                else f"transcoder_acts[{layer}] differs from tc.encode(cache[tc.cfg.metadata.hook_name]), "
                f"{_worst(acts, exp_acts, 'acts')}."
            )
        out = _tensor(
            obj.transcoder_output[layer],
            f"transcoder_output[{layer}]",
            shape=tuple(exp_out.shape),
            device=w.device,
        )
        if not _close(out, exp_out, w.tol):
            hint = _diagnose(
                out,
                [
                    (
                        "transcoder_output includes the skip term: it should be tc.decode(acts) only "
                        "(SAELens' decode leaves the skip out; tc(x) adds it)",
                        lambda e=exp_out, s=ref.skip_output[layer]: e + s,
                    ),
                    (
                        "transcoder_output leaves out the decoder bias: acts @ W_dec is not the whole "
                        "decoder; use tc.decode(acts), which adds b_dec",
                        lambda e=exp_out, tc=tc: e - tc.b_dec.detach(),
                    ),
                ],
                w.tol,
            )
            raise _Fail(
                hint
                or f"transcoder_output[{layer}] should be tc.decode(transcoder_acts[{layer}]), "
                f"{_worst(out, exp_out, 'out')}."
            )
        skip = getattr(obj, "skip_output", None)
        if isinstance(skip, dict) and layer in skip:
            got = _tensor(skip[layer], f"skip_output[{layer}]", device=w.device)
            if not _close(got, ref.skip_output[layer], w.tol):
                x = w.cache[tc.cfg.metadata.hook_name]
                hint = _diagnose(
                    got,
                    [
                        (
                            "skip_output uses x @ W_skip; SAELens stores W_skip as (d_out, d_in): "
                            "use x @ W_skip.T",
                            lambda x=x, tc=tc: x @ tc.W_skip,
                        )
                    ],
                    w.tol,
                )
                raise _Fail(
                    hint
                    or f"skip_output[{layer}] should be x @ W_skip.T, {_worst(got, ref.skip_output[layer])}."
                )


@_public_test("transcoder_replacement_hooks")
def test_transcoder_replacement_hooks(cls: type, w: _World) -> None:
    """Forward values unchanged, gradients through W_skip only (twice in a row), and remove() cleans up."""
    model = w.model
    want = _reference_grads(w)  # before the learner's hooks go in
    state = _hook_state(model)
    try:
        obj = _run(
            cls,
            model,
            w.transcoders,
            w.cache,
            what="TranscoderReplacementHooks(model, transcoders, cache)",
            hooks_allowed=True,
        )
        for method in ("install", "remove"):
            if not callable(getattr(obj, method, None)):
                raise _Fail(f"Your class has no `{method}()` method.")
        _run(obj.install, what="install()", hooks_allowed=True)
        if _new_hooks(model, state) == 0:
            raise _Fail(
                "install() added no hooks to the model: for every layer, add a hook at "
                "tc.cfg.metadata.hook_name (mlp.hook_in) that captures the live input and one at "
                "tc.cfg.metadata.hook_name_out (hook_mlp_out) that applies the skip trick."
            )
        temporary = [h for h in _new_lens_handles(model, state) if not h.is_permanent]
        if temporary:
            raise _Fail(
                f"{len(temporary)} of the hooks install() added are not permanent: add them with "
                "is_permanent=True, so that model.reset_hooks(), which clears temporary hooks, cannot "
                "silently drop them."
            )
        _check_tc_dicts(obj, w)

        with torch.no_grad(), model.hooks(fwd_hooks=w.freeze.fwd_hooks):
            logits = _run(model, w.tokens, what="The forward pass with your hooks installed")
        if not _close(logits, w.logits, w.tol):
            raise _Fail(
                "With your hooks installed the forward pass gives different logits "
                f"({_worst(logits, w.logits, 'logits')}). The skip hook must return "
                "skip + (mlp_out - skip).detach(), which equals mlp_out in the forward pass."
            )

        for attempt in ("first", "second"):
            got = _grads_with(w, obj, f"The {attempt} backward pass with your hooks installed")
            problem = _grads_match(got, want, w.tol)
            if problem is None:
                continue
            if attempt == "second":
                raise _Fail(
                    f"The first backward pass is right but the second is not ({problem}): your hooks keep "
                    "a tensor from an earlier pass. Capture the live mlp.hook_in input on every forward pass."
                )
            _remove_new_hooks(model, state)  # take the learner's hooks out, try the known mistakes one by one
            hint = None
            for mode, text in _TC_HOOK_MISTAKES:
                variant = _VariantHooks(model, w.transcoders, mode)
                try:
                    variant.install()
                    if _grads_match(_grads_with(w, variant, "a diagnostic pass"), got, w.tol) is None:
                        hint = text
                except _Fail:
                    pass  # this mistake cannot even be made on this model (e.g. a non-square W_skip)
                finally:
                    variant.remove()
                if hint:
                    break
            raise _Fail(
                f"Gradients through your hooks are wrong: {hint or problem}. (Compared: the gradient of a "
                "logit and two latent readings with respect to the embeddings and every MLP output.)"
            )

        _run(obj.remove, what="remove()")
        left = _new_hooks(model, state)
        if left:
            raise _Fail(
                f"your remove() left {left} hooks on the model: remove every hook install() added "
                "(keep their handles, or call model.reset_hooks(including_permanent=True))."
            )
    finally:
        _remove_new_hooks(model, state)
