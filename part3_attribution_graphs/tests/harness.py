"""The autograder's shared harness: the worlds tests run on, running learner code, comparing what comes
back, the messages a learner sees, hygiene, and small hand-made graphs.

Every public test (`@_public_test("<exercise>")`, one module per exercise) builds its inputs with the
reference code, so a mistake in an earlier exercise cannot cascade into a later one, runs the
learner's code on a small toy Gemma 3 world (or on `model=..., transcoders=...`) and on hand-made
cases, and compares the values. A pass prints one line; a failure raises `AutograderFailure` (an
`AssertionError`) whose notebook rendering is the message and the learner's own line.

Hygiene, in one place (`_Guard`, used by `_run` and by `_public_test`): before each call into learner
code the harness snapshots the hooks on the model and the transcoders (TransformerLens temporary and
permanent hooks, raw torch hooks on any module), their parameters and buffers, and the tensors of the
cached world; after the call any side effect fails that test, names what changed, and is undone, so it
never reaches the next cell. Each call also runs under a time limit (SIGALRM, on Unix in the main
thread; elsewhere there is no limit).

Restoring parameters: on a model whose parameters number at most `COPY_LIMIT` (the toy world, small
test doubles) the harness keeps one pristine copy per world, taken when the world is built, and copies
it back over any changed tensor (which also catches edits through `.data`). A larger model is only
watched through each tensor's version counter and storage (no copy: it would double the memory); a
change is reported with the advice to reload the model, and the cached world is dropped so that the
next test rebuilds it from the model as it now is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import attribution as _attribution
from .. import exercises as _exercises
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

# Short prompts keep every test to a fraction of a second on the toy world (14 tokens, ~260 nodes).
TOY_PROMPT = ("opposite of small?", "large")
REAL_PROMPT = ("What is the opposite of small?", "The opposite of small is")
SECOND_PROMPT = ("Tell me a fact.", "yes")

# Seconds one call into learner code may take before it is stopped: generous, since a correct answer
# takes well under a second on the toy world, and a slow (looped) one on a real model can take minutes.
TIME_LIMIT_S = 120.0
REAL_TIME_LIMIT_S = 1800.0
# Worlds with at most this many parameters (model and transcoders) keep a pristine copy to restore from.
COPY_LIMIT = 50_000_000


class _Fail(Exception):
    """A test failure; the public test turns it into an `AutograderFailure` carrying only the message."""


class _TimeUp(BaseException):
    """Raised by the alarm inside learner code (a BaseException, so `except Exception:` cannot swallow it)."""


class AutograderFailure(AssertionError):
    """A failed autograder test. In a notebook it shows the message and the line of your cell that called
    the test, not the autograder's internals (IPython honours `_render_traceback_`)."""

    def _render_traceback_(self) -> list[str]:
        lines = ["\x1b[0;31m" + "-" * 75 + "\x1b[0m"]
        frame = _caller_frame(self.__traceback__)
        if frame is not None:
            lines.append(f"Your line {frame.lineno}: \x1b[0;32m{(frame.line or '').strip()}\x1b[0m")
        lines.append(f"\x1b[0;31mAssertionError\x1b[0m: {self}")
        return lines


