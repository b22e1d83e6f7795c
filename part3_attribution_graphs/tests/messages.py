"""What a learner sees: the failure types, where in their code it happened, and short renderings of
values."""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
from torch import Tensor


class _Fail(Exception):
    """A test failure; the public test turns it into an `AutograderFailure` carrying only the message."""


class _TimeUp(BaseException):
    """Raised inside learner code that ran past its time limit (a BaseException, so `except Exception:`
    cannot swallow it); `still_running` is set when the code could not be stopped."""

    still_running = False


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


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:4])
    return shown + (f" and {len(items) - 4} more" if len(items) > 4 else "")
