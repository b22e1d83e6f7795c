"""Running learner code: under a time limit, guarded (see `hygiene`), with every exception turned into a
clear failure; and `_public_test`, which makes a test body into the public `test_<exercise>`.

The time limit. Learner code runs on a thread of its own (`_LearnerCall`) and the caller waits for it with
a deadline; past it the thread is sent `_TimeUp` (`PyThreadState_SetAsyncExc`) and the test fails naming
the exercise, the limit and the learner's line. Why this way:
- a SIGALRM (the old limit) lives where learner code can cancel it (`signal.setitimer(..., 0)`, its own
  handler) and exists only on the main thread: a test called from a worker thread had no limit;
- `_thread.interrupt_main()` from a watchdog also reaches the main thread only, and a learner's SIGINT
  handler or `except KeyboardInterrupt` defeats it;
- a subprocess cannot call a function defined in a notebook cell (closures, the live model in memory).
The one case no in-process limit can stop is a single C call that never returns (a sleep, one enormous
tensor operation): the exception is raised when it returns to Python. The caller is not held up by it (the
test fails at the deadline and says the call is still running in the background).
"""

from __future__ import annotations

import ctypes
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import exercises as _exercises
from .hygiene import _Guard, _new_hooks, _torch_globals_kept
from .messages import AutograderFailure, _Fail, _short, _TimeUp, _where
from .worlds import _get_world, _one_thread, _World

# Seconds one call into learner code may take before it is stopped: generous, since a correct answer
# takes well under a second on the toy world, and a slow (looped) one on a real model can take minutes.
TIME_LIMIT_S = 120.0
REAL_TIME_LIMIT_S = 1800.0


# The public tests now running, innermost last: (exercise name, world). `_run` guards every call into
# learner code made while one runs.
_ACTIVE: list[tuple[str, _World]] = []


# How long a stopped call may take to unwind, and how often it is told to stop meanwhile (a learner's
# `except BaseException:` inside the loop can swallow one notice, not every one).
_GRACE_S = 5.0
_NOTICE_EVERY_S = 0.1


class _LearnerCall(threading.Thread):
    """One call into learner code, on a thread of its own: the caller waits for it with a deadline that no
    code on this thread can reach (a learner's `signal.setitimer(signal.ITIMER_REAL, 0)` or SIGALRM handler
    cancels nothing here), and that works whichever thread the test itself was called from.

    The thread starts with the caller's grad and inference modes, default device and number of intra-op
    threads (torch and OpenMP keep each per thread), so the call sees what it would have seen on the
    caller's thread (and the toy world's tiny matrices don't pay for thread hand-offs)."""

    def __init__(self, fn: Callable, args: tuple):
        super().__init__(name="autograder: your code", daemon=True)
        self.fn, self.args = fn, args
        self.grad, self.inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        self.threads, self.device = torch.get_num_threads(), torch.get_default_device()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            torch.set_num_threads(self.threads)
            if self.device != torch.device("cpu"):  # torch keeps the default device per thread too
                torch.set_default_device(self.device)
            with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad):
                self.result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which reports it
            self.error = e

    def stop(self, exc: type[BaseException], grace_s: float) -> bool:
        """Raise `exc` in the thread (at its next Python instruction) until it ends or `grace_s` passes;
        True if it ended. Code blocked inside one C call (a sleep, one huge tensor operation) gets the
        exception only when that call returns."""
        deadline = time.monotonic() + grace_s
        while self.is_alive() and time.monotonic() < deadline:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), ctypes.py_object(exc))
            self.join(_NOTICE_EVERY_S)
        return not self.is_alive()


def _call_with_limit(fn: Callable, args: tuple, seconds: float) -> Any:
    """`fn(*args)`, raising `_TimeUp` (with the learner's frame where it was stopped, or a `still_running`
    flag) if it runs past `seconds`. Ctrl-C while waiting stops the call too and is passed on."""
    call = _LearnerCall(fn, args)
    call.start()
    try:
        call.join(seconds)
    except KeyboardInterrupt:
        call.stop(KeyboardInterrupt, _GRACE_S)
        raise
    if call.is_alive():
        stopped = call.stop(_TimeUp, _GRACE_S)
        up = call.error if stopped and isinstance(call.error, _TimeUp) else _TimeUp()
        up.still_running = not stopped
        raise up
    if call.error is not None:
        raise call.error
    return call.result


