"""The command that grades a submitted exercise notebook.

An instructor (or CI) grades a whole notebook with

    python -m minipeft.course.grader submitted.ipynb [--json out.json] [--csv out.csv]
                                     [--cell-timeout 60]

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
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from minipeft.course.checks import EXERCISES, Case, Exercise, Outputs, exercises_of, notebooks
from minipeft.course.feedback import (ANSWERED, ERROR, MISSING, NO_ANSWER, NOT_ATTEMPTED, PASS,
                                      Answer, CaseTimeout, ExerciseResult, Foreign, answer,
                                      cases_for, judge, shorten)

MAX_ANSWER_BYTES = 64 * 2**20     # an answer file bigger than this is ignored
DEFAULT_CELL_TIMEOUT = 60         # seconds per notebook cell
DEFAULT_CASE_TIMEOUT = 10         # seconds per call of a learner's function
MAX_RESTARTS = 3                  # after this many stopped cells, the rest of the notebook is
                                  # skipped
KERNEL_ENV = {"MINIPEFT_PROFILE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}

# --------------------------------------------------------------------------------------------------
# Inside the submitted notebook's kernel: answer the grader's questions, nothing else
# --------------------------------------------------------------------------------------------------

def _case_file(exercise_index: int, case_index: int) -> str:
    return f"{exercise_index}-{case_index}.safetensors"


def write_questions(path: Path, exercises: list[Exercise], cases: list[list[Case]]) -> None:
    """The cases' inputs for the kernel: tensors as tensors, everything else as JSON in the
    metadata.
    """
    from safetensors.torch import save_file

    tensors, plan = {}, []
    for e, (exercise, exercise_cases) in enumerate(zip(exercises, cases)):
        plan.append({"exercise": exercise.name, "cases": []})
        for c, case in enumerate(exercise_cases):
            values = {}
            for key, value in case.inputs.items():
                if isinstance(value, torch.Tensor):
                    # no shared memory: safetensors refuses it
                    tensors[f"{e}/{c}/{key}"] = value.contiguous().clone()
                else:
                    values[key] = value
            plan[-1]["cases"].append({"name": case.name, "values": values})
    save_file(tensors, str(path), metadata={"plan": json.dumps(plan)})


def answer_questions(questions: str, answers_dir: str, namespace: dict,
                     case_timeout: float) -> None:
    """Run in the learner's kernel by the grader's injected cell: answer each case into its own
    file.

    One file per case, written as soon as the case is done, so a function that hangs loses only its
    own cases. Each call has `case_timeout` seconds (where the platform has SIGALRM).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(questions, framework="pt") as f:
        plan = json.loads(f.metadata()["plan"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for e, item in enumerate(plan):
        for c, spec in enumerate(item["cases"]):
            prefix = f"{e}/{c}/"
            inputs = spec["values"] | {k[len(prefix):]: v for k, v in tensors.items()
                                       if k.startswith(prefix)}
            try:
                result = _answer_case(item["exercise"], Case(spec["name"], inputs), namespace,
                                      case_timeout)
            except Exception as error:
                # the notebook broke the checks themselves (e.g. replaced minipeft's)
                result = Answer(ERROR, error=shorten(f"{type(error).__name__}: {error} (inside "
                                                     f"the grader's checks: did the notebook "
                                                     f"change minipeft?)"))
            out_tensors = {k: v for k, v in result.outputs.items() if isinstance(v, torch.Tensor)}
            values = {k: asdict(v) if isinstance(v, Foreign) else v
                      for k, v in result.outputs.items() if not isinstance(v, torch.Tensor)}
            metadata = {"status": result.status, "error": result.error,
                        "values": json.dumps(values)}
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
    """`with _time_limit(s):` raises CaseTimeout in the main thread after s seconds (no-op without
    SIGALRM).
    """

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
    """One answer file, read as data only; anything malformed is an answer that failed, never a
    crash.
    """
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
                value = Foreign(shorten(value.get("type_name", "?"), 40),
                                shorten(value.get("text", ""), 60))
            elif not isinstance(value, (int, float)):
                raise ValueError(f"output {key!r} is neither a tensor nor a number")
            outputs[key] = value
        return Answer(status, outputs, shorten(metadata.get("error", "")))
    except Exception as e:  # a tampered or truncated file
        return Answer(ERROR, error=shorten(f"unreadable answer ({type(e).__name__}: {e})"))


# --------------------------------------------------------------------------------------------------
# The grader: run the notebook, then the questions, then judge
# --------------------------------------------------------------------------------------------------

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
                "exercises": [{"name": e.name, "passed": e.passed, "total": e.total,
                               "status": e.status, "cases": [asdict(c) for c in e.cases]}
                              for e in self.exercises]}

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["notebook", "assignment", "exercise", "passed", "total", "status"])
            for e in self.exercises:
                writer.writerow([self.notebook, self.assignment, e.name, e.passed, e.total,
                                 e.status])
            writer.writerow([self.notebook, self.assignment, "total", self.score, self.max_score,
                             ""])


