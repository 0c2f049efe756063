"""Exercises with instant feedback, and the command that grades a submitted notebook.

In a notebook, after writing a function:

    from minipeft.grading import check
    check("lora_forward", lora_forward)

runs it on every case of the exercise (`minipeft.checks`), compares what it returns with what
minipeft's own implementation returns on the same inputs, and prints which cases pass; for a case
that fails, what was expected, what came back, and a hint about the usual mistake behind it. A
function that still raises NotImplementedError (the placeholder of exercises/) is "not attempted
yet"; any other exception is reported in one line, never as a traceback.

An instructor (or CI) grades a whole notebook with

    python -m minipeft.grading submitted.ipynb [--json out.json] [--csv out.csv] [--cell-timeout 60]

which executes it headlessly, grades every exercise of its assignment, prints a score table, and
writes it as JSON and/or CSV. A score is the number of cases that pass.

How grading works, and what it protects against
-----------------------------------------------
1. The grader process draws the cases (from `--seed`, random by default, so answers cannot be
   hard-coded) and keeps them.
2. The notebook runs in a fresh Jupyter kernel (a separate process, through nbclient) with a time
   limit per cell. Its output is thrown away as it arrives (only the first line of each error is
   kept), so printing cannot exhaust memory. A cell that raises is noted and execution goes on; a
   cell that runs past its limit or kills the kernel is noted and skipped, and the notebook is run
   again from the start without it.
3. After the learner's cells, one injected cell *only answers questions*: it reads the cases'
   inputs (a safetensors file written at that moment), calls the learner's functions on them with
   a time limit per case, and writes what came back to one safetensors file per case (tensors, and
   numbers as JSON metadata). Nothing is pickled: a file can hold data only.
4. The grader reads those files (size-capped, data only) and judges them against the reference
   outputs it computes itself, in its own process, with minipeft as imported there.

So nothing the notebook does can change the expected outputs or the comparison: monkeypatching
minipeft inside the kernel, printing endlessly, looping, raising, or exiting only ever changes the
notebook's own answers. What this does not protect against: the kernel runs as the grading user,
with that user's files and network. A hostile notebook can do anything that user can (read or
overwrite files, including this module). Grade untrusted submissions in a throw-away container
or VM without network. And a check judges behaviour, not source: a function that calls minipeft's
own implementation passes.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import numbers
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from minipeft.checks import EXERCISES, Case, Draw, Exercise, Outputs, exercises_of, notebooks

# Relative tolerance on float tensors and numbers: max |got - expected| <= TOLERANCE * max |expected|.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NUMBER_TOLERANCE = 1e-4  # relative, on numbers (a loss, say); counts (ints) must be exact

# What came back from one call (an Answer's status) ...
ANSWERED, ERROR, NOT_ATTEMPTED, MISSING, NO_ANSWER = "answered", "error", "not attempted", "missing", "no answer"
# ... and the verdict on it (a CaseResult's status: PASS, FAIL, or the Answer's status when nothing came back)
PASS, FAIL = "pass", "fail"
MAX_MESSAGE_CHARS = 300           # an error message, or the first line of one, is cut here
MAX_ANSWER_BYTES = 64 * 2**20     # an answer file bigger than this is ignored
DEFAULT_CELL_TIMEOUT = 60         # seconds per notebook cell
DEFAULT_CASE_TIMEOUT = 10         # seconds per call of a learner's function
MAX_RESTARTS = 3                  # after this many stopped cells, the rest of the notebook is skipped
KERNEL_ENV = {"MINIPEFT_PROFILE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}


# ---------------------------------------------------------------------------------------------------
# Answers: what a function returned on one case, in a form that can cross a process boundary
# ---------------------------------------------------------------------------------------------------

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


class CaseTimeout(BaseException):
    """Raised inside a learner's function that runs too long (a BaseException: `except Exception` cannot eat it)."""


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
    return Foreign(type(value).__name__, _shorten(repr(value), 60))


