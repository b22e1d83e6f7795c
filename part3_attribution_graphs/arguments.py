"""Command-line number types shared by the CLI and the tools: argparse refuses a bad value with a usage line
before any slow work (standard library only, so `--help` stays fast)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["fraction", "real", "whole_number"]


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def real(
    minimum: float = -math.inf, maximum: float = math.inf, open_below: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in `[minimum, maximum]` (`(minimum, maximum]` when `open_below`)."""
    low = "(" if open_below else "["

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < minimum or (open_below and value == minimum) or value > maximum:
            raise argparse.ArgumentTypeError(f"must be in {low}{minimum:g}, {maximum:g}], got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a fraction of influence in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be a fraction in (0, 1] (0.8 keeps 80% of the influence), got {value}"
        )
    return value
