"""Running learner code: under a time limit, guarded (see `hygiene`), with every exception turned into a
clear failure; and `_public_test`, which makes a test body into the public `test_<exercise>`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
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