def _shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fresh(inputs: dict) -> dict:
    """A private copy of a case's inputs: a function that changes its arguments in place changes only its copy."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in inputs.items()}


def answer(exercise: Exercise, solution: Callable, case: Case) -> Answer:
    """Run `solution` on one case; exceptions become an Answer.

    One CPU thread, in every process: the cases are tiny (threads only cost time, a lot of it on a busy
    machine) and one thread sums in the same order everywhere. The caller's thread count and random state
    are restored afterwards.
    """
    try:
        with _one_thread(), torch.random.fork_rng(devices=[]):
            outputs = exercise.run(solution, _fresh(case.inputs))
    except NotImplementedError:
        return Answer(NOT_ATTEMPTED)
    except (Exception, SystemExit, CaseTimeout) as e:
        return Answer(ERROR, error=_shorten(f"{type(e).__name__}: {e}"))
    return Answer(ANSWERED, {key: _portable(value) for key, value in outputs.items()})


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Judging: compare with the reference, and explain a difference
# ---------------------------------------------------------------------------------------------------

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


def difference(expected: Outputs, got: Outputs, tolerance: float | None = None) -> Difference | None:
    """The first output of `got` that does not match `expected`, described; None when all match."""
    for key, want in expected.items():
        have = got.get(key, Foreign("NoneType", "nothing"))
        if isinstance(want, torch.Tensor):
            found = _tensor_difference(want, have, tolerance)
        else:
            found = _number_difference(want, have, tolerance)
        if found:
            return Difference(key, found.kind, f"{key}: {found.message}")
    return None


def _tensor_difference(want: torch.Tensor, have: Any, tolerance: float | None) -> Difference | None:
    if not isinstance(have, torch.Tensor):
        return Difference("", "type", f"expected a tensor of shape {tuple(want.shape)}, got {have}")
    if have.shape != want.shape:
        return Difference("", "shape", f"expected shape {tuple(want.shape)}, got {tuple(have.shape)}")
    if have.dtype != want.dtype:
        return Difference("", "dtype", f"expected dtype {want.dtype}, got {have.dtype}")
    if want.numel() == 0:
        return None
    if not want.is_floating_point():
        wrong = (have != want).flatten().nonzero()
        if len(wrong) == 0:
            return None
        i = wrong[0].item()
        return Difference("", "value", f"{len(wrong)} of {want.numel()} values differ; the first at "
                                   f"{_index(i, want.shape)}: expected {want.flatten()[i].item()}, "
                                   f"got {have.flatten()[i].item()}")
    want64, have64 = want.double(), have.double()
    if not torch.equal(want64.isnan(), have64.isnan()):
        i = (want64.isnan() != have64.isnan()).flatten().nonzero()[0].item()
        return Difference("", "value", f"at {_index(i, want.shape)}: expected {want64.flatten()[i].item():.4g}, "
                                   f"got {have64.flatten()[i].item():.4g}")
    error = (have64 - want64).nan_to_num(0.0).abs()
    scale = want64.nan_to_num(0.0).abs().max().item()
    limit = (tolerance if tolerance is not None else TOLERANCE.get(want.dtype, 1e-4)) * max(scale, 1e-12)
    if error.max().item() <= limit:
        return None
    i = error.flatten().argmax().item()
    return Difference("", "value", f"largest difference at {_index(i, want.shape)}: expected "
                               f"{want64.flatten()[i].item():.4g}, got {have64.flatten()[i].item():.4g}")


def _number_difference(want: float | int, have: Any, tolerance: float | None) -> Difference | None:
    if isinstance(have, torch.Tensor) and have.numel() == 1 and not have.dtype.is_complex:
        have = have.item()  # a 0-d tensor where a number is expected is fine
    if not isinstance(have, (int, float)) or isinstance(have, bool):
        return Difference("", "type", f"expected the number {_number(want)}, got {have}")
    if isinstance(want, int):
        if have == want:
            return None
    elif math.isclose(have, want, rel_tol=tolerance or NUMBER_TOLERANCE, abs_tol=1e-12):
        return None
    return Difference("", "value", f"expected {_number(want)}, got {_number(have)}")


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
        if statuses == {PASS}:
            return "all pass"
        for whole in (NOT_ATTEMPTED, MISSING, NO_ANSWER):
            if statuses == {whole}:
                return whole
        return f"{self.total - self.passed} failing"

    def report(self) -> str:
        """The short text `check` prints."""
        if self.status == "all pass":
            return f"✓ {self.name}: all {self.total} cases pass ({', '.join(c.name for c in self.cases)})"
        if self.status == NOT_ATTEMPTED:
            return (f"… {self.name}: not attempted yet. Write your code in place of `raise NotImplementedError`, "
                    f"run that cell, then run this check again.")
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


def _explains(wrong: Outputs | None, got: Answer, found: Difference | None, tolerance: float | None) -> bool:
    """Does a mistake's output agree with the learner's: all of it where the learner is right, and the
    output that differs from the reference where the learner is wrong?"""
    if wrong is None or got.status != ANSWERED:
        return False
    if found is None:
        return difference(wrong, got.outputs, tolerance) is None
    key = found.key
    return difference({key: wrong[key]}, {key: got.outputs.get(key)}, tolerance) is None


def judge(exercise: Exercise, cases: list[Case], answers: list[Answer]) -> ExerciseResult:
    """Compare each answer with minipeft's reference on the same case, and explain each difference.

    A failing case's hint comes from the usual mistake that explains the learner's output on this case
    and, among those, on the most cases overall (mistakes can agree on one case and not on others).
    """
    expected = [answer(exercise, exercise.reference, case) for case in cases]
    for case, reference in zip(cases, expected):
        if reference.status != ANSWERED:
            raise RuntimeError(f"the reference of {exercise.name!r} failed on case {case.name!r}: {reference}")
    differences = [difference(ref.outputs, got.outputs, exercise.tolerance) if got.status == ANSWERED else None
                   for ref, got in zip(expected, answers)]
    explains: list[list[bool]] = []
    if any(d is not None for d in differences):
        for mistake in exercise.mistakes:
            wrong = [_safely(exercise, mistake.solution, case) for case in cases]
            explains.append([_explains(w, got, found, exercise.tolerance)
                             for w, got, found in zip(wrong, answers, differences)])

    results = []
    for i, (case, got, found) in enumerate(zip(cases, answers, differences)):
        if got.status == ANSWERED and found is None:
            results.append(CaseResult(case.name, PASS))
        elif got.status == ANSWERED:
            results.append(CaseResult(case.name, FAIL, found.message, _hint(exercise, case, found, explains, i)))
        elif got.status == ERROR:
            hints = (*exercise.error_hints, TIMEOUT_HINT)
            hint = next((h for pattern, h in hints if re.search(pattern, got.error)), "")
            results.append(CaseResult(case.name, ERROR, f"raised {got.error}", hint))
        else:
            results.append(CaseResult(case.name, got.status, got.error))
    return ExerciseResult(exercise.name, results)


def _hint(exercise: Exercise, case: Case, found: Difference, explains: list[list[bool]], i: int) -> str:
    candidates = [m for m, row in enumerate(explains) if row[i]]
    if candidates:
        best = max(candidates, key=lambda m: sum(explains[m]))  # max keeps the first of equals: registry order
        return exercise.mistakes[best].hint
    if found.kind == "type" and found.message.endswith("got None"):
        return "Your function returned None: is its `return` missing?"
    if found.kind == "dtype":
        return "Mind the dtype: convert the result to the expected one with .to(...) before returning it."
    return case.hint or exercise.hint


def cases_for(exercise: Exercise, seed: int) -> list[Case]:
    """The exercise's cases for a seed (the same in every process)."""
    with _one_thread():
        return exercise.make_cases(Draw(f"{seed}:{exercise.name}"))