def _caller_frame(tb: Any) -> traceback.FrameSummary | None:
    """The last frame of the traceback that is neither ours nor IPython's: the cell that called the test."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    outside = [f for f in frames if not os.path.abspath(f.filename).startswith(_OWN_DIRS)]
    return outside[-1] if outside else None


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


def _set_deterministic(state: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])


def _backend_flag(module: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(module, name)), (lambda value: setattr(module, name, value))


# Global torch state that learner code can change and that would outlive its test: (get, set) each.
_TORCH_GLOBALS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "default dtype": (torch.get_default_dtype, torch.set_default_dtype),
    "default device": (torch.get_default_device, torch.set_default_device),
    "grad mode": (torch.is_grad_enabled, torch.set_grad_enabled),
    "anomaly detection": (
        lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        lambda state: torch.set_anomaly_enabled(*state),
    ),
    "deterministic algorithms": (
        lambda: (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        _set_deterministic,
    ),
    "float32 matmul precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "threads": (torch.get_num_threads, torch.set_num_threads),
    "cudnn.deterministic": _backend_flag(torch.backends.cudnn, "deterministic"),
    "cudnn.benchmark": _backend_flag(torch.backends.cudnn, "benchmark"),
    "cudnn.allow_tf32": _backend_flag(torch.backends.cudnn, "allow_tf32"),
    "cuda.matmul.allow_tf32": _backend_flag(torch.backends.cuda.matmul, "allow_tf32"),
    "CPU random state": (torch.get_rng_state, torch.set_rng_state),
}


@contextlib.contextmanager
def _torch_globals_kept() -> Iterator[None]:
    """Put every global torch setting in `_TORCH_GLOBALS` back as it was, whatever the block changed (a
    learner's `torch.set_default_dtype(torch.float64)` must not reach the next test or their next cell)."""
    saved = {name: get() for name, (get, _) in _TORCH_GLOBALS.items()}
    try:
        yield
    finally:
        for name, (get, put) in _TORCH_GLOBALS.items():
            now = get()
            same = torch.equal(now, saved[name]) if isinstance(now, Tensor) else now == saved[name]
            if not same:
                put(saved[name])


# --------------------------------------------------------------------------------------------------
# Hygiene: hooks, parameters and the cached world, snapshot before learner code and restored after
# --------------------------------------------------------------------------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_KWARG_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def _modules(model: Any, transcoders: dict | None = None) -> Iterator[tuple[str, Any]]:
    """(name, module) for the model's modules and, if given, every transcoder's, named as the learner
    would."""
    for name, m in model.named_modules():
        yield name or "model", m
    for layer, tc in (transcoders or {}).items():
        if isinstance(tc, torch.nn.Module):
            for name, m in tc.named_modules():
                yield f"transcoders[{layer}]" + (f".{name}" if name else ""), m


def _hook_state(model: Any, transcoders: dict | None = None) -> tuple[dict[int, tuple[set, ...]], set[int]]:
    """Which PyTorch hook ids each module holds, and which TransformerLens handles exist."""
    torch_level = {
        id(m): tuple(set(getattr(m, d, None) or {}) for d in _HOOK_DICTS)
        for _, m in _modules(model, transcoders)
    }
    lens_level = {id(h) for _, m in _modules(model, transcoders) for h in _lens_handles(m)}
    return torch_level, lens_level


def _lens_handles(module: Any) -> list:
    return list(getattr(module, "fwd_hooks", None) or []) + list(getattr(module, "bwd_hooks", None) or [])


def _new_hook_sites(model: Any, state: tuple, transcoders: dict | None = None) -> dict[str, int]:
    """{module name: number of hooks added since `state` and still there}."""
    torch_level, _ = state
    sites = {}
    for name, m in _modules(model, transcoders):
        before = torch_level.get(id(m), (set(),) * len(_HOOK_DICTS))
        n = sum(len(set(getattr(m, d, None) or {}) - keep) for d, keep in zip(_HOOK_DICTS, before))
        if n:
            sites[name] = n
    return sites


def _new_hooks(model: Any, state: tuple, transcoders: dict | None = None) -> int:
    """How many hooks (of any kind, on any module) were added since `state` and are still there."""
    return sum(_new_hook_sites(model, state, transcoders).values())


def _new_lens_handles(model: Any, state: tuple) -> list:
    _, lens_level = state
    return [h for _, m in _modules(model) for h in _lens_handles(m) if id(h) not in lens_level]


def _remove_new_hooks(model: Any, state: tuple, transcoders: dict | None = None) -> None:
    """Remove every hook added since `state`, whoever added it and however."""
    torch_level, lens_level = state
    for _, m in _modules(model, transcoders):
        for attr in ("fwd_hooks", "bwd_hooks"):
            handles = getattr(m, attr, None)
            if not isinstance(handles, list):
                continue
            for h in handles:
                if id(h) not in lens_level:
                    h.hook.remove()
            setattr(m, attr, [h for h in handles if id(h) in lens_level])
        before = torch_level.get(id(m), (set(),) * len(_HOOK_DICTS))
        for d, keep in zip(_HOOK_DICTS, before):
            hooks = getattr(m, d, None)
            if hooks is None:
                continue
            for key in [k for k in hooks if k not in keep]:
                hooks.pop(key)
                for extra in _HOOK_KWARG_DICTS:
                    getattr(m, extra, {}).pop(key, None)


def _describe_hooks(sites: dict[str, int]) -> str:
    shown = ", ".join(f"{n} on {name}" for name, n in list(sites.items())[:4])
    return shown + (f" and {len(sites) - 4} more modules" if len(sites) > 4 else "")


def _tensor_slots(model: Any, transcoders: dict) -> Iterator[tuple[str, dict, str, Tensor]]:
    """(display name, owning dict, key, tensor) for every parameter and buffer of the model and
    transcoders."""
    for name, m in _modules(model, transcoders):
        prefix = "model." if name == "model" or not name.startswith("transcoders[") else ""
        base = "model" if name == "model" else f"{prefix}{name}"
        for store in ("_parameters", "_buffers"):
            d = getattr(m, store, None) or {}
            for key, t in d.items():
                if isinstance(t, Tensor):
                    yield f"{base}.{key}", d, key, t


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _world_tensors(w: _World) -> dict[str, Tensor]:
    """Every tensor the cached world holds (its model and transcoders aside), by a readable path."""
    found: dict[str, Tensor] = {}
    seen: set[int] = set()

    def walk(x: Any, path: str, depth: int) -> None:
        if depth > 6 or id(x) in seen:
            return
        if isinstance(x, Tensor):
            found.setdefault(path, x)
            return
        seen.add(id(x))
        if isinstance(x, dict):
            for k, v in x.items():
                if k != "pristine":
                    walk(v, f"{path}[{k!r}]", depth + 1)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                if isinstance(v, (Tensor, list, tuple, dict)):
                    walk(v, f"{path}[{i}]", depth + 1)
        elif hasattr(x, "cache_dict"):  # ActivationCache
            walk(x.cache_dict, path, depth + 1)
        elif dataclasses.is_dataclass(x) or isinstance(x, FreezeHooks):
            for k, v in vars(x).items():
                if k not in ("model", "transcoders", "nodes"):
                    walk(v, f"{path}.{k}", depth + 1)

    for f in dataclasses.fields(w):
        if f.name not in ("model", "transcoders"):
            walk(getattr(w, f.name), f.name, 0)
    return found


def _pristine(w: _World) -> dict[tuple[int, str], Tensor] | None:
    """A copy of every parameter and buffer of a small world (taken once), to restore from; None if too
    big."""
    if "pristine" not in w.extra:
        slots = list(_tensor_slots(w.model, w.transcoders))
        if sum(t.numel() for *_, t in slots) > COPY_LIMIT:
            w.extra["pristine"] = None
        else:
            w.extra["pristine"] = {(id(d), key): t.detach().clone() for _, d, key, t in slots}
    return w.extra["pristine"]


def _guess(name: str, t: Tensor) -> str:
    """What the learner probably did to a parameter, to put in the message."""
    if t.dim() == 2 and t.is_floating_point() and t.numel() > 1:
        for dim in (-1, 0):
            mean = t.detach().double().mean(dim=dim)
            if mean.abs().max() <= 1e-6 * max(t.detach().abs().max().item(), 1e-12):
                return " (demeaning it?)"
    return ""


class _Guard:
    """A snapshot of everything learner code could disturb, taken before it runs; `check()` afterwards
    names what changed and undoes it."""

    def __init__(self, w: _World):
        self.w = w
        self.hooks = _hook_state(w.model, w.transcoders)
        self.slots = [
            (name, d, key, t, _version(t), t.data_ptr(), t.grad, t.requires_grad)
            for name, d, key, t in _tensor_slots(w.model, w.transcoders)
        ]
        self.world = {path: (t, _version(t)) for path, t in _world_tensors(w).items()}
        self.pristine = _pristine(w)
        if (
            self.pristine is not None
        ):  # a passed model may have changed between tests: that is not this call's doing
            for _, d, key, t, *_ in self.slots:
                kept = self.pristine.get((id(d), key))
                if kept is None or kept.shape != t.shape or not torch.equal(kept, t.detach()):
                    self.pristine[(id(d), key)] = t.detach().clone()

    def hook_sites(self) -> dict[str, int]:
        return _new_hook_sites(self.w.model, self.hooks, self.w.transcoders)

    def remove_hooks(self) -> None:
        _remove_new_hooks(self.w.model, self.hooks, self.w.transcoders)

    def check(self, what: str, *, hooks_allowed: bool = False, hook_hint: str = "") -> str | None:
        """Undo every side effect since the snapshot; describe the ones learner code should not have had."""
        problems = []
        sites = {} if hooks_allowed else self.hook_sites()
        if sites:
            self.remove_hooks()
            n = sum(sites.values())
            problems.append(
                f"{what} left {n} hook{'s' if n != 1 else ''} on the model ({_describe_hooks(sites)}): "
                + (
                    hook_hint
                    or "remove every hook your code adds before it returns (add them with "
                    "`with model.hooks(fwd_hooks=...):`, or keep the handles and remove "
                    "them in a `finally:` block)"
                )
                + "."
            )
        changed, lost = [], False
        for name, d, key, t, version, ptr, grad, requires_grad in self.slots:
            now = d.get(key)
            if now is not t:  # rebound to another tensor: put the original back
                d[key] = t
                changed.append(name)
            pristine = None if self.pristine is None else self.pristine.get((id(d), key))
            modified = _version(t) != version or t.data_ptr() != ptr
            if pristine is not None and not modified:
                modified = t.shape != pristine.shape or not torch.equal(t.detach(), pristine)
            if modified:
                if name not in changed:
                    changed.append(name + _guess(name, t))
                if pristine is None:
                    lost = True
                else:
                    with torch.no_grad():
                        if t.shape == pristine.shape and t.data_ptr() == ptr:
                            t.copy_(pristine)
                        else:
                            t.data = pristine.clone()
            with contextlib.suppress(RuntimeError):  # quietly: gradients and flags don't change any answer
                t.grad = grad
                if t.requires_grad != requires_grad and t.is_leaf:
                    t.requires_grad_(requires_grad)
        if changed:
            undone = (
                "We could not undo this on a model this large: reload the model before going on."
                if lost
                else "The autograder has restored it."
            )
            problems.append(
                f"{what} changed {_names(changed)} in place: work on copies (x - m, not x -= m; "
                f"no .data edits; do not reassign model weights). {undone}"
            )
            if lost:
                _forget_world(self.w)
        touched = [path for path, (t, version) in self.world.items() if _version(t) != version]
        if touched:
            problems.append(
                f"{what} changed its input {_names(touched)} in place: work on a copy (e.g. x.clone() "
                "before editing it, or x * s rather than x *= s). The autograder will rebuild it."
            )
            _forget_world(self.w)
        return "\n".join(problems) if problems else None


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:4])
    return shown + (f" and {len(items) - 4} more" if len(items) > 4 else "")


