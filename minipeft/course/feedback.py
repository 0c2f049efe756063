"""Instant feedback on an exercise, inside the learner's notebook.

After writing a function, a learner runs

    from minipeft.course.feedback import check
    check("lora_forward", lora_forward)

which runs it on every case of the exercise (`minipeft.course.checks`), compares what it returns
with what minipeft's own implementation returns on the same inputs, and prints which cases pass;
for a case that fails, what was expected, what came back, and a hint about the usual mistake
behind it. A function that still raises NotImplementedError (the placeholder of exercises/) is
"not attempted yet"; any other exception is reported in one line, never as a traceback.

Concept checks are asked the same way, with the learner's answer in the call:

    quiz("adam_bytes", ...)       # shows the question (and, in JupyterLab or Colab, a widget to
                                  # try answers)
    quiz("adam_bytes", 16)        # says whether 16 is right, and why

The same judging (`answer`, `judge`, `judge_question`) grades whole notebooks in
`minipeft.course.grader`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from minipeft.course.checks import (EXERCISES, QUESTIONS, Case, Draw, Exercise, Outputs,
                                    Question)
# Relative tolerance on float tensors and numbers:
# max |got - expected| <= TOLERANCE * max |expected|.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NUMBER_TOLERANCE = 1e-4  # relative, on numbers (a loss, say); counts (ints) must be exact

# What came back from one call (an Answer's status) ...
ANSWERED, ERROR, NOT_ATTEMPTED, MISSING, NO_ANSWER = ("answered", "error", "not attempted",
                                                      "missing", "no answer")
# ... and the verdict on it (a CaseResult's status: PASS, FAIL, or the Answer's status when nothing
# came back)
PASS, FAIL = "pass", "fail"
MAX_MESSAGE_CHARS = 300           # an error message, or the first line of one, is cut here


# --------------------------------------------------------------------------------------------------
# Answers: what a function returned on one case, in a form that can cross a process boundary
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Foreign:
    """A returned value that is neither a tensor nor a number: kept as its type and a short repr."""
    type_name: str
    text: str

    def __str__(self) -> str:
        return "None" if self.type_name == "NoneType" else f"a {self.type_name} ({self.text})"


@dataclass
class Answer:
    status: str                           # ANSWERED, ERROR, NOT_ATTEMPTED, MISSING or NO_ANSWER
    outputs: Outputs = field(default_factory=dict)
    error: str = ""
    borrowed: list[str] = field(default_factory=list)  # see `borrowed`


class CaseTimeout(BaseException):
    """Raised inside a learner's function that runs too long (a BaseException: `except Exception`
    cannot eat it).
    """


TIMEOUT_HINT = (r"^CaseTimeout", "It did not return in time: is there a loop that never ends?")


def _portable(value: Any) -> Any:
    """A tensor (detached, on the CPU, owning its memory), a number, or a `Foreign` description."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, bool):
        return Foreign("bool", repr(value))
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return Foreign(type(value).__name__, shorten(repr(value), 60))


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fresh(inputs: dict) -> dict:
    """A private copy of a case's inputs: a function that changes its arguments in place changes
    only its copy.
    """
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in inputs.items()}


def answer(exercise: Exercise, solution: Callable, case: Case) -> Answer:
    """Run `solution` on one case; exceptions become an Answer.

    One CPU thread, in every process: the cases are tiny (threads only cost time, a lot of it on a
    busy machine) and one thread sums in the same order everywhere. An exercise whose cases train
    a model (`Exercise.seconds`) keeps all threads. The caller's thread count and
    random state are restored afterwards.
    """
    threads = _one_thread() if exercise.seconds is None else contextlib.nullcontext()
    try:
        with threads, torch.random.fork_rng(devices=[]):
            outputs = exercise.run(solution, _fresh(case.inputs))
    except NotImplementedError:
        return Answer(NOT_ATTEMPTED)
    except (Exception, SystemExit, CaseTimeout) as e:
        return Answer(ERROR, error=shorten(f"{type(e).__name__}: {e}"))
    return Answer(ANSWERED, {key: _portable(value) for key, value in outputs.items()})


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Borrowed answers: a solution that calls minipeft's own implementation
# --------------------------------------------------------------------------------------------------

