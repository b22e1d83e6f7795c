"""Autograder test for `swap_group`: prompt A with some latents set to the values prompt B gives them.

Two checks. On the toy (or your) world, the logits must equal the reference's for a swap of latents that
fire on A only, on B only and on both (random weights: every value matters, so every mistake shows). On
the planted world: on pairs of held-out two-hop questions chosen by a fixed rule over the planted facts
(one question per land, paired with the same question about the next land), whatever the swap does to the
answer, your logits must equal the reference's. No latent index or position is hard-coded: the lands'
latents come from `land_latents`, the pairs from `planted_facts`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..case_study import swap_group as _ref_swap_group
from ..interventions import clean_run, intervene
from ..worlds.gemma import format_prompt
from ..worlds.planted import land_latents, planted_facts, planted_groups
from .compare import _close, _diagnose, _tensor, _worst
from .messages import _Fail
from .running import _public_test, _run
from .worlds import TOY_PROMPT, _World

__all__ = ["test_swap_group"]


def _variant(model: Any, transcoders: Any, prompt_a: str, prompt_b: str, latents: list, mode: str) -> Tensor:
    """The logits a known mistake gives."""
    run_a, run_b = clean_run(model, transcoders, prompt_a), clean_run(model, transcoders, prompt_b)
    last = run_b.tokens.shape[1] - 1
    edits = []
    for layer, pos, f in latents:
        a, b = float(run_a.acts[layer][pos, f]), float(run_b.acts[layer][pos, f])
        value = {"add": a + b, "a_values": a, "last": float(run_b.acts[layer][last, f]), "zero": 0.0}.get(
            mode, b
        )
        if mode == "skip_silent" and b == 0:
            continue
        edits.append((layer, pos, f, value))
    live = {"freeze_attention": False} if mode == "live" else {}
    return intervene(model, transcoders, run_a, edits, **live).logits[0, -1]


_MISTAKES = (
    (
        "zero",
        "you set the latents to 0, which is an ablation (it only removes A's group); a swap sets each latent "
        "to the value it has on prompt B, read from a clean run of B at the same (layer, position), so that "
        "B's group is switched on in its place",
    ),
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


def _call(
    fn: Any, model: Any, transcoders: Any, prompt_a: str, prompt_b: str, latents: list, label: str, **run
):
    out = _run(
        fn, model, transcoders, prompt_a, prompt_b, list(latents), what=f"swap_group(...) on {label}", **run
    )
    d_vocab = model.cfg.d_vocab
    if isinstance(out, Tensor) and out.dim() == 3 and out.shape[0] == 1:
        raise _Fail(
            f"{label}: you return logits of shape {tuple(out.shape)}; return the next-token logits, those of "
            "the last position: shape (d_vocab,), e.g. .logits[0, -1]."
        )
    return _tensor(out, f"{label}: the logits you returned", shape=(d_vocab,))


def _what_differs(a: str, b: str, context: int = 12) -> tuple[str, str]:
    """The part of each prompt that differs from the other, with a little context either side."""
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    lo = max(0, start - context)

    def cut(s: str) -> str:
        hi = min(len(s), len(s) - end + context)
        return ("..." if lo else "") + s[lo:hi] + ("..." if hi < len(s) else "")

    return cut(a), cut(b)


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
    last = run_a.tokens.shape[1] - 1
    positions = sorted({differ[0], last - 1})
    latents = []
    layers = sorted(tcs)
    for k, pos in enumerate(positions):
        layer = layers[min(k + 1, len(layers) - 1)]
        a, b = run_a.acts[layer][pos], run_b.acts[layer][pos]
        only_a = ((a > 0) & (b == 0)).nonzero().flatten()[:2].tolist()
        only_b = ((b > 0) & (a == 0)).nonzero().flatten()[:2].tolist()
        both = ((a > 0) & (b > 0)).nonzero().flatten()[:2].tolist()
        latents += [(layer, pos, f) for f in only_a + only_b + both]
    # One latent that B also uses at the last position, so that reading B's values there (a mistake) is
    # told apart from setting the latents to 0 (another one).
    for layer in layers:
        for pos in positions:
            shared = ((run_b.acts[layer][pos] > 0) & (run_b.acts[layer][last] > 0)).nonzero().flatten()
            if shared.numel() and (layer, pos, int(shared[0])) not in latents:
                latents.append((layer, pos, int(shared[0])))
                break
        else:
            continue
        break
    latents.sort()
    shown_a, shown_b = _what_differs(prompt_a, prompt_b)
    label = f"{w.name}, prompt A {shown_a!r} and prompt B {shown_b!r}, {len(latents)} latents"
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


def _planted_pairs(facts: list, found: dict) -> list[tuple[Any, Any]]:
    """A fixed rule over the planted facts, blind to what any swap does: for each land, its first held-out
    two-hop question (A), paired with the same question about the first town of the next land (B)."""
    lands = list(planted_groups())
    heldout = [f for f in facts if f.split == "heldout"]
    pairs = []
    for k, land in enumerate(lands):
        a = next((f for f in heldout if f.intermediate == land), None)
        other = lands[(k + 1) % len(lands)]
        b = next((f for f in facts if f.intermediate == other and a and f.attribute == a.attribute), None)
        if a is not None and b is not None:
            pairs.append((a, b))
    return pairs


def _planted_case(fn: Any) -> None:
    """Held-out two-hop pairs of the planted world (see `_planted_pairs`): your logits must equal the
    reference's on every pair whose lands have latents to swap, and at least one pair must be graded."""
    model, tcs, found, keep = _planted_world()
    graded = 0
    for a, b in _planted_pairs(planted_facts("two_hop"), found):
        latents = sorted(set(found.get(a.intermediate, [])) | set(found.get(b.intermediate, [])))
        if not latents:
            continue
        label = (
            f"the planted world, {a.attribute} of the land with {a.entity} ({a.intermediate}) swapped "
            f"with {b.entity}'s ({b.intermediate})"
        )
        got = _call(
            fn,
            model,
            tcs,
            a.prompt,
            b.prompt,
            latents,
            label,
            watch=[(model, tcs, keep)],
            hook_hint="use intervene, or add hooks with `with model.hooks(fwd_hooks=...):`",
        )
        want = _ref_swap_group(model, tcs, a.prompt, b.prompt, latents)
        graded += 1
        if not _close(got, want, 1e-4):
            answer = model.tokenizer.decode([int(got.argmax())])
            expected = model.tokenizer.decode([int(want.argmax())])
            b_answer = planted_groups()[b.intermediate][a.attribute]
            raise _Fail(
                f"{label}: your logits differ from the reference swap's, {_worst(got, want, 'logits')}: it "
                f"answers {expected!r} ({b.intermediate}'s {a.attribute} is {b_answer!r}), yours {answer!r}."
            )
    if not graded:
        raise _Fail(
            "The autograder could not grade swap_group on the planted world: land_latents found no latents "
            "for the lands of any of its pairs. This is the autograder's world, not your code: report it."
        )


_PLANTED: tuple | None = None


def _planted_world() -> tuple:
    """(model, transcoders, {land: latents}, keep): loaded once; `keep` holds the pristine copy of its
    weights that every call into your code is checked against (see `_Guard`)."""
    global _PLANTED
    if _PLANTED is None:
        from ..worlds.planted import load_planted_world

        model, tcs = load_planted_world()
        _PLANTED = (model, tcs, land_latents(model, tcs, planted_facts("two_hop")), {})
    return _PLANTED


@_public_test("swap_group")
def test_swap_group(fn: Any, w: _World) -> None:
    """Logits equal to the reference's on the toy (or your) world, and on held-out two-hop pairs of the
    planted world."""
    _exact_case(fn, w)
    _planted_case(fn)
