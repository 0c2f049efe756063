"""What the exercises check: for every function a learner writes, the cases it runs on, minipeft's
own solution (which gives the expected outputs), and the usual mistakes with the hint each one
earns.

An `Exercise` is data; `minipeft.course.feedback` is the machinery that uses it (instant feedback
with `check`), and `minipeft.course.grader` grades whole notebooks. Each exercise has

- `make_cases(draw)`: named cases with random inputs drawn from one seed (`Draw`), edge cases
  included;
- `run(solution, inputs)`: calls a solution on one case's inputs, the same way for the learner's
  function, minipeft's reference and the mistakes, and collects what it returns as named outputs;
- `reference`: the right answer, written with minipeft's own modules (lora, memory, quant), so the
  expected outputs always come from the package the lessons teach;
- `mistakes`: wrong solutions, written the way learners get it wrong (the scaling forgotten, the
  nibbles swapped, ...). When a learner's outputs match one of them, its hint explains the slip.
  This is how a check diagnoses behaviour without reading source code.

Each lesson's exercises live in their own file here, `lessonNN.py`, found and imported when this
package is. Adding the exercise of a new lesson touches no shared file: write
`solutions/NN_name.ipynb` (solution code between `### BEGIN SOLUTION` / `### END SOLUTION`, then a
cell `check("name", name)`), and a new `lessonNN.py` that `register`s an `Exercise` with
`notebook="NN_name"`: a reference, a `run`, at least three cases, and the usual mistakes.
"""
from __future__ import annotations

import importlib
import pkgutil
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

Inputs = dict[str, Any]   # tensors, and JSON values (numbers, strings, lists, dicts)
Outputs = dict[str, Any]  # what `Exercise.run` collects: tensors and numbers, by name


class Draw:
    """Random inputs from one seed: the same seed gives the same cases in every process."""

    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(str(seed))  # str seeds are hashed the same way in every process
        self.generator = torch.Generator().manual_seed(self.rng.getrandbits(63))

    def tensor(self, *shape: int, dtype: torch.dtype = torch.float32,
               scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.generator) * scale).to(dtype)

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high], both included."""
        return self.rng.randint(low, high)

    def seed(self) -> int:
        return self.rng.getrandbits(31)


@dataclass(frozen=True)
class Case:
    name: str       # what the report calls it, e.g. "rank 1" or "bf16"
    inputs: Inputs
    hint: str = ""  # for a failure on this case that no usual mistake explains


@dataclass(frozen=True)
class Mistake:
    hint: str
    solution: Callable  # a wrong solution, with the learner's signature


@dataclass(frozen=True)
class Exercise:
    name: str                              # the function the learner writes, and the name
                                           # `check` takes
    notebook: str                          # the stem of its notebook in solutions/ and exercises/
    make_cases: Callable[[Draw], list[Case]]
    run: Callable[[Callable, Inputs], Outputs]
    reference: Callable
    mistakes: tuple[Mistake, ...] = ()
    error_hints: tuple[tuple[str, str], ...] = ()  # (regex on "ErrorType: message", hint)
    hint: str = ""                         # when no usual mistake explains a difference
    tolerance: float | None = None         # max |got - expected| / max |expected| for float
                                           # outputs; None: by dtype (feedback.TOLERANCE)
    describe: Callable[[str, int], str] | None = None  # (output, integer value) -> what the
                                           # value stands for, shown where an answer differs


EXERCISES: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    if exercise.name in EXERCISES:
        raise ValueError(f"an exercise named {exercise.name!r} is already registered: "
                         "pick another name")
    EXERCISES[exercise.name] = exercise
    return exercise


def exercises_of(notebook: str) -> list[Exercise]:
    """The exercises of one notebook, in the order they were registered (the notebook's order)."""
    return [e for e in EXERCISES.values() if e.notebook == notebook]


def notebooks() -> list[str]:
    return sorted({e.notebook for e in EXERCISES.values()})


def _import_lesson_checks() -> None:
    """Import every `lessonNN` module of this package: each registers its lesson's exercises."""
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)
                         if m.name.startswith("lesson")):
        importlib.import_module(f"{__name__}.{module}")


_import_lesson_checks()
