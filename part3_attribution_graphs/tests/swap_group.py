"""Autograder test for `swap_group`: prompt A with some latents set to the values prompt B gives them.

Two checks. On the toy (or your) world, the logits must equal the reference's for a swap of latents that
fire on A only, on B only and on both (random weights: every value matters, so every mistake shows). On
the planted world, graded against its planted truth: on pairs of two-hop questions (same attribute, towns
of different lands) where swapping the lands' latents makes the model answer B's land's attribute, yours
must too. No latent index is hard-coded: the lands' latents are found by contrasting prompts.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..case_study import swap_group as _ref_swap_group
from ..interventions import clean_run, intervene
from ..worlds.gemma import format_prompt
from .compare import _close, _diagnose, _tensor, _worst
from .hygiene import _hook_state, _new_hooks, _remove_new_hooks
from .messages import _Fail
from .running import _public_test, _run
from .worlds import TOY_PROMPT, _World

__all__ = ["test_swap_group"]

N_PAIRS = 6  # planted pairs tried; those the reference flips are graded


def _variant(model: Any, transcoders: Any, prompt_a: str, prompt_b: str, latents: list, mode: str) -> Tensor:
    """The logits a known mistake gives."""
    run_a, run_b = clean_run(model, transcoders, prompt_a), clean_run(model, transcoders, prompt_b)
    last = run_b.tokens.shape[1] - 1
    edits = []
    for layer, pos, f in latents:
        a, b = float(run_a.acts[layer][pos, f]), float(run_b.acts[layer][pos, f])
        value = {"add": a + b, "a_values": a, "last": float(run_b.acts[layer][last, f])}.get(mode, b)
        if mode == "skip_silent" and b == 0:
            continue
        edits.append((layer, pos, f, value))
    live = {"freeze_attention": False} if mode == "live" else {}
    return intervene(model, transcoders, run_a, edits, **live).logits[0, -1]


_MISTAKES = (
    (
        "add",
        "you added B's activation to A's own; SET each latent to its value on B (intervene's value is the "
        "new activation, not a change)",
    ),
    (
        "a_values",
        "nothing changed: you set the latents to their values on prompt A; read the values from a clean "
        "run of prompt B",
    ),
    (
        "skip_silent",
        "latents that fire on A but not on B must be switched off too: set them to B's value, 0. Skipping "
        "them leaves A's group switched on",
    ),
    (
        "last",
        "read B's value at the latent's own position (the same position you set on A), not at the last "
        "position",
    ),
    (
        "live",
        "use intervene's defaults (the graph's replacement model: attention patterns and norm scales "
        "frozen); freeze_attention=False lets attention re-route",
    ),
)


def _call(fn: Any, model: Any, transcoders: Any, prompt_a: str, prompt_b: str, latents: list, label: str):
    out = _run(fn, model, transcoders, prompt_a, prompt_b, list(latents), what=f"swap_group(...) on {label}")
    d_vocab = model.cfg.d_vocab
    if isinstance(out, Tensor) and out.dim() == 3 and out.shape[0] == 1:
        raise _Fail(
            f"{label}: you return logits of shape {tuple(out.shape)}; return the next-token logits, those of "
            "the last position: shape (d_vocab,), e.g. .logits[0, -1]."
        )
    return _tensor(out, f"{label}: the logits you returned", shape=(d_vocab,))


def _exact_case(fn: Any, w: _World) -> None:
    """A swap of latents that fire on A only, B only and both, at two positions, checked value by value."""
    model, tcs = w.model, w.transcoders
    words = ("small", "large")
    user, reply = TOY_PROMPT if w.toy else ("What is the opposite of small?", "The opposite of small is")
    prompt_a = format_prompt(user, reply)
    prompt_b = format_prompt(user.replace(words[0], words[1]), reply.replace(words[0], words[1]))
    run_a, run_b = clean_run(model, tcs, prompt_a), clean_run(model, tcs, prompt_b)
    if run_a.tokens.shape != run_b.tokens.shape:
        return  # the passed model's tokenizer splits the words differently: the planted check remains
    differ = (run_a.tokens != run_b.tokens)[0].nonzero().flatten().tolist()
    positions = sorted({differ[0], run_a.tokens.shape[1] - 2})
    latents = []
    layers = sorted(tcs)
    for k, pos in enumerate(positions):
        layer = layers[min(k + 1, len(layers) - 1)]
        a, b = run_a.acts[layer][pos], run_b.acts[layer][pos]
        only_a = ((a > 0) & (b == 0)).nonzero().flatten()[:2].tolist()
        only_b = ((b > 0) & (a == 0)).nonzero().flatten()[:2].tolist()
        both = ((a > 0) & (b > 0)).nonzero().flatten()[:2].tolist()
        latents += [(layer, pos, f) for f in only_a + only_b + both]
    label = f"{w.name}, prompt A {prompt_a[-30:]!r} and prompt B {prompt_b[-30:]!r}, {len(latents)} latents"
    got = _call(fn, model, tcs, prompt_a, prompt_b, latents, label)
    want = _ref_swap_group(model, tcs, prompt_a, prompt_b, latents)
    if not _close(got, want, w.tol):
        candidates = [
            (hint, lambda m=mode: _variant(model, tcs, prompt_a, prompt_b, latents, m))
            for mode, hint in _MISTAKES
        ]
        raise _Fail(
            f"{label}: "
            + (_diagnose(got, candidates, w.tol) or f"the logits differ, {_worst(got, want, 'logits')}.")
        )


def _planted_case(fn: Any) -> None:
    """Two-hop pairs of the planted world: where the reference swap makes the model answer B's attribute,
    the learner's must too."""
    from ..worlds.planted import land_latents, planted_facts

    model, tcs = _planted_world()
    facts = planted_facts("two_hop")
    found = land_latents(model, tcs, facts)
    pairs = []
    for a in planted_facts("two_hop", "heldout"):
        partners = [
            b
            for b in facts
            if b.attribute == a.attribute and b.intermediate != a.intermediate and found[b.intermediate]
        ]
        if partners and found[a.intermediate]:
            pairs.append((a, partners[len(pairs) % len(partners)]))
        if len(pairs) == N_PAIRS:
            break
    for a, b in pairs:
        latents = sorted(set(found[a.intermediate]) | set(found[b.intermediate]))
        target = model.to_single_token(b.answer)
        if int(_ref_swap_group(model, tcs, a.prompt, b.prompt, latents).argmax()) != target:
            continue  # the planted world does not route this pair through these latents alone
        label = (
            f"the planted world, {a.attribute} of the land with {a.entity} ({a.intermediate}) swapped "
            f"with {b.entity}'s ({b.intermediate})"
        )
        state = _hook_state(model, tcs)
        try:
            got = _call(fn, model, tcs, a.prompt, b.prompt, latents, label)
            left = _new_hooks(model, state, tcs)
        finally:
            _remove_new_hooks(model, state, tcs)  # the toy world is guarded by `running`; this one is ours
        if left:
            raise _Fail(
                f"{label}: swap_group left {left} hook(s) on the model: use intervene, or add hooks with "
                "`with model.hooks(fwd_hooks=...):`."
            )
        answer = model.tokenizer.decode([int(got.argmax())])
        if int(got.argmax()) != target:
            raise _Fail(
                f"{label}: with {a.intermediate}'s and {b.intermediate}'s latents swapped the model should "
                f"answer{b.answer} ({b.intermediate}'s {a.attribute}), but yours answers {answer!r}."
            )


_PLANTED: tuple | None = None


def _planted_world() -> tuple:
    global _PLANTED
    if _PLANTED is None:
        from ..worlds.planted import load_planted_world

        _PLANTED = load_planted_world()
    return _PLANTED


@_public_test("swap_group")
def test_swap_group(fn: Any, w: _World) -> None:
    """Logits equal to the reference's on the toy (or your) world; answers flipped to B's attribute on the
    planted world's two-hop pairs."""
    _exact_case(fn, w)
    _planted_case(fn)
