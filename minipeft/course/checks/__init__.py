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

A `Question` is a concept check: multiple choice or a number, with an explanation for the right
answer and for each usual wrong one (`feedback.quiz` asks it; the grader counts it).

Each lesson's exercises live in their own file here, `lessonNN.py`, found and imported when this
package is. Adding the exercise of a new lesson touches no shared file: write
`solutions/NN_name.ipynb` (solution code between `### BEGIN SOLUTION` / `### END SOLUTION`, then a
cell `check("name", name)`), and a new `lessonNN.py` that `register`s an `Exercise` with
`notebook="NN_name"`: a reference, a `run`, at least three cases, and the usual mistakes; then
three to five `Question`s, each asked in the notebook with `quiz("name", answer)`.
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
    at_least: tuple[str, ...] = ()         # outputs where the reference gives a floor to
                                           # reach (an accuracy), not a value to equal
    seconds: float | None = None           # a case that trains a model: its time limit in
                                           # the grader, and it runs on all CPU threads
    allowed: tuple[str, ...] = ()          # minipeft names (prefixes) an answer may use
                                           # without being flagged as borrowed


# A one-layer BERT classifier small enough for a check to build many times a second.
TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=16, num_labels=2)


def tiny_bert_weights(draw: Draw, config: dict) -> Inputs:
    """A case's inputs describing a freshly initialised BERT classifier: its config and weights
    (drawn from the case's seed, not the caller's random state)."""
    from transformers import BertConfig, BertForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(draw.seed())
        weights = BertForSequenceClassification(BertConfig(**config)).state_dict()
    return {"config": config} | {f"weights.{k}": v for k, v in weights.items()}


def tiny_bert(inputs: Inputs) -> torch.nn.Module:
    """The BERT classifier that `tiny_bert_weights` described, in eval mode (as from_pretrained
    returns it)."""
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(**inputs["config"]))
    model.load_state_dict({k.removeprefix("weights."): v for k, v in inputs.items()
                           if k.startswith("weights.")})
    return model.eval()


QuizAnswer = str | int | float   # a concept check's answer: an option's letter, or a number


@dataclass(frozen=True)
class Question:
    """A concept check: a short question answered in the notebook with `quiz(name, answer)`.

    Multiple choice when `options` is given (letters to texts; `answer` is a letter), else a
    number (`answer` a number, right within `tolerance`, relative). `why` is shown with a right
    answer; `wrong` explains the usual wrong ones (each option that is not the answer, for multiple
    choice), `otherwise` any other.
    """
    name: str
    notebook: str
    text: str
    answer: QuizAnswer
    why: str
    wrong: dict[QuizAnswer, str]
    options: dict[str, str] | None = None
    otherwise: str = ""
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.options is not None:
            unexplained = set(self.options) - set(self.wrong) - {self.answer}
            if self.answer not in self.options or unexplained:
                raise ValueError(f"question {self.name!r}: the answer must be an option, and "
                                 f"every other option needs its explanation "
                                 f"(missing: {sorted(unexplained)})")


EXERCISES: dict[str, Exercise] = {}
QUESTIONS: dict[str, Question] = {}


def register(item: Exercise | Question) -> Exercise | Question:
    """Add an exercise or a concept check; the names of both share one namespace (a gradebook
    column each)."""
    if item.name in EXERCISES or item.name in QUESTIONS:
        raise ValueError(f"an exercise or question named {item.name!r} is already registered: "
                         "pick another name")
    (QUESTIONS if isinstance(item, Question) else EXERCISES)[item.name] = item
    return item


def questions_of(notebook: str) -> list[Question]:
    """The concept checks of one notebook, in the order they were registered."""
    return [q for q in QUESTIONS.values() if q.notebook == notebook]


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