def evaluate(name: str, solution: Callable, seed: int = 0) -> ExerciseResult:
    """Run exercise `name`'s checks on `solution` in this process and return the result (`check` prints it)."""
    if name not in EXERCISES:
        raise ValueError(f"there is no exercise named {name!r}: the exercises are {sorted(EXERCISES)}. "
                         f"Call check with the exercise's name and your function, e.g. check('lora_forward', "
                         f"lora_forward).")
    if not callable(solution):
        raise ValueError(f"check({name!r}, ...) needs your function as its second argument, got "
                         f"{type(solution).__name__}. Pass the function itself, without calling it: "
                         f"check({name!r}, {name}).")
    exercise = EXERCISES[name]
    cases = cases_for(exercise, seed)
    return judge(exercise, cases, [answer(exercise, solution, case) for case in cases])


def check(name: str, solution: Callable) -> None:
    """Instant feedback in a notebook: run `solution` through exercise `name`'s cases and print the report."""
    print(evaluate(name, solution).report())


# ---------------------------------------------------------------------------------------------------
# Inside the submitted notebook's kernel: answer the grader's questions, nothing else
# ---------------------------------------------------------------------------------------------------

def _case_file(exercise_index: int, case_index: int) -> str:
    return f"{exercise_index}-{case_index}.safetensors"