# The public tests now running, innermost last: (exercise name, world). `_run` guards every call into
# learner code made while one runs.
_ACTIVE: list[tuple[str, _World]] = []


# --------------------------------------------------------------------------------------------------
# Running learner code
# --------------------------------------------------------------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(mod.__file__))
    for mod in (torch, __import__("transformer_lens"), __import__("sae_lens"))
) + (_PACKAGE_DIR,)
try:  # frames of the shell that ran the cell are not the learner's either
    import IPython as _IPython

    _OWN_DIRS: tuple[str, ...] = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(_IPython.__file__)))
except ImportError:  # pragma: no cover - IPython comes with the notebook stack
    _OWN_DIRS = (_PACKAGE_DIR,)


def _where(exc: BaseException) -> str:
    """The innermost line of the traceback that is in your code (not torch, TransformerLens or ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    mine = [f for f in frames if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS)]
    frame = (mine or frames)[-1]
    line = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (in {frame.name}, line {frame.lineno}{line})"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise `_TimeUp` in this thread after `seconds` (SIGALRM: Unix, main thread; elsewhere no limit)."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _TimeUp()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _time_limit_s() -> float:
    return TIME_LIMIT_S if not _ACTIVE or _ACTIVE[-1][1].toy else REAL_TIME_LIMIT_S


def _run(
    fn: Callable,
    *args: Any,
    what: str,
    hints: Sequence[tuple[type, str, str]] = (),
    hooks_allowed: bool = False,
    hook_hint: str = "",
) -> Any:
    """Call learner code under the time limit; turn any exception into a clear failure (with a hint when we
    know the cause), and any side effect on the model or the cached world into a failure naming it (undone).

    `hooks_allowed`: the call may leave hooks (the test removes them itself, e.g. after `install()`).
    `hook_hint`: what to advise if it leaves hooks anyway.
    """
    guard = _Guard(_ACTIVE[-1][1]) if _ACTIVE else None
    limit = _time_limit_s()
    message = None
    try:
        with _torch_globals_kept(), _time_limit(limit):
            result = fn(*args)
    except NotImplementedError as e:
        exercise = _exercises.get(_ACTIVE[-1][0]).qualname if _ACTIVE else what
        message = (
            f"{what} raised NotImplementedError{': ' + _short(e, 120) if str(e) else ''}. "
            f"`{exercise}` is still a stub: did you fill in the stub? Write your code in place of "
            "`raise NotImplementedError(...)` and run that cell again."
        )
    except _TimeUp as e:
        message = (
            f"{what} did not finish within {limit:.0f} s and was stopped{_where(e)}: an endless loop? "
            "(A correct answer takes well under a second on the toy world.)"
        )
    except _Fail:
        raise
    except Exception as e:  # noqa: BLE001 - anything the learner's code raises becomes a readable failure
        message = f"{what} raised {type(e).__name__}: {_short(e)}{_where(e)}"
        for exc_type, pattern, hint in hints:
            if isinstance(e, exc_type) and pattern in str(e):
                message += f"\nHint: {hint}"
                break
    finally:
        side_effects = (
            None if guard is None else guard.check(what, hooks_allowed=hooks_allowed, hook_hint=hook_hint)
        )
    if side_effects:
        message = side_effects if message is None else f"{side_effects}\n{message}"
    if message is not None:
        raise _Fail(message)
    return result


def _fmt(x: Any, n: int = 4) -> str:
    """A short, readable rendering of a number, a list or a tensor."""
    if isinstance(x, Tensor):
        flat = x.detach().flatten().double().cpu()
        vals = ", ".join(f"{v:.4g}" for v in flat[:n].tolist())
        more = ", ..." if flat.numel() > n else ""
        shape = f" (shape {tuple(x.shape)})" if x.dim() > 1 else ""
        return f"[{vals}{more}]{shape}"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)) and len(x) > 12:
        return f"[{', '.join(map(repr, x[:12]))}, ...] ({len(x)} items)"
    return repr(x)


def _tensor(
    x: Any,
    what: str,
    *,
    shape: tuple | None = None,
    device: torch.device | None = None,
    floating: bool = True,
    nan_hint: str = "",
) -> Tensor:
    """Check type, shape, dtype, device and finiteness; return the tensor detached."""
    if not isinstance(x, Tensor):
        raise _Fail(f"{what} should be a torch.Tensor, got {type(x).__name__}.")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise _Fail(f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}.")
    if floating and not x.is_floating_point():
        raise _Fail(f"{what} has dtype {x.dtype}, expected a floating-point tensor.")
    if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise _Fail(f"{what} has dtype {x.dtype}, expected an integer tensor (torch.long).")
    if device is not None and x.device.type != device.type:
        raise _Fail(f"{what} is on {x.device}, but the model's tensors are on {device}.")
    if floating and not torch.isfinite(x).all():
        raise _Fail(f"{what} contains NaN or inf values.{(' ' + nan_hint) if nan_hint else ''}")
    return x.detach()


def _items(x: Any, n: int, what: str) -> tuple:
    if not isinstance(x, (tuple, list)) or len(x) != n:
        got = f"a {type(x).__name__} of length {len(x)}" if isinstance(x, (tuple, list)) else type(x).__name__
        raise _Fail(f"{what} should return a tuple of {n} things, got {got}.")
    return tuple(x)


def _list(x: Any, what: str, n: int | None = None) -> list:
    if isinstance(x, Tensor):
        raise _Fail(
            f"{what} should be a Python list (one entry per node), not a stacked tensor: "
            "build_graph_nodes joins the lists with +."
        )
    if not isinstance(x, list):
        raise _Fail(f"{what} should be a list, got {type(x).__name__}.")
    if n is not None and len(x) != n:
        raise _Fail(f"{what} has {len(x)} entries, expected {n}.")
    return x


def _stack(vecs: list, what: str, d_model: int, device: torch.device) -> Tensor:
    """Stack a list of (d_model,) vectors after checking each one."""
    for i, v in enumerate(vecs):
        _tensor(v, f"{what}[{i}]", shape=(d_model,), device=device)
    if not vecs:
        return torch.zeros(0, d_model, device=device)
    # Keep the learner's dtype, so comparisons use the tolerance of the precision they worked in.
    return torch.stack([v.detach().to(device, vecs[0].dtype) for v in vecs])


def _float(x: Any, what: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        raise _Fail(f"{what} should be a number, got {type(x).__name__} {_short(repr(x), 80)}.") from None


def _int(x: Any, what: str) -> int:
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_floating_point():
        return int(x.item())
    if isinstance(x, bool) or not isinstance(x, int):
        raise _Fail(f"{what} should be an int, got {type(x).__name__} {_short(repr(x), 80)}.")
    return x


def _bad(actual: Tensor, expected: Tensor, tol: float) -> Tensor:
    """Elementwise mismatch mask, tolerance relative to the expected tensor's scale.

    A learner's tensor kept in a less precise dtype than the model (e.g. torch.zeros defaults to float32)
    is held to that dtype's tolerance.
    """
    if actual.is_floating_point():
        tol = max(tol, _tolerance(actual.dtype))
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    return (a - e).abs() > tol * max(scale, 1e-12) + tol * e.abs()


def _close(actual: Tensor, expected: Tensor, tol: float) -> bool:
    if tuple(actual.shape) != tuple(expected.shape):
        return False
    return not bool(_bad(actual, expected, tol).any())


def _worst(actual: Tensor, expected: Tensor, index_names: str = "") -> str:
    """'at [i, j]: got x, expected y' for the largest difference."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    i = int((a - e).abs().flatten().argmax())
    idx = list(torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else []
    where = f"{index_names}[{', '.join(str(int(k)) for k in idx)}]"
    return f"at {where}: got {a.flatten()[i].item():.4g}, expected {e.flatten()[i].item():.4g}"


def _diagnose(
    actual: Tensor, candidates: Sequence[tuple[str, Callable[[], Tensor]]], tol: float
) -> str | None:
    """The hint of the first known mistake whose output `actual` reproduces."""
    for hint, make in candidates:
        try:
            cand = make()
        except Exception:  # noqa: BLE001 - a candidate that can't be formed simply doesn't match
            continue
        if tuple(cand.shape) == tuple(actual.shape) and _close(actual, cand, max(tol, 1e-6)):
            return hint
    return None


def _ntype(node: Any) -> str:
    """A node's type as 'embedding' | 'latent' | 'mlp_error' | 'logit' (works with a notebook's own enum)."""
    t = getattr(node, "node_type", None)
    value = getattr(t, "value", t)
    if value in ("embedding", "latent", "mlp_error", "logit"):
        return value
    return str(getattr(t, "name", t)).lower()


def _node_attr(node: Any, attr: str, what: str) -> Any:
    if not hasattr(node, attr):
        raise _Fail(
            f"{what} has no attribute `{attr}`: build nodes with NodeInfo(node_type, layer, ctx_idx, "
            f"feature, ...)."
        )
    return getattr(node, attr)


def _node_number(node: Any, attr: str, what: str, kind: type) -> Any:
    """A node attribute that must be a plain Python number (node ids and JSON exports rely on it)."""
    value = _node_attr(node, attr, what)
    if isinstance(value, Tensor):
        raise _Fail(
            f"{what}: `{attr}` is a tensor ({_short(repr(value), 60)}); store a plain Python "
            f"{kind.__name__} (use .item())."
        )
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise _Fail(f"{what}: `{attr}` should be a Python {kind.__name__}, got {type(value).__name__}.")
    return value


def _copy_graph(graph: GraphNodes) -> GraphNodes:
    """A copy the learner may scribble on without touching the cached reference graph."""
    return GraphNodes(
        nodes=list(graph.nodes),
        writing_vecs=graph.writing_vecs.clone(),
        reading_vecs=graph.reading_vecs.clone(),
        node_range_dict=dict(graph.node_range_dict),
        seq_len=graph.seq_len,
        n_layers=graph.n_layers,
    )


def _check_unchanged(before: Tensor, after: Tensor, what: str) -> None:
    if before.shape != after.shape or not torch.equal(before, after):
        raise _Fail(
            f"Your function modified {what} in place; work on a copy (e.g. use x.abs(), not x.abs_())."
        )


# --------------------------------------------------------------------------------------------------
# Hand-made graphs (influence and pruning) and checks shared by the pruning tests
# --------------------------------------------------------------------------------------------------


def _graph_from_edges(n: int, edges: dict[tuple[int, int], float]) -> Tensor:
    """A[target, source] from {(source, target): weight}."""
    A = torch.zeros(n, n)
    for (src, tgt), weight in edges.items():
        A[tgt, src] = weight
    return A


def _chain() -> tuple[Tensor, Tensor, int]:
    """embedding -> latent -> logit: two edges (one negative), one layer."""
    return _graph_from_edges(3, {(0, 1): 2.0, (1, 2): -3.0}), torch.tensor([0.5]), 1


def _zero_row_graph() -> tuple[Tensor, Tensor, int]:
    """Node 2 is a latent with no inputs (an all-zero row) that still feeds later nodes."""
    edges = {(0, 3): -2.0, (2, 3): 1.0, (3, 4): 1.0, (2, 4): 3.0, (1, 4): 0.5}
    return _graph_from_edges(5, edges), torch.tensor([0.8]), 2


def _two_logit_graph() -> tuple[Tensor, Tensor, int]:
    edges = {
        (0, 2): 1.0,
        (1, 2): -2.0,
        (2, 3): 1.5,
        (1, 3): 0.5,
        (3, 4): 2.0,
        (2, 4): -1.0,
        (2, 5): 1.0,
        (0, 5): 0.25,
    }
    return _graph_from_edges(6, edges), torch.tensor([0.6, 0.3]), 2


def _tie_graph() -> tuple[Tensor, Tensor, int]:
    """Four sources into one logit with shares 1/8, 1/2, 1/8, 1/4: exact in floating point, so threshold 0.75
    is reached exactly after two of them."""
    return _graph_from_edges(5, {(0, 4): 1.0, (1, 4): 4.0, (2, 4): -1.0, (3, 4): 2.0}), torch.tensor([1.0]), 1


def _orphan_graph() -> tuple[Tensor, Tensor, int]:
    """Two embeddings, two layer-0 latents, one layer-1 latent, one logit; at threshold 0.6 edge pruning drops
    every edge of node 1 and node 3, and keeping the edges into the logit needs its weight added back."""
    edges = {
        (0, 2): 4.0,
        (1, 2): 1.0,
        (1, 3): 1.0,
        (2, 4): 3.0,
        (3, 4): 1.0,
        (4, 5): 6.0,
        (2, 5): 1.0,
        (3, 5): 1.0,
    }
    return _graph_from_edges(6, edges), torch.tensor([1.0]), 2


def _robust_threshold(scores: Tensor, target: float) -> float:
    """A threshold near `target` that sits half-way between two cumulative shares, with clear gaps around it.

    Rounding differences between two correct implementations then cannot change what is kept.
    """
    s = scores.detach().double().flatten().cpu()
    s = s[s > 0].sort(descending=True).values
    if s.numel() < 3:
        return target
    share = s.cumsum(0) / s.sum()
    cross = int((share < target).sum())  # index of the item that crosses `target`
    order = sorted(range(1, s.numel() - 1), key=lambda k: abs(k - cross))
    for k in order:  # keep items 0..k
        if (s[k] - s[k + 1]) > 1e-3 * s[k] and s[k] / s.sum() > 1e-4:
            return float((share[k - 1] + share[k]) / 2)
    return target


def _prune_check(kept: Any, pruned: Any, A: Tensor, w: Tensor, what: str) -> tuple[list[int], Tensor]:
    """Type checks shared by both pruning tests."""
    if isinstance(kept, (list, tuple)):
        raise _Fail(f"kept_indices{what} should be a 1-D integer tensor, got a {type(kept).__name__}.")
    kept = _tensor(kept, f"kept_indices{what}", device=A.device, floating=False)
    if kept.dim() != 1:
        raise _Fail(f"kept_indices{what} should be 1-D, got shape {tuple(kept.shape)}.")
    pruned = _tensor(pruned, f"pruned_matrix{what}", device=A.device)
    k = kept.numel()
    if tuple(pruned.shape) != (k, k):
        raise _Fail(
            f"pruned_matrix{what} has shape {tuple(pruned.shape)}, expected ({k}, {k}): restrict both rows "
            "and columns to the kept nodes, A[kept][:, kept]."
        )
    n, n_logits = A.shape[0], w.shape[0]
    got = kept.tolist()
    if not set(range(n - n_logits, n)) <= set(got):
        raise _Fail(
            f"logit nodes must always be kept{what}: indices {list(range(n - n_logits, n))} should be in "
            f"kept_indices, got {_fmt(got)}."
        )
    return got, pruned


def _public_test(exercise: str, expects: str | None = None) -> Callable:
    """Make a test body `test_<exercise>(obj, w)` into the public test `test_<exercise>(obj, *, model=None,
    transcoders=None)`: checks what was passed, sets up the world, one thread on the toy world, guards the
    model (see `_Guard`), prints one line on success and raises `AutograderFailure` with only the message on
    failure. What the learner passes (a function or a class) comes from the exercise's registry record."""
    record = _exercises.get(exercise)
    if expects is not None and expects != record.expects:  # the registry says what the learner passes
        raise TypeError(
            f"@_public_test({exercise!r}, expects={expects!r}): the registry record says {record.expects!r}."
        )

    def decorate(body: Callable[[Any, _World], None]) -> Callable:
        name = record.test_name
        if body.__name__ != name:
            raise TypeError(f"@_public_test({exercise!r}) decorates {body.__name__}; name it {name}.")

        def test(obj: Any, *, model: Any = None, transcoders: Any = None) -> None:
            with _torch_globals_kept():
                _test(obj, model=model, transcoders=transcoders)

        def _test(obj: Any, *, model: Any = None, transcoders: Any = None) -> None:
            message = None
            try:
                if record.expects == "class" and not isinstance(obj, type):
                    raise _Fail(
                        f"Pass the class itself: tests.{name}({record.qualname}), got {type(obj).__name__}."
                    )
                if record.expects == "function" and (isinstance(obj, type) or not callable(obj)):
                    raise _Fail(
                        f"Pass the function itself: tests.{name}({record.qualname}), not what it returns "
                        f"(got {type(obj).__name__})."
                    )
                if (model is None) != (transcoders is None):
                    raise _Fail(
                        "Pass both `model=` and `transcoders=` (or neither, to test on the toy world)."
                    )
                if model is not None and hasattr(model, "modules"):
                    stray = _new_hooks(
                        model, ({}, set()), transcoders if isinstance(transcoders, dict) else None
                    )
                    if stray:
                        raise _Fail(
                            f"Your model already carries {stray} hooks (left by an earlier cell?), which "
                            "would distort every comparison: remove them first, e.g. "
                            "model.reset_hooks(including_permanent=True)."
                        )
                world = _get_world(model, transcoders)
                guard = _Guard(world)
                _ACTIVE.append((exercise, world))
                try:
                    with _one_thread(world.small), torch.inference_mode(False):
                        body(obj, world)
                finally:
                    _ACTIVE.pop()
                    # The safety net: whatever the body's own checks did not catch (learner hooks that ran
                    # inside our reference passes, say) is undone here, and reported if nothing else failed.
                    leftover = guard.check(f"Your `{record.qualname}`")
            except _Fail as f:
                message = str(f)
            else:
                message = leftover
            if message is not None:
                # Raised outside the except block: no chained internals.
                raise AutograderFailure(message)
            print(f"All tests in `{name}` passed!")

        test.__name__ = test.__qualname__ = name
        test.__module__ = body.__module__
        test.__doc__ = (
            f"Check your `{record.qualname}` against the reference. {body.__doc__ or ''} Pass "
            "model=..., transcoders=... to repeat the check on the model you loaded."
        )
        test.exercise = record
        return test

    return decorate