def _active() -> list[_World]:
    """The world of the innermost public test now running (none outside one)."""
    return [_ACTIVE[-1][1]] if _ACTIVE else []


def _named(fn: Callable, args: tuple) -> dict[str, Any]:
    """The call's arguments by the names its signature gives them (`argument 1`... where it has none)."""
    try:
        return dict(inspect.signature(fn).bind(*args).arguments)
    except (TypeError, ValueError):
        return {f"argument {i + 1}": a for i, a in enumerate(args)}


def _time_limit_s() -> float:
    return TIME_LIMIT_S if not _ACTIVE or _ACTIVE[-1][1].toy else REAL_TIME_LIMIT_S


def _run(
    fn: Callable,
    *args: Any,
    what: str,
    hints: Sequence[tuple[type, str, str]] = (),
    hooks_allowed: bool = False,
    hook_hint: str = "",
    watch: Sequence[tuple[Any, dict, dict]] = (),
) -> Any:
    """Call learner code under the time limit; turn any exception into a clear failure (with a hint when we
    know the cause), and any side effect on the model or the cached world into a failure naming it (undone).

    `hooks_allowed`: the call may leave hooks (the test removes them itself, e.g. after `install()`).
    `hook_hint`: what to advise if it leaves hooks anyway.
    `watch`: (model, transcoders, keep) of other worlds the call runs on, guarded too (see `_Guard`).
    """
    guards = [_Guard(w.model, w.transcoders, w.extra, world=w, inputs=_named(fn, args)) for w in _active()]
    guards += [_Guard(model, tcs, keep) for model, tcs, keep in watch]
    limit = _time_limit_s()
    message = None
    try:
        with _torch_globals_kept():
            result = _call_with_limit(fn, args, limit)
    except NotImplementedError as e:
        exercise = _exercises.get(_ACTIVE[-1][0]).qualname if _ACTIVE else what
        message = (
            f"{what} raised NotImplementedError{': ' + _short(e, 120) if str(e) else ''}. "
            f"`{exercise}` is still a stub: did you fill in the stub? Write your code in place of "
            "`raise NotImplementedError(...)` and run that cell again."
        )
    except _TimeUp as e:
        exercise = _exercises.get(_ACTIVE[-1][0]).qualname if _ACTIVE else what
        stopped = (
            " and is still running in the background, blocked inside one call into C (a sleep, a huge "
            "tensor operation?): it stops when that call returns; restart the kernel if it keeps the CPU busy"
            if getattr(e, "still_running", False)
            else f" and was stopped{_where(e)}"
        )
        message = (
            f"Your `{exercise}` ({what}) did not finish within the autograder's time limit of {limit:.3g} s"
            f"{stopped}: an endless loop? (A correct answer takes well under a second on the toy world.)"
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
        found = [guard.check(what, hooks_allowed=hooks_allowed, hook_hint=hook_hint) for guard in guards]
        side_effects = "\n".join(f for f in found if f) or None
    if side_effects:
        message = side_effects if message is None else f"{side_effects}\n{message}"
    if message is not None:
        raise _Fail(message)
    return result


def _public_test(exercise: str, expects: str | None = None) -> Callable:
    """Make a test body `test_<exercise>(obj, w)` into the public test `test_<exercise>(obj, *, model=None,
    transcoders=None)`: checks what was passed, sets up the world, one thread on the toy world, guards the
    model (see `_Guard`), prints one line on success (and a second, `Note: ...`, if the body returns a note
    about a correct answer) and raises `AutograderFailure` with only the message on failure. What the
    learner passes (a function or a class) comes from the exercise's registry record."""
    record = _exercises.get(exercise)
    if expects is not None and expects != record.expects:  # the registry says what the learner passes
        raise TypeError(
            f"@_public_test({exercise!r}, expects={expects!r}): the registry record says {record.expects!r}."
        )

    def decorate(body: Callable[[Any, _World], str | None]) -> Callable:
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
                guard = _Guard(world.model, world.transcoders, world.extra, world=world)
                _ACTIVE.append((exercise, world))
                try:
                    with _one_thread(world.small), torch.inference_mode(False):
                        note = body(obj, world)
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
            if note:
                print(f"Note: {note}")

        test.__name__ = test.__qualname__ = name
        test.__module__ = body.__module__
        test.__doc__ = (
            f"Check your `{record.qualname}` against the reference. {body.__doc__ or ''} Pass "
            "model=..., transcoders=... to repeat the check on the model you loaded."
        )
        test.exercise = record
        return test

    return decorate
