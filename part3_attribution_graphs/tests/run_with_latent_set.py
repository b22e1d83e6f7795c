"""Autograder test for `run_with_latent_set`: one latent set at one position, errors held, no hook left."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..interventions import run_with_latent_set as _ref_run_with_latent_set
from .compare import _close, _tensor, _worst
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

    def read_at(p: int, where: str) -> tuple[str, Callable[[], Tensor]]:
        hint = (
            f"you read the latent's clean activation a at {where}, not at `position`: read it where you add "
            "the change, cache[hook_name][0, position], so the change is (value - a) * W_dec[latent]"
        )
        return hint, lambda: _edited_logits(w, tc, out_name, (value - float(acts[p])) * W, position)

    return [
        read_at(seq - 1, "the last position"),
        read_at(position - 1, "the position before (off by one?)"),
        read_at((position + 1) % seq, "the position after (off by one?)"),
        (
            "your change cancels out: the logits are the clean ones. If you recompute the error from the "
            "edited transcoder output (mlp_out - tc(...)), it absorbs the edit; hold the error at its clean "
            "value by adding (value - a) * W_dec[latent] to the MLP output",
            lambda: w.logits,
        ),
        (
            "you add value * W_dec[latent]; to SET the activation, add the difference (value - a) * "
            "W_dec[latent], where a is the latent's clean activation at that position",
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


def _ablation_site(w: _World) -> tuple[int, int]:
    """(layer, latent) at position seq - 2 for the ablation: a latent active there and at the last position,
    and if it can be, at the position before too (so that reading its clean activation at any of those
    positions, a mistake, changes the logits differently from adding the value); the middle layer first."""
    n, seq = w.n_layers, w.tokens.shape[1]
    best = None
    for layer in sorted(range(n), key=lambda layer: abs(layer - n // 2)):
        tc = w.transcoders[layer]
        acts = tc.encode(w.cache[tc.cfg.metadata.hook_name][0].to(tc.dtype))
        here = acts[seq - 2]
        score = (here > 0) * (1.0 * (acts[seq - 1] > 0) + 0.5 * (acts[seq - 3] > 0))
        if best is None:
            best = (layer, int(here.argmax()))  # the most active, if no layer has a better one
        if score.max() >= 1:
            return layer, int(torch.where(score == score.max(), here, torch.zeros_like(here)).argmax())
    return best


@torch.no_grad()
def _latent_set_cases(w: _World) -> list[tuple[str, int, int, int, float]]:
    """(label, layer, position, latent, value): a steer up, a silent latent switched on, and an ablation."""
    n, seq = w.n_layers, w.tokens.shape[1]
    cases = []
    # Steering first: with value 0, adding the value and cancelling the edit look the same.
    for label, layer, pos in (
        ("steering a latent to 3x its activation", n - 1, w.start_posn + 1),
        ("switching on a silent latent", 0, seq - 1),
    ):
        tc = w.transcoders[layer]
        acts = tc.encode(w.cache[tc.cfg.metadata.hook_name][0, pos].to(tc.dtype))
        if pos == seq - 1:
            cases.append((label, layer, pos, int(acts.argmin()), 2 * float(acts.max())))
        else:  # the most active of those also active next door, if any (see `_ablation_site`)
            around = [
                tc.encode(w.cache[tc.cfg.metadata.hook_name][0, p].to(tc.dtype)) for p in (pos - 1, pos + 1)
            ]
            score = (acts > 0) * (1.0 + sum((a > 0).float() for a in around))
            top = int(torch.where(score == score.max(), acts, torch.zeros_like(acts)).argmax())
            cases.append((label, layer, pos, top, 3 * float(acts[top])))
    layer, latent = _ablation_site(w)
    cases.append(("ablating a latent", layer, seq - 2, latent, 0.0))
    return cases


def _mistake(w: _World, runs: list[tuple[str, int, int, int, float, Tensor, Tensor]]) -> str | None:
    """The first known mistake that reproduces your logits in every case (a mistake must explain them all:
    on one case, reading a where the latent is silent and adding value * W_dec look the same)."""
    consistent: list[str] | None = None
    for _, layer, pos, latent, value, got, _ in runs:
        matching = []
        for hint, make in _latent_set_mistakes(w, w.transcoders[layer], pos, latent, value):
            if hint in matching or (consistent is not None and hint not in consistent):
                continue
            try:
                cand = make()
            except Exception:  # noqa: BLE001 - a mistake that can't be formed here doesn't match
                continue
            if tuple(cand.shape) == tuple(got.shape) and _close(got, cand, max(w.tol, 1e-6)):
                matching.append(hint)
        consistent = matching if consistent is None else [h for h in consistent if h in matching]
        if not consistent:
            return None
    return consistent[0] if consistent else None


def _one_case(fn: Any, w: _World, layer: int, pos: int, latent: int, value: float) -> tuple[Tensor, Tensor]:
    """Your logits and the reference's for one case, after the checks of form and hooks."""
    model = w.model
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
            what=f"run_with_latent_set(model, transcoders[{layer}], tokens, {pos}, {latent}, {value:.3g})",
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
    return got, expected


@_public_test("run_with_latent_set")
def test_run_with_latent_set(fn: Any, w: _World) -> None:
    """Logits with one latent set (ablated, steered, switched on), errors held, and no hook left behind."""
    runs = []
    for label, layer, pos, latent, value in _latent_set_cases(w):
        try:
            got, expected = _one_case(fn, w, layer, pos, latent, value)
        except _Fail:
            if any(not _close(g, e, w.tol) for *_, g, e in runs):
                break  # a case already failed: diagnose it with the cases that ran
            raise
        runs.append((label, layer, pos, latent, value, got, expected))
    for label, layer, pos, latent, value, got, expected in runs:
        if not _close(got, expected, w.tol):
            hint = _mistake(w, runs)
            raise _Fail(
                f"{label} (layer {layer}, position {pos}, latent {latent}, value {value:.3g}): "
                + (hint or f"the logits differ from the reference, {_worst(got, expected, 'logits')}.")
            )