def write_questions(path: Path, exercises: list[Exercise], cases: list[list[Case]]) -> None:
    """The cases' inputs for the kernel: tensors as tensors, everything else as JSON in the metadata."""
    from safetensors.torch import save_file

    tensors, plan = {}, []
    for e, (exercise, exercise_cases) in enumerate(zip(exercises, cases)):
        plan.append({"exercise": exercise.name, "cases": []})
        for c, case in enumerate(exercise_cases):
            values = {}
            for key, value in case.inputs.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{e}/{c}/{key}"] = value.contiguous().clone()  # no shared memory: safetensors refuses it
                else:
                    values[key] = value
            plan[-1]["cases"].append({"name": case.name, "values": values})
    save_file(tensors, str(path), metadata={"plan": json.dumps(plan)})


def answer_questions(questions: str, answers_dir: str, namespace: dict, case_timeout: float) -> None:
    """Run in the learner's kernel by the grader's injected cell: answer each case into its own file.

    One file per case, written as soon as the case is done, so a function that hangs loses only its own
    cases. Each call has `case_timeout` seconds (where the platform has SIGALRM).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(questions, framework="pt") as f:
        plan = json.loads(f.metadata()["plan"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for e, item in enumerate(plan):
        for c, spec in enumerate(item["cases"]):
            prefix = f"{e}/{c}/"
            inputs = spec["values"] | {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                result = _answer_case(item["exercise"], Case(spec["name"], inputs), namespace, case_timeout)
            except Exception as error:  # the notebook broke the checks themselves (e.g. replaced minipeft's)
                result = Answer(ERROR, error=_shorten(f"{type(error).__name__}: {error} (inside the grader's "
                                                      f"checks: did the notebook change minipeft?)"))
            out_tensors = {k: v for k, v in result.outputs.items() if isinstance(v, torch.Tensor)}
            values = {k: asdict(v) if isinstance(v, Foreign) else v
                      for k, v in result.outputs.items() if not isinstance(v, torch.Tensor)}
            metadata = {"status": result.status, "error": result.error, "values": json.dumps(values)}
            target = Path(answers_dir) / _case_file(e, c)
            save_file(out_tensors, str(target.with_suffix(".tmp")), metadata=metadata)
            os.replace(target.with_suffix(".tmp"), target)


def _answer_case(name: str, case: Case, namespace: dict, case_timeout: float) -> Answer:
    solution = namespace.get(name)
    if not callable(solution):
        return Answer(MISSING, error=f"the notebook defines no function named {name}")
    try:
        with _time_limit(case_timeout):
            return answer(EXERCISES[name], solution, case)
    except CaseTimeout as e:  # the alarm went off just after the call returned
        return Answer(ERROR, error=str(e))


class _time_limit:
    """`with _time_limit(s):` raises CaseTimeout in the main thread after s seconds (no-op without SIGALRM)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = hasattr(signal, "SIGALRM")

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def _expire(self, signum, frame) -> None:
        raise CaseTimeout(f"ran past the {self.seconds:g} s limit of one call")

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def read_answer(path: Path) -> Answer:
    """One answer file, read as data only; anything malformed is an answer that failed, never a crash."""
    from safetensors import safe_open

    if not path.exists():
        return Answer(NO_ANSWER, error="no answer: the notebook's kernel did not get to this case "
                                       "(stopped, out of time, or the function ran too long)")
    if path.stat().st_size > MAX_ANSWER_BYTES:
        return Answer(ERROR, error=f"the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            outputs: Outputs = {key: f.get_tensor(key) for key in f.keys()}
        status = metadata.get("status")
        if status not in (ANSWERED, NOT_ATTEMPTED, ERROR, MISSING):
            raise ValueError(f"unknown status {status!r}")
        for key, value in json.loads(metadata.get("values", "{}")).items():
            if isinstance(value, dict):
                value = Foreign(_shorten(value.get("type_name", "?"), 40), _shorten(value.get("text", ""), 60))
            elif not isinstance(value, (int, float)):
                raise ValueError(f"output {key!r} is neither a tensor nor a number")
            outputs[key] = value
        return Answer(status, outputs, _shorten(metadata.get("error", "")))
    except Exception as e:  # a tampered or truncated file
        return Answer(ERROR, error=_shorten(f"unreadable answer ({type(e).__name__}: {e})"))


# ---------------------------------------------------------------------------------------------------
# The grader: run the notebook, then the questions, then judge
# ---------------------------------------------------------------------------------------------------

@dataclass
class Grade:
    notebook: str
    assignment: str
    seed: int
    exercises: list[ExerciseResult]
    notebook_problems: list[str]   # cells that raised, ran too long, or stopped the kernel
    seconds: float

    @property
    def score(self) -> int:
        return sum(e.passed for e in self.exercises)

    @property
    def max_score(self) -> int:
        return sum(e.total for e in self.exercises)

    def table(self) -> str:
        width = max([len("exercise"), *(len(e.name) for e in self.exercises)])
        lines = [f"{'exercise':<{width}}  passed  status"]
        for e in self.exercises:
            lines.append(f"{e.name:<{width}}  {e.passed:>2} / {e.total:<2} {e.status}")
        percent = 100 * self.score / self.max_score if self.max_score else 0
        lines.append(f"{'total':<{width}}  {self.score:>2} / {self.max_score:<2} {percent:.0f} %")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"notebook": self.notebook, "assignment": self.assignment, "seed": self.seed,
                "score": self.score, "max_score": self.max_score, "seconds": round(self.seconds, 1),
                "notebook_problems": self.notebook_problems,
                "exercises": [{"name": e.name, "passed": e.passed, "total": e.total, "status": e.status,
                               "cases": [asdict(c) for c in e.cases]} for e in self.exercises]}

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["notebook", "assignment", "exercise", "passed", "total", "status"])
            for e in self.exercises:
                writer.writerow([self.notebook, self.assignment, e.name, e.passed, e.total, e.status])
            writer.writerow([self.notebook, self.assignment, "total", self.score, self.max_score, ""])