OWN_MODULE = "minipeft"              # whose functions and classes an answer should not call ...
NOT_BORROWING = ("minipeft.course.feedback",)   # ... except `check` itself


def _minipeft_callable(value: Any) -> str | None:
    """'minipeft.quant.quantize_nf4' when `value` is a function or class of minipeft, else None.
    Constants (NF4_CODE, a tensor) are not answers: using them is fine."""
    module = getattr(value, "__module__", None) or ""
    if not callable(value) or not (module == OWN_MODULE or module.startswith(OWN_MODULE + ".")):
        return None
    if module.startswith(NOT_BORROWING):
        return None
    return f"{module}.{getattr(value, '__qualname__', getattr(value, '__name__', '?'))}"


def _code_names(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object uses, its nested functions' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def borrowed_in(exercise: Exercise, solution: Callable) -> list[str]:
    """`borrowed(solution)`, less what the exercise allows (e.g. the course's training loop)."""
    return [name for name in borrowed(solution) if not name.startswith(exercise.allowed)]


def borrowed(solution: Callable) -> list[str]:
    """The minipeft functions and classes `solution` uses, directly, through a module
    (`quant.quantize_nf4`), an import inside it, or the notebook's own helpers it calls; for a
    class, also its minipeft base classes and its methods; for a built model, minipeft's layers in
    it.

    Checks judge behaviour, so an answer that calls minipeft's own implementation of what the
    exercise asks for passes them; this names it, so that the learner (in `check`) and the
    instructor (in the grader's report) see it. It reads the function's bytecode names, so it is a
    signal for a shortcut, not a proof: a determined learner can hide a call.
    """
    found: set[str] = set()
    seen: set[int] = set()
    todo = [solution]
    while todo:
        function = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        if isinstance(function, type):             # a class: its minipeft bases, its methods
            found.update(filter(None, map(_minipeft_callable, function.__mro__[1:])))
            todo += [v for v in vars(function).values() if isinstance(v, types.FunctionType)]
            continue
        if isinstance(function, torch.nn.Module):  # a built model: minipeft's layers in it
            found.update(filter(None, (_minipeft_callable(type(m)) for m in function.modules())))
            continue
        code, scope = getattr(function, "__code__", None), getattr(function, "__globals__", {})
        if code is None:
            continue
        names = _code_names(code)
        for name in names:
            value = scope.get(name) if "." not in name else sys.modules.get(name)  # import a.b
            if isinstance(value, types.ModuleType) and value.__name__.startswith(OWN_MODULE):
                found.update(filter(None, (_minipeft_callable(getattr(value, attribute, None))
                                           for attribute in names)))
            elif _minipeft_callable(value):
                found.add(_minipeft_callable(value))
            elif isinstance(value, types.FunctionType) and value.__globals__ is scope:
                todo.append(value)                           # a helper of the notebook's own
            elif isinstance(value, type) and value.__module__ == scope.get("__name__"):
                todo.append(value)                           # a class of the notebook's own
    return sorted(found)


# --------------------------------------------------------------------------------------------------
# Judging: compare with the reference, and explain a difference
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    key: str       # which output
    kind: str      # "type", "shape", "dtype" or "value"
    message: str


def _number(x: float | int) -> str:
    return f"{x:,d}" if isinstance(x, int) else f"{x:.6g}"


def _index(flat: int, shape: torch.Size) -> str:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return "[" + ", ".join(map(str, reversed(index))) + "]"


def difference(expected: Outputs, got: Outputs, tolerance: float | None = None,
               describe: Callable[[str, int], str] | None = None,
               at_least: tuple[str, ...] = ()) -> Difference | None:
    """The first output of `got` that does not match `expected`, described; None when all match.
    `describe(key, value)` says what an integer value of output `key` stands for; for the outputs
    named in `at_least`, `expected` is a floor to reach."""
    for key, want in expected.items():
        have = got.get(key, Foreign("NoneType", "nothing"))
        say = describe and (lambda value, key=key: describe(key, value))
        if isinstance(want, torch.Tensor):
            found = _tensor_difference(want, have, tolerance, say)
        elif key in at_least:
            found = _floor_difference(want, have)
        else:
            found = _number_difference(want, have, tolerance, say)
        if found:
            return Difference(key, found.kind, f"{key}: {found.message}")
    return None


def _tensor_difference(want: torch.Tensor, have: Any, tolerance: float | None,
                       describe: Callable[[int], str] | None = None) -> Difference | None:
    if not isinstance(have, torch.Tensor):
        return Difference("", "type", f"expected a tensor of shape {tuple(want.shape)}, got {have}")
    if have.shape != want.shape:
        return Difference("", "shape",
                          f"expected shape {tuple(want.shape)}, got {tuple(have.shape)}")
    if have.dtype != want.dtype:
        return Difference("", "dtype", f"expected dtype {want.dtype}, got {have.dtype}")
    if want.numel() == 0:
        return None
    if not want.is_floating_point():
        wrong = (have != want).flatten().nonzero()
        if len(wrong) == 0:
            return None
        i = wrong[0].item()
        expected, got = want.flatten()[i].item(), have.flatten()[i].item()
        if describe and describe(expected):
            expected, got = f"{expected} ({describe(expected)})", f"{got} ({describe(got)})"
        return Difference("", "value", f"{len(wrong)} of {want.numel()} values differ; the first "
                                   f"at {_index(i, want.shape)}: expected {expected}, got {got}")
    want64, have64 = want.double(), have.double()
    if not torch.equal(want64.isnan(), have64.isnan()):
        i = (want64.isnan() != have64.isnan()).flatten().nonzero()[0].item()
        return Difference("", "value", f"at {_index(i, want.shape)}: expected "
                                   f"{want64.flatten()[i].item():.4g}, "
                                   f"got {have64.flatten()[i].item():.4g}")
    error = (have64 - want64).nan_to_num(0.0).abs()
    scale = want64.nan_to_num(0.0).abs().max().item()
    limit = ((tolerance if tolerance is not None else TOLERANCE.get(want.dtype, 1e-4))
             * max(scale, 1e-12))
    if error.max().item() <= limit:
        return None
    i = error.flatten().argmax().item()
    return Difference("", "value", f"largest difference at {_index(i, want.shape)}: expected "
                               f"{want64.flatten()[i].item():.4g}, "
                               f"got {have64.flatten()[i].item():.4g}")


def _as_number(have: Any) -> Any:
    if isinstance(have, torch.Tensor) and have.numel() == 1 and not have.dtype.is_complex:
        return have.item()  # a 0-d tensor where a number is expected is fine
    return have


def _number_difference(want: float | int, have: Any, tolerance: float | None,
                       describe: Callable[[int], str] | None = None) -> Difference | None:
    have = _as_number(have)
    if not isinstance(have, (int, float)) or isinstance(have, bool):
        return Difference("", "type", f"expected the number {_number(want)}, got "
                                      f"{shorten(str(have), 80)}")
    if isinstance(want, int):
        if have == want:
            return None
        if describe and isinstance(have, int) and describe(want):
            return Difference("", "value", f"expected {want} ({describe(want)}), "
                                           f"got {have} ({describe(have)})")
    elif math.isclose(have, want, rel_tol=tolerance or NUMBER_TOLERANCE, abs_tol=1e-12):
        return None
    return Difference("", "value", f"expected {_number(want)}, got {_number(have)}")


def _floor_difference(floor: float, have: Any) -> Difference | None:
    have = _as_number(have)
    if not isinstance(have, (int, float)) or isinstance(have, bool):
        return Difference("", "type", f"expected a number of at least {_number(floor)}, got "
                                      f"{shorten(str(have), 80)}")
    if have >= floor:
        return None
    return Difference("", "value", f"expected at least {_number(floor)}, got {_number(have)}")


@dataclass
class CaseResult:
    name: str
    status: str      # PASS, FAIL, ERROR, NOT_ATTEMPTED, MISSING or NO_ANSWER
    message: str = ""
    hint: str = ""


@dataclass
class ExerciseResult:
    name: str
    cases: list[CaseResult]
    borrowed: list[str] = field(default_factory=list)  # minipeft callables the answer uses
    kind: str = "exercise"                             # or "concept check"

    @property
    def passed(self) -> int:
        return sum(c.status == PASS for c in self.cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    @property
    def status(self) -> str:
        """One word for the score table."""
        statuses = {c.status for c in self.cases}
        if self.kind == "concept check":
            return {PASS: "right", FAIL: "wrong"}.get(self.cases[0].status, self.cases[0].status)
        if statuses == {PASS}:
            return "all pass"
        for whole in (NOT_ATTEMPTED, MISSING, NO_ANSWER):
            if statuses == {whole}:
                return whole
        return f"{self.total - self.passed} failing"

    def report(self) -> str:
        """The short text `check` prints."""
        if not self.borrowed:
            return self._verdict()
        return (f"{self._verdict()}\n⚑ {self.name} uses minipeft's own "
                f"{', '.join(self.borrowed)}. The checks compare behaviour, so that passes, but "
                f"the exercise is to write it yourself: your instructor's grader flags it.")

    def _verdict(self) -> str:
        if self.status == "all pass":
            return (f"✓ {self.name}: all {self.total} cases pass "
                    f"({', '.join(c.name for c in self.cases)})")
        if self.status == NOT_ATTEMPTED:
            return (f"… {self.name}: not attempted yet. Write your code in place of "
                    f"`raise NotImplementedError`, run that cell, then run this check again.")
        if self.status in (MISSING, NO_ANSWER):
            return f"✗ {self.name}: {self.cases[0].message}"
        lines = [f"✗ {self.name}: {self.passed} of {self.total} cases pass"]
        for case in self.cases:
            mark = "✓" if case.status == PASS else "✗"
            detail = f": {case.message}" if case.message else ""
            lines.append(f"  {mark} {case.name}{detail}")
            if case.hint:
                lines.append(f"      hint: {case.hint}")
        return "\n".join(lines)


def _safely(exercise: Exercise, solution: Callable, case: Case) -> Outputs | None:
    """What a (wrong) solution returns on a case, or None when it cannot run on it."""
    result = answer(exercise, solution, case)
    return result.outputs if result.status == ANSWERED else None


def _explains(wrong: Outputs | None, expected: Outputs | None, got: Answer,
              found: Difference | None, tolerance: float | None) -> bool:
    """Does a mistake's output agree with the learner's: all of it where the learner is right, and
    the output that differs from the reference where the learner is wrong?"""
    if wrong is None or got.status != ANSWERED:
        return False
    if found is None:
        return difference(wrong, got.outputs, tolerance) is None

    def agree(a: Outputs, b: Outputs, key: str) -> bool:
        return difference({key: a[key]}, {key: b.get(key)}, tolerance) is None

    return all(agree(wrong, got.outputs, key) for key in expected
               if key == found.key or agree(expected, got.outputs, key))


def judge(exercise: Exercise, cases: list[Case], answers: list[Answer]) -> ExerciseResult:
    """Compare each answer with minipeft's reference on the same case, and explain each difference.

    A failing case's hint comes from the usual mistake that explains the learner's output on this
    case and, among those, on the most cases overall (mistakes can agree on one case and not on
    others).
    """
    # The reference runs only where there is an answer to compare: an untouched exercise (a
    # training run's reference takes seconds) costs nothing to grade.
    expected = [answer(exercise, exercise.reference, case) if got.status == ANSWERED else None
                for case, got in zip(cases, answers)]
    for case, reference in zip(cases, expected):
        if reference is not None and reference.status != ANSWERED:
            raise RuntimeError(f"the reference of {exercise.name!r} failed on case "
                               f"{case.name!r}: {reference}")
    differences = [difference(ref.outputs, got.outputs, exercise.tolerance, exercise.describe,
                              exercise.at_least)
                   if got.status == ANSWERED else None
                   for ref, got in zip(expected, answers)]
    explains: list[list[bool]] = []
    if any(d is not None for d in differences):
        for mistake in exercise.mistakes:
            wrong = [_safely(exercise, mistake.solution, case) if got.status == ANSWERED
                     else None for case, got in zip(cases, answers)]
            explains.append([_explains(w, ref and ref.outputs, got, found, exercise.tolerance)
                             for w, ref, got, found in zip(wrong, expected, answers,
                                                           differences)])

    results = []
    for i, (case, got, found) in enumerate(zip(cases, answers, differences)):
        if got.status == ANSWERED and found is None:
            results.append(CaseResult(case.name, PASS))
        elif got.status == ANSWERED:
            results.append(CaseResult(case.name, FAIL, found.message,
                                      _hint(exercise, case, found, explains, i)))
        elif got.status == ERROR:
            hints = (*exercise.error_hints, TIMEOUT_HINT)
            hint = next((h for pattern, h in hints if re.search(pattern, got.error)), "")
            results.append(CaseResult(case.name, ERROR, f"raised {got.error}", hint))
        else:
            results.append(CaseResult(case.name, got.status, got.error))
    return ExerciseResult(exercise.name, results)


def _hint(exercise: Exercise, case: Case, found: Difference, explains: list[list[bool]],
          i: int) -> str:
    candidates = [m for m, row in enumerate(explains) if row[i]]
    if candidates:
        # max keeps the first of equals: registry order
        best = max(candidates, key=lambda m: sum(explains[m]))
        return exercise.mistakes[best].hint
    if found.kind == "type" and found.message.endswith("got None"):
        return "Your function returned None: is its `return` missing?"
    if found.kind == "dtype":
        return ("Mind the dtype: convert the result to the expected one with .to(...) before "
                "returning it.")
    return case.hint or exercise.hint


def cases_for(exercise: Exercise, seed: int) -> list[Case]:
    """The exercise's cases for a seed (the same in every process)."""
    with _one_thread():
        return exercise.make_cases(Draw(f"{seed}:{exercise.name}"))


def evaluate(name: str, solution: Callable, seed: int = 0) -> ExerciseResult:
    """Run exercise `name`'s checks on `solution` in this process and return the result (`check`
    prints it).
    """
    if name not in EXERCISES:
        raise ValueError(f"there is no exercise named {name!r}: the exercises are "
                         f"{sorted(EXERCISES)}. Call check with the exercise's name and your "
                         f"function, e.g. check('lora_forward', lora_forward).")
    if not callable(solution):
        raise ValueError(f"check({name!r}, ...) needs your function as its second argument, got "
                         f"{type(solution).__name__}. Pass the function itself, without calling "
                         f"it: check({name!r}, {name}).")
    exercise = EXERCISES[name]
    cases = cases_for(exercise, seed)
    result = judge(exercise, cases, [answer(exercise, solution, case) for case in cases])
    result.borrowed = borrowed_in(exercise, solution)
    return result


def check(name: str, solution: Callable) -> None:
    """Instant feedback in a notebook: run `solution` through exercise `name`'s cases and print the
    report.
    """
    print(evaluate(name, solution).report())


# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

QUIZ_ANSWERS: dict[str, Any] = {}  # the answers given in this process, read by the grader's cell
MAX_QUIZ_ANSWER_CHARS = 40


def _matches(question: Question, given: Any, expected: Any) -> bool:
    if isinstance(expected, str):
        return isinstance(given, str) and given.strip().lower() == expected.lower()
    if isinstance(given, bool) or not isinstance(given, numbers.Real):
        return False
    return math.isclose(float(given), float(expected), rel_tol=question.tolerance, abs_tol=1e-12)


def judge_question(question: Question, given: Any) -> ExerciseResult:
    """One concept check's answer as a one-case result (so tables and gradebooks count it)."""
    if given is None or given is ...:
        case = CaseResult("answer", NOT_ATTEMPTED, "not answered yet")
    elif _matches(question, given, question.answer):
        case = CaseResult("answer", PASS, question.why)
    else:
        explanation = next((text for wrong, text in question.wrong.items()
                            if _matches(question, given, wrong)), question.otherwise)
        if question.options is not None and not isinstance(given, str):
            explanation = f"Answer with an option's letter: one of {', '.join(question.options)}."
        elif question.options is None and isinstance(given, str):
            explanation = "Answer with a number."
        case = CaseResult("answer", FAIL, f"{shorten(repr(given), MAX_QUIZ_ANSWER_CHARS)} is not "
                                          f"it", explanation)
    return ExerciseResult(question.name, [case], kind="concept check")


def question_text(question: Question, how_to_answer: bool = True) -> str:
    lines = [f"? {question.name}: {question.text}"]
    lines += [f"    {letter}) {text}" for letter, text in (question.options or {}).items()]
    if how_to_answer:
        example = f'"{next(iter(question.options))}"' if question.options else "a number"
        lines.append(f'  Answer in this cell: quiz("{question.name}", {example}), then run it.')
    return "\n".join(lines)


def _quiz_report(question: Question, result: ExerciseResult) -> str:
    case = result.cases[0]
    if case.status == PASS:
        return f"✓ {question.name}: right. {case.message}"
    return f"✗ {question.name}: {case.message}. {case.hint}".rstrip()


def quiz(name: str, given: Any = ...) -> None:
    """Ask concept check `name`; with an answer, say whether it is right and why (and keep it for
    the grader)."""
    if name not in QUESTIONS:
        raise ValueError(f"there is no concept check named {name!r}: the questions are "
                         f"{sorted(QUESTIONS)}")
    question = QUESTIONS[name]
    result = judge_question(question, given)
    if result.status == NOT_ATTEMPTED:
        print(question_text(question))
        _quiz_widget(question)
        return
    QUIZ_ANSWERS[name] = given
    print(question_text(question, how_to_answer=False))
    print(_quiz_report(question, result))


def _quiz_widget(question: Question) -> None:
    """In a live notebook (JupyterLab, Colab), buttons to try answers with instant feedback. Not
    where outputs are kept (nbval, `make lessons`, the grader): there the question stays text."""
    from minipeft.course.training import progress_mode

    try:
        import ipywidgets as widgets
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if progress_mode() != "live" or not hasattr(get_ipython(), "kernel"):
        return
    if question.options:
        choice = widgets.ToggleButtons(options=list(question.options), value=None,
                                       description="answer:")
    else:
        choice = widgets.FloatText(description="answer:")
    verdict = widgets.Output()

    def on_change(change: dict) -> None:
        given = change["new"]
        if question.options is None and float(given).is_integer():
            given = int(given)
        verdict.clear_output()
        with verdict:
            print(_quiz_report(question, judge_question(question, given)))
            print(f'To hand it in, write quiz("{question.name}", {given!r}) in this cell.')

    choice.observe(on_change, names="value")
    display(widgets.VBox([choice, verdict]))
