"""Autograder test for `run_with_latent_set`: one latent set at one position, errors held, no hook left."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..interventions import run_with_latent_set as _ref_run_with_latent_set
from .compare import _close, _diagnose, _tensor, _worst
from .hygiene import _hook_state, _new_hooks, _remove_new_hooks
from .messages import _Fail
from .running import _public_test, _run
from .worlds import _World

__all__ = ["test_run_with_latent_set"]


# --------------------------------------------------------------------------------------------------
# run_with_latent_set
# --------------------------------------------------------------------------------------------------


def _edited_logits(w: _World, tc: Any, hook_name: str, change: Tensor, positions: slice | int) -> Tensor:
    """The logits with `change` added at `hook_name` and these positions (to reproduce known mistakes)."""

    def add(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        x[:, positions] += change.to(x.dtype)
        return x

    with torch.no_grad(), w.model.hooks(fwd_hooks=[(hook_name, add)]):
        return w.model(w.tokens)


@torch.no_grad()
def _replaced_logits(w: _World, tc: Any, position: int, latent: int, value: float) -> Tensor:
    """The logits when the MLP output at `position` is replaced by the transcoder's output (error dropped)."""

    def replace(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        mlp_in = w.cache[tc.cfg.metadata.hook_name][0, position].to(tc.dtype)
        acts = tc.encode(mlp_in)
        acts[latent] = value
        x[:, position] = (tc.decode(acts) + (mlp_in @ tc.W_skip.T if tc.W_skip is not None else 0)).to(
            x.dtype
        )
        return x

    with torch.no_grad(), w.model.hooks(fwd_hooks=[(tc.cfg.metadata.hook_name_out, replace)]):
        return w.model(w.tokens)


@torch.no_grad()
def _latent_set_mistakes(w: _World, tc: Any, position: int, latent: int, value: float) -> list:
    acts = tc.encode(w.cache[tc.cfg.metadata.hook_name][0].to(tc.dtype))[:, latent]
    clean = float(acts[position])
    W = tc.W_dec[latent].detach()
    right = (value - clean) * W
    out_name, in_name = tc.cfg.metadata.hook_name_out, tc.cfg.metadata.hook_name
    layer = out_name.split(".")[1]
    seq = w.tokens.shape[1]
    # Reading the clean activation at a position where this latent is silent reads 0: the same logits as
    # adding value * W_dec[latent], so that hint names both causes.
    neighbours = [p for p in (position - 1, position + 1) if 0 <= p < seq]
    silent_nearby = any(float(acts[p]) == 0 for p in neighbours)
    wrong_read = (
        "you read the latent's clean activation a at another position than `position` (off by one?): read "
        "it where you add the change, cache[hook_name][0, position], so the change is (value - a) * "
        "W_dec[latent]"
    )
    return [
        *[
            (wrong_read, lambda p=p: _edited_logits(w, tc, out_name, (value - float(acts[p])) * W, position))
            for p in neighbours
            if float(acts[p]) != 0
        ],
        (
            "your change cancels out: the logits are the clean ones. If you recompute the error from the "
            "edited transcoder output (mlp_out - tc(...)), it absorbs the edit; hold the error at its clean "
            "value by adding (value - a) * W_dec[latent] to the MLP output",
            lambda: w.logits,
        ),
        (
            "you add value * W_dec[latent]; to SET the activation, add the difference (value - a) * "
            "W_dec[latent], where a is the latent's clean activation at that position"
            + (
                " (or you read a at another position, where this latent is silent: read it at `position`)"
                if silent_nearby
                else ""
            ),
            lambda: _edited_logits(w, tc, out_name, value * W, position),
        ),
        (
            "you changed the MLP output at every position; change only `position` (mlp_out[:, position])",
            lambda: _edited_logits(w, tc, out_name, right, slice(None)),
        ),
        (
            "you changed the MLP output from `position` to the end of the sequence (mlp_out[:, position:]); "
            "change only `position` itself (mlp_out[:, position])",
            lambda: _edited_logits(w, tc, out_name, right, slice(position, None)),
        ),
        (
            "your change has the wrong sign: (a - value) * W_dec[latent] moves the activation away from "
            "value; add (value - a) * W_dec[latent]",
            lambda: _edited_logits(w, tc, out_name, -right, position),
        ),
        (
            "you added the change along the encoder direction W_enc[:, latent]; a latent writes through "
            "its decoder row: add (value - a) * W_dec[latent]",
            lambda: _edited_logits(w, tc, out_name, (value - clean) * tc.W_enc[:, latent].detach(), position),
        ),
        (
            "you added b_dec with the change; b_dec is already in the clean MLP output (the transcoder "
            "adds it whatever the activations): add only (value - a) * W_dec[latent]",
            lambda: _edited_logits(w, tc, out_name, right + tc.b_dec.detach(), position),
        ),
        (
            "you changed the wrong position (off by one?): index the sequence axis with `position` itself",
            lambda: _edited_logits(w, tc, out_name, right, position - 1),
        ),
        (
            "you changed the wrong position (off by one?): index the sequence axis with `position` itself",
            lambda: _edited_logits(w, tc, out_name, right, (position + 1) % seq),
        ),
        (
            "you edit the MLP's input (mlp.hook_in); the decoder writes into the MLP's output: hook "
            "transcoder.cfg.metadata.hook_name_out (hook_mlp_out)",
            lambda: _edited_logits(w, tc, in_name, right, position),
        ),
        (
            "you edit the residual stream before the MLP (hook_resid_mid), so the MLP reads your change "
            "too; the decoder writes into the MLP's output: hook transcoder.cfg.metadata.hook_name_out "
            "(hook_mlp_out)",
            lambda: _edited_logits(w, tc, f"blocks.{layer}.hook_resid_mid", right, position),
        ),
        (
            "you replaced the MLP output by the transcoder's output, which drops the error (what the "
            "transcoder misses); keep it: add only the change of the transcoder's output to the MLP output",
            lambda: _replaced_logits(w, tc, position, latent, value),
        ),
    ]


@torch.no_grad()
def _latent_set_cases(w: _World) -> list[tuple[str, int, int, int, float]]:
    """(label, layer, position, latent, value): a steer up, a silent latent switched on, and an ablation."""
    n, seq = w.n_layers, w.tokens.shape[1]
    cases = []
    # Steering first: with value 0, adding the value and cancelling the edit look the same.
    for label, layer, pos, kind in (
        ("steering a latent to 3x its activation", n - 1, w.start_posn + 1, "steer"),
        ("switching on a silent latent", 0, seq - 1, "silent"),
        ("ablating the most active latent", n // 2, seq - 2, "ablate"),
    ):
        tc = w.transcoders[layer]
        acts = tc.encode(w.cache[tc.cfg.metadata.hook_name][0, pos].to(tc.dtype))
        top = int(acts.argmax())
        if kind == "ablate":
            cases.append((label, layer, pos, top, 0.0))
        elif kind == "steer":
            cases.append((label, layer, pos, top, 3 * float(acts[top])))
        else:
            cases.append((label, layer, pos, int(acts.argmin()), 2 * float(acts.max())))
    return cases


@_public_test("run_with_latent_set")
def test_run_with_latent_set(fn: Any, w: _World) -> None:
    """Logits with one latent set (ablated, steered, switched on), errors held, and no hook left behind."""
    model = w.model
    for label, layer, pos, latent, value in _latent_set_cases(w):
        tc = w.transcoders[layer]
        state = _hook_state(model)
        try:
            got = _run(
                fn,
                model,
                tc,
                w.tokens,
                pos,
                latent,
                value,
                what=(
                    f"run_with_latent_set(model, transcoders[{layer}], tokens, {pos}, {latent}, {value:.3g})"
                ),
            )
            left = _new_hooks(model, state)
        finally:
            _remove_new_hooks(model, state)
        if left:
            raise _Fail(
                f"run_with_latent_set left {left} hook(s) on the model, which would edit every later forward "
                "pass: add the hook with `with model.hooks(fwd_hooks=[(name, fn)]):` (or remove it in a "
                "`finally:` block)."
            )
        expected = _ref_run_with_latent_set(model, tc, w.tokens, pos, latent, value)
        shape = tuple(expected.shape)
        if isinstance(got, Tensor) and got.shape[-1:] == shape[-1:] and got.numel() < expected.numel():
            raise _Fail(
                f"The logits you returned have shape {tuple(got.shape)}, expected {shape}: return the "
                "logits at every position, model(tokens) as it comes, not a slice of them."
            )
        got = _tensor(
            got,
            "The logits you returned",
            shape=tuple(expected.shape),
            device=w.device,
            nan_hint="Is the new activation finite?",
        )
        if not _close(got, expected, w.tol):
            hint = _diagnose(got, _latent_set_mistakes(w, tc, pos, latent, value), w.tol)
            raise _Fail(
                f"{label} (layer {layer}, position {pos}, latent {latent}, value {value:.3g}): "
                + (hint or f"the logits differ from the reference, {_worst(got, expected, 'logits')}.")
            )