def assignment_of(nb, path: Path) -> str:
    """Which exercise notebook a submission is: its metadata (set by the generator), else its file
    name.
    """
    named = nb.metadata.get("minipeft", {}).get("assignment")
    if named in notebooks():
        return named
    for candidate in notebooks():
        if path.stem.startswith(candidate) or path.stem.startswith(candidate.split("_")[0] + "_"):
            return candidate
    raise ValueError(f"cannot tell which exercise notebook {path.name} is (no minipeft metadata, "
                     f"and the file name does not start with one of {notebooks()}). "
                     "Pass --assignment NAME.")


class StoppedCell(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def _quiet_client_class():
    from nbclient import NotebookClient

    class QuietClient(NotebookClient):
        """Keeps no output at all, only the first line of each error: printing cannot use up
        memory.
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.errors: dict[int, str] = {}  # cell index -> "ErrorType: first line"

        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "error":
                content = msg["content"]
                first_line = str(content.get("evalue", "")).split("\n")[0]
                self.errors[cell_index] = shorten(f"{content.get('ename', 'Error')}: {first_line}",
                                                  200)
            return None

    return QuietClient


def run_notebook(nb, cwd: Path, harness: str, cell_timeout: float,
                 harness_timeout: float) -> list[str]:
    """Execute the notebook's code cells, then `harness`, in one fresh kernel; return the problems
    met.

    A cell that runs past `cell_timeout` or stops the kernel is skipped and the notebook started
    again without it (at most MAX_RESTARTS times; after that, the rest of the notebook is skipped
    too).
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
    # the offline profile unless the caller's environment says otherwise
    env = {**KERNEL_ENV, **os.environ}
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
                        skipped.setdefault(i, "not run: too many cells stopped the kernel "
                                              "before it")
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
        raise ValueError(f"no exercises are registered for {assignment!r}: choose one of "
                         f"{notebooks()}")
    seed = secrets.randbelow(2**31) if seed is None else seed
    cases = [cases_for(exercise, seed) for exercise in exercises]

    workdir = Path(tempfile.mkdtemp(prefix="minipeft-grading-"))
    try:
        questions, answers_dir = workdir / "questions.safetensors", workdir / "answers"
        answers_dir.mkdir()
        write_questions(questions, exercises, cases)
        harness = (f"import minipeft.course.grader\n"
                   f"minipeft.course.grader.answer_questions({str(questions)!r}, "
                   f"{str(answers_dir)!r}, globals(), {case_timeout!r})")
        n_cases = sum(map(len, cases))
        problems = run_notebook(nb, path.parent.resolve(), harness, cell_timeout,
                                harness_timeout=60 + n_cases * case_timeout)
        results = [judge(exercise, exercise_cases,
                         [read_answer(answers_dir / _case_file(e, c))
                          for c in range(len(exercise_cases))])
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
                yield (f"{e.name} / {c.name}: {c.message}"
                       + (f"\n    hint: {c.hint}" if c.hint else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipeft.course.grader",
                                     description="Execute a submitted exercise notebook and "
                                                 "grade it.")
    parser.add_argument("notebook", help="the submitted .ipynb")
    parser.add_argument("--json", type=Path, help="write the full result (every case) as JSON here")
    parser.add_argument("--csv", type=Path, help="write the score table as CSV here")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT,
                        help=f"seconds per notebook cell (default {DEFAULT_CELL_TIMEOUT})")
    parser.add_argument("--case-timeout", type=float, default=DEFAULT_CASE_TIMEOUT,
                        help=f"seconds per call of a learner's function "
                             f"(default {DEFAULT_CASE_TIMEOUT})")
    parser.add_argument("--assignment", choices=notebooks(),
                        help="which exercise notebook this is (default: from its metadata or "
                             "file name)")
    parser.add_argument("--seed", type=int,
                        help="seed of the cases' inputs (default: a random one, printed)")
    args = parser.parse_args(argv)
    try:
        grade = grade_notebook(args.notebook, args.assignment, args.seed, args.cell_timeout,
                               args.case_timeout)
    except ValueError as e:
        parser.error(str(e))
    print(f"{grade.notebook}: assignment {grade.assignment}, seed {grade.seed}, graded in "
          f"{grade.seconds:.0f} s")
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
