"""The autograder: call `tests.test_<exercise>(your_function)` right after writing each exercise.

Every test builds its inputs with the reference code (so a mistake in an earlier exercise cannot
cascade into a later one), runs your function and the reference on a small toy Gemma 3 world and on
hand-made cases, and compares the values. Pass `model=..., transcoders=...` to repeat the comparison
on the model you loaded. A pass prints one line; a failure raises an `AssertionError` saying what is
probably wrong, with the values that differ.

Tests leave the model as they found it: hooks your code adds, weights it changes in place and inputs it
edits are reported and undone, and a call that runs too long is stopped.

One module per exercise (`tests/<exercise>.py`, listed in `exercises.py`) defines its `test_<exercise>`;
What they share, by concern: `worlds` (the worlds tests run on), `running` (calling learner code under a
time limit; `_public_test`), `hygiene` (what learner code must leave as it found), `compare` (checking
what it returns), `messages` (what the learner reads), `handmade` (small hand-made graphs).
"""

import importlib as _importlib

from ..exercises import EXERCISES as _EXERCISES
from .messages import AutograderFailure

for _exercise in _EXERCISES:
    globals()[_exercise.test_name] = getattr(
        _importlib.import_module(_exercise.autograder_module), _exercise.test_name
    )
del _exercise

__all__ = ["AutograderFailure"] + [e.test_name for e in _EXERCISES]
