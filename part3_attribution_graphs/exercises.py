"""The lesson's exercises, one record each: the single list that everything else derives from.

`solutions` re-exports each record's reference, the autograder package (`tests`) exports each record's
`test_<name>`, the notebook builder renders each header and stub from it and refuses an exercise it does
not know, and the pytest suite parametrises over it. To add an exercise:

1. write the reference in its stage module (e.g. `pruning.py`);
2. add a record below;
3. write its autograder test, `part3_attribution_graphs/tests/<autograder>.py`, defining
   `test_<name>` with the `@_public_test("<name>")` decorator (see any existing test module);
4. add one block to the lesson source: the heading, `<!-- exercise <name> -->` where the header goes,
   the prose and hints, the ```` ```exercise <name> ```` fence, and a cell calling `tests.test_<name>(...)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

__all__ = ["Exercise", "EXERCISES", "get", "names"]

PACKAGE = __name__.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Exercise:
    """One exercise of the lesson."""

    name: str  # the exercise's id; its autograder test is `tests.test_<name>`
    reference: (
        str  # "module:qualname" of the reference answer, e.g. "part3_attribution_graphs.nodes:prune_nodes"
    )
    expects: Literal["function", "class"]  # what the learner passes to the test
    autograder: str  # the module of `part3_attribution_graphs.tests` that defines `test_<name>`
    difficulty: int  # 1..5, shown as red dots in the lesson header
    importance: int  # 1..5, shown as blue dots
    minutes: tuple[int, int]  # suggested time, (low, high); equal for a single figure

    def __post_init__(self) -> None:
        if ":" not in self.reference or not self.name.isidentifier():
            raise ValueError(
                f"Exercise {self.name!r}: reference must read 'module:qualname', got {self.reference!r}."
            )
        if self.expects not in ("function", "class"):
            raise ValueError(
                f"Exercise {self.name!r}: expects must be 'function' or 'class', got {self.expects!r}."
            )
        if not (1 <= self.difficulty <= 5 and 1 <= self.importance <= 5):
            raise ValueError(f"Exercise {self.name!r}: difficulty and importance are 1..5.")
        if not 0 < self.minutes[0] <= self.minutes[1]:
            raise ValueError(f"Exercise {self.name!r}: minutes must be (low, high) with 0 < low <= high.")

    @property
    def qualname(self) -> str:
        """The name the learner defines in the notebook (and `solutions` exports)."""
        return self.reference.split(":", 1)[1]

    @property
    def module(self) -> str:
        return self.reference.split(":", 1)[0]

    @property
    def test_name(self) -> str:
        return f"test_{self.name}"

    @property
    def autograder_module(self) -> str:
        return f"{PACKAGE}.tests.{self.autograder}"

    def load_reference(self) -> object:
        """The reference function or class."""
        obj: object = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def header_markdown(self) -> str:
        """The header block the lesson shows under the exercise's heading."""
        low, high = self.minutes
        time = f"{low} minutes" if low == high else f"{low}–{high} minutes"
        return (
            f"> **Difficulty**: {'🔴' * self.difficulty}{'⚪' * (5 - self.difficulty)}\n"
            f"> **Importance**: {'🔵' * self.importance}{'⚪' * (5 - self.importance)}\n"
            ">\n"
            f"> Suggested time: {time}."
        )


EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        "transcoder_replacement_hooks",
        f"{PACKAGE}.replacement:TranscoderReplacementHooks",
        "class",
        "transcoder_replacement_hooks",
        difficulty=3,
        importance=5,
        minutes=(25, 30),
    ),
    Exercise(
        "compute_salient_logits",
        f"{PACKAGE}.nodes:compute_salient_logits",
        "function",
        "compute_salient_logits",
        difficulty=2,
        importance=3,
        minutes=(10, 10),
    ),
    Exercise(
        "build_embedding_nodes",
        f"{PACKAGE}.nodes:build_embedding_nodes",
        "function",
        "build_embedding_nodes",
        difficulty=1,
        importance=3,
        minutes=(5, 10),
    ),
    Exercise(
        "build_intermediate_nodes",
        f"{PACKAGE}.nodes:build_intermediate_nodes",
        "function",
        "build_intermediate_nodes",
        difficulty=3,
        importance=4,
        minutes=(20, 20),
    ),
    Exercise(
        "prepare_backward_batches",
        f"{PACKAGE}.attribution:prepare_backward_batches",
        "function",
        "prepare_backward_batches",
        difficulty=2,
        importance=3,
        minutes=(10, 15),
    ),
    Exercise(
        "compute_adjacency_matrix",
        f"{PACKAGE}.attribution:compute_adjacency_matrix",
        "function",
        "compute_adjacency_matrix",
        difficulty=3,
        importance=5,
        minutes=(20, 30),
    ),
    Exercise(
        "compute_influence",
        f"{PACKAGE}.pruning:compute_influence",
        "function",
        "compute_influence",
        difficulty=2,
        importance=4,
        minutes=(15, 15),
    ),
    Exercise(
        "prune_nodes",
        f"{PACKAGE}.pruning:prune_nodes",
        "function",
        "prune_nodes",
        difficulty=2,
        importance=3,
        minutes=(10, 15),
    ),
    Exercise(
        "prune_edges",
        f"{PACKAGE}.pruning:prune_edges",
        "function",
        "prune_edges",
        difficulty=3,
        importance=3,
        minutes=(15, 15),
    ),
    Exercise(
        "run_with_latent_set",
        f"{PACKAGE}.interventions:run_with_latent_set",
        "function",
        "run_with_latent_set",
        difficulty=2,
        importance=4,
        minutes=(15, 15),
    ),
    Exercise(
        "predicted_effects",
        f"{PACKAGE}.interventions:predicted_effects",
        "function",
        "predicted_effects",
        difficulty=3,
        importance=4,
        minutes=(15, 20),
    ),
    Exercise(
        "strongest_path",
        f"{PACKAGE}.case_study:strongest_path",
        "function",
        "strongest_path",
        difficulty=3,
        importance=3,
        minutes=(15, 25),
    ),
    Exercise(
        "swap_group",
        f"{PACKAGE}.case_study:swap_group",
        "function",
        "swap_group",
        difficulty=2,
        importance=4,
        minutes=(10, 15),
    ),
)


def names() -> list[str]:
    """The exercises' names, in lesson order."""
    return [e.name for e in EXERCISES]


def get(name: str) -> Exercise:
    """The record called `name`; a KeyError naming the registered exercises otherwise."""
    for e in EXERCISES:
        if e.name == name:
            return e
    raise KeyError(f"No exercise {name!r} in part3_attribution_graphs/exercises.py; registered: {names()}.")
