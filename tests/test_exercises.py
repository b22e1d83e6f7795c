"""The exercise registry is the one list: `solutions`, the autograder, the notebook builder and the pytest
files all follow it, the builder refuses what it does not list, and one record (with its lesson block and
its test module) is all a new exercise needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from part3_attribution_graphs import exercises, solutions
from part3_attribution_graphs import tests as autograder
from part3_attribution_graphs.tools import notebook_builder as nbb


def test_every_record_is_exported_once_under_its_names():
    names = exercises.names()
    assert len(names) == len(set(names)) == len(exercises.EXERCISES)
    for e in exercises.EXERCISES:
        assert getattr(solutions, e.qualname) is e.load_reference()
        test = getattr(autograder, e.test_name)
        assert test.exercise is e and test.__module__ == e.autograder_module
        assert e.qualname in solutions.__all__ and e.test_name in autograder.__all__
    assert [n for n in autograder.__all__ if n.startswith("test_")] == [
        e.test_name for e in exercises.EXERCISES
    ]


def test_records_are_checked():
    with pytest.raises(ValueError, match="module:qualname"):
        exercises.Exercise("x", "no_colon", "function", "x", 1, 1, (5, 5))
    with pytest.raises(ValueError, match="'function' or 'class'"):
        exercises.Exercise("x", "m:x", "method", "x", 1, 1, (5, 5))
    with pytest.raises(KeyError, match="registered"):
        exercises.get("normalize_everything")
    assert exercises.get("prune_nodes").header_markdown().endswith("Suggested time: 10–15 minutes.")


def _lesson_blocks(extra: str = "") -> tuple[list, list]:
    headers: list = []
    return nbb.parse_source(nbb.SOURCE.read_text(encoding="utf-8") + extra, headers), headers


def test_an_unregistered_exercise_fence_fails_the_build():
    with pytest.raises(nbb.BuildError, match="'normalize_everything' is not a registered exercise"):
        _lesson_blocks("\n```exercise normalize_everything\n```\n")
    with pytest.raises(nbb.BuildError, match="'normalize_everything' is not a registered exercise"):
        _lesson_blocks("\n<!-- exercise normalize_everything -->\n")


def test_a_call_to_a_missing_autograder_test_fails_the_build():
    blocks, headers = _lesson_blocks("\n```python\ntests.test_normalize_matrix(normalize_matrix)\n```\n")
    with pytest.raises(nbb.BuildError, match="tests.test_normalize_matrix, which does not exist"):
        nbb.check_exercises(blocks, headers)


def test_a_registered_exercise_missing_from_the_lesson_fails_the_build():
    blocks, headers = _lesson_blocks()
    nbb.check_exercises(blocks, headers)  # the real lesson is in step
    without = [b for b in blocks if not (b.kind == "exercise" and b.target == "prune_nodes")]
    with pytest.raises(nbb.BuildError, match="exercise 'prune_nodes' is registered"):
        nbb.check_exercises(without, headers)


RECORD = """
EXERCISES = EXERCISES + (
    Exercise("normalize_matrix", f"{PACKAGE}.pruning:normalize_matrix", "function", "normalize_matrix",
             difficulty=1, importance=2, minutes=(5, 5)),
)
"""

TEST_MODULE = '''
"""normalize_matrix: |A| with each row divided by its sum."""

from ..pruning import normalize_matrix
from .compare import _close, _tensor, _worst
from .messages import _Fail
from .running import _public_test, _run


@_public_test("normalize_matrix")
def test_normalize_matrix(fn, w):
    """Row-normalised |A| on the toy graph."""
    A = w.adjacency.float()
    got = _tensor(_run(fn, A.clone(), what="normalize_matrix"), "normalize_matrix(A)", shape=tuple(A.shape))
    if not _close(got, normalize_matrix(A), 1e-6):
        raise _Fail(f"normalize_matrix(A) should be |A| / row sums, {_worst(got, normalize_matrix(A))}.")
'''

LESSON_BLOCK = """

### Exercise: implement `normalize_matrix`

<!-- exercise normalize_matrix -->

Divide each row of |A| by its sum.

```exercise normalize_matrix
```

```python
tests.test_normalize_matrix(normalize_matrix)
```
"""

CHECK = """
import sys
sys.path.insert(0, "tests")
from part3_attribution_graphs import solutions, tests
from part3_attribution_graphs.tools import notebook_builder as nbb
import test_autograder, test_notebooks

tests.test_normalize_matrix(solutions.normalize_matrix)
assert "normalize_matrix" in test_autograder.REFERENCE
assert ("normalize_matrix", "test_normalize_matrix") in test_notebooks.EXERCISES
code = [c.source for c in nbb.build(("exercises",))["exercises"].cells]
i = next(i for i, src in enumerate(code) if "normalize_matrix = solutions.normalize_matrix" in src)
assert 'raise NotImplementedError("Exercise normalize_matrix: replace this line with your code")' in code[i]
assert code[i + 1] == "tests.test_normalize_matrix(normalize_matrix)"
print("picked up")
"""


def test_adding_one_record_is_all_it_takes(tmp_path):
    """In a copy of the project: one record, one test module, one lesson block; nothing else is edited."""
    for folder in ("part3_attribution_graphs", "notebook_source", "tests"):
        shutil.copytree(nbb.ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    package = tmp_path / "part3_attribution_graphs"
    with open(package / "exercises.py", "a", encoding="utf-8") as f:
        f.write(RECORD)
    (package / "tests" / "normalize_matrix.py").write_text(textwrap.dedent(TEST_MODULE), encoding="utf-8")
    with open(tmp_path / "notebook_source" / "attribution_graphs.md", "a", encoding="utf-8") as f:
        f.write(LESSON_BLOCK)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "picked up" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