def assignment_of(nb, path: Path) -> str:
    """Which exercise notebook a submission is: its metadata (set by the generator), else its file name."""
    named = nb.metadata.get("minipeft", {}).get("assignment")
    if named in notebooks():
        return named
    for candidate in notebooks():
        if path.stem.startswith(candidate) or path.stem.startswith(candidate.split("_")[0] + "_"):
            return candidate
    raise ValueError(f"cannot tell which exercise notebook {path.name} is (no minipeft metadata, and the file "
                     f"name does not start with one of {notebooks()}). Pass --assignment NAME.")


class StoppedCell(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def _quiet_client_class():
    from nbclient import NotebookClient

    class QuietClient(NotebookClient):
        """Keeps no output at all, only the first line of each error: printing cannot use up memory."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.errors: dict[int, str] = {}  # cell index -> "ErrorType: first line"

        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "error":
                content = msg["content"]
                first_line = str(content.get("evalue", "")).split("\n")[0]
                self.errors[cell_index] = _shorten(f"{content.get('ename', 'Error')}: {first_line}", 200)
            return None

    return QuietClient


def run_notebook(nb, cwd: Path, harness: str, cell_timeout: float, harness_timeout: float) -> list[str]:
    """Execute the notebook's code cells, then `harness`, in one fresh kernel; return the problems met.

    A cell that runs past `cell_timeout` or stops the kernel is skipped and the notebook started again
    without it (at most MAX_RESTARTS times; after that, the rest of the notebook is skipped too).
    """
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbformat.v4 import new_code_cell

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nb.cells.append(new_code_cell(harness))
    harness_index = len(nb.cells) - 1
    code = [i for i, c in enumerate(nb.cells[:harness_index]) if c.cell_type == "code"]
    env = {**KERNEL_ENV, **os.environ}  # the offline profile unless the caller's environment says otherwise
    skipped: dict[int, str] = {}
    QuietClient = _quiet_client_class()
    for attempt in range(len(code) + 1):
        client = QuietClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                             interrupt_on_timeout=False, store_widget_state=False,
                             resources={"metadata": {"path": str(cwd)}})
        try:
            with client.setup_kernel(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
                for i in code:
                    if i in skipped:
                        continue
                    try:
                        client.execute_cell(nb.cells[i], i)
                    except CellTimeoutError:
                        raise StoppedCell(i, f"ran past the {cell_timeout:g} s limit") from None
                    except DeadKernelError:
                        raise StoppedCell(i, "stopped the kernel") from None
                client.timeout = harness_timeout
                try:
                    client.execute_cell(nb.cells[harness_index], harness_index)
                except (CellTimeoutError, DeadKernelError) as e:
                    client.errors[harness_index] = f"the checks did not finish ({type(e).__name__})"
        except StoppedCell as stopped:
            skipped[stopped.index] = stopped.reason
            if attempt + 1 >= MAX_RESTARTS:
                for i in code:
                    if i > stopped.index:
                        skipped.setdefault(i, "not run: too many cells stopped the kernel before it")
            continue
        # Cells are numbered from 1, as a reader counts them (markdown cells included).
        problems = [f"cell {i + 1}: {reason}" for i, reason in sorted(skipped.items())]
        problems += [f"cell {i + 1} raised {error}" for i, error in sorted(client.errors.items())
                     if i != harness_index]
        if harness_index in client.errors:
            problems.append(f"the grader's checks cell: {client.errors[harness_index]}")
        return problems
    raise AssertionError("unreachable: every failed attempt skips one more cell")


def grade_notebook(path: str | Path, assignment: str | None = None, seed: int | None = None,
                   cell_timeout: float = DEFAULT_CELL_TIMEOUT,
                   case_timeout: float = DEFAULT_CASE_TIMEOUT) -> Grade:
    """Execute a submitted notebook headlessly and grade every exercise of its assignment."""
    import nbformat

    start = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no notebook at {path}: pass the path of a submitted .ipynb file")
    nb = nbformat.read(path, as_version=4)
    assignment = assignment or assignment_of(nb, path)
    exercises = exercises_of(assignment)
    if not exercises:
        raise ValueError(f"no exercises are registered for {assignment!r}: choose one of {notebooks()}")
    seed = secrets.randbelow(2**31) if seed is None else seed
    cases = [cases_for(exercise, seed) for exercise in exercises]

    workdir = Path(tempfile.mkdtemp(prefix="minipeft-grading-"))
    try:
        questions, answers_dir = workdir / "questions.safetensors", workdir / "answers"
        answers_dir.mkdir()
        write_questions(questions, exercises, cases)
        harness = (f"import minipeft.grading\nminipeft.grading.answer_questions({str(questions)!r}, "
                   f"{str(answers_dir)!r}, globals(), {case_timeout!r})")
        n_cases = sum(map(len, cases))
        problems = run_notebook(nb, path.parent.resolve(), harness, cell_timeout,
                                harness_timeout=60 + n_cases * case_timeout)
        results = [judge(exercise, exercise_cases,
                         [read_answer(answers_dir / _case_file(e, c)) for c in range(len(exercise_cases))])
                   for e, (exercise, exercise_cases) in enumerate(zip(exercises, cases))]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Grade(str(path), assignment, seed, results, problems, time.perf_counter() - start)


def _failures(grade: Grade) -> Iterator[str]:
    for e in grade.exercises:
        if e.status in (NOT_ATTEMPTED, MISSING, NO_ANSWER):
            continue
        for c in e.cases:
            if c.status != PASS:
                yield f"{e.name} / {c.name}: {c.message}" + (f"\n    hint: {c.hint}" if c.hint else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipeft.grading",
                                     description="Execute a submitted exercise notebook and grade it.")
    parser.add_argument("notebook", help="the submitted .ipynb")
    parser.add_argument("--json", type=Path, help="write the full result (every case) as JSON here")
    parser.add_argument("--csv", type=Path, help="write the score table as CSV here")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT,
                        help=f"seconds per notebook cell (default {DEFAULT_CELL_TIMEOUT})")
    parser.add_argument("--case-timeout", type=float, default=DEFAULT_CASE_TIMEOUT,
                        help=f"seconds per call of a learner's function (default {DEFAULT_CASE_TIMEOUT})")
    parser.add_argument("--assignment", choices=notebooks(),
                        help="which exercise notebook this is (default: from its metadata or file name)")
    parser.add_argument("--seed", type=int, help="seed of the cases' inputs (default: a random one, printed)")
    args = parser.parse_args(argv)
    try:
        grade = grade_notebook(args.notebook, args.assignment, args.seed, args.cell_timeout, args.case_timeout)
    except ValueError as e:
        parser.error(str(e))
    print(f"{grade.notebook}: assignment {grade.assignment}, seed {grade.seed}, graded in {grade.seconds:.0f} s")
    for problem in grade.notebook_problems:
        print(f"  note: {problem}")
    print()
    print(grade.table())
    failures = list(_failures(grade))
    if failures:
        print("\nfailing cases:")
        print("\n".join(f"  {line}" for line in failures))
    if args.json:
        args.json.write_text(json.dumps(grade.to_json(), indent=1, ensure_ascii=False) + "\n")
    if args.csv:
        grade.write_csv(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
