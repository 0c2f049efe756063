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

Concept checks (`feedback.quiz`) count one point each: the injected cell also reports the answers
the notebook gave with `quiz`, as JSON data, and the grader judges them.

So nothing the notebook does can change the expected outputs or the comparison: monkeypatching
minipeft inside the kernel, printing endlessly, looping, raising, or exiting only ever changes the
notebook's own answers. What this does not protect against: the kernel runs as the grading user,
with that user's files and network. A hostile notebook can do anything that user can (read or
overwrite files, including this module). Grade untrusted submissions in a throw-away container
or VM without network.

Checks judge behaviour, so a function that calls minipeft's own implementation passes them. The
kernel also reports which minipeft functions and classes each answer uses (`feedback.borrowed`);
the report flags such an answer (table, JSON, CSV), and `--borrowed zero` gives it no points
(default `score`: flagged, points kept). The flag reads bytecode names: it catches shortcuts, not a
learner determined to hide a call, and a notebook could forge it like any of its answers.

A folder of submissions (one notebook per learner, or a folder per learner) is graded into one
gradebook: every submission on the same cases (one seed), several at a time (`--jobs`), a row each,
and a submission that cannot be graded gets a row with the reason, never stopping the rest.
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

from minipeft.course.checks import (EXERCISES, Case, Exercise, Outputs, Question, exercises_of,
                                    notebooks, questions_of)
from minipeft.course.feedback import (ANSWERED, ERROR, MAX_QUIZ_ANSWER_CHARS, MISSING, NO_ANSWER,
                                      NOT_ATTEMPTED, PASS, Answer, CaseTimeout, ExerciseResult,
                                      Foreign, answer, borrowed_in, cases_for, judge,
                                      judge_question, shorten)
from minipeft.course.runs import write_whole

MAX_ANSWER_BYTES = 64 * 2**20     # an answer file bigger than this is ignored
DEFAULT_CELL_TIMEOUT = 60         # seconds per notebook cell
DEFAULT_CASE_TIMEOUT = 10         # seconds per call of a learner's function
MAX_RESTARTS = 3                  # after this many stopped cells, the rest of the notebook is
                                  # skipped
KERNEL_ENV = {"MINIPEFT_PROFILE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
              "MINIPEFT_PROGRESS": "summary"}
# What an answer that uses minipeft's own implementation (feedback.borrowed) scores. It is always
# flagged; "score" keeps its points (checks judge behaviour, and the flag is a signal, not a proof),
# "zero" gives it none.
BORROWED_POLICIES = {"score": "flagged, points kept", "zero": "flagged, no points"}

# --------------------------------------------------------------------------------------------------
# Inside the submitted notebook's kernel: answer the grader's questions, nothing else
# --------------------------------------------------------------------------------------------------

def _case_file(exercise_index: int, case_index: int) -> str:
    return f"{exercise_index}-{case_index}.safetensors"


QUIZ_FILE = "quiz.json"            # the concept checks' answers, as the kernel recorded them
MAX_QUIZ_BYTES = 64 * 1024


def write_questions(path: Path, exercises: list[Exercise], cases: list[list[Case]],
                    questions: list[Question] = ()) -> None:
    """The cases' inputs for the kernel: tensors as tensors, everything else as JSON in the
    metadata, with the names of the concept checks to report.
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
    save_file(tensors, str(path), metadata={"plan": json.dumps(plan),
                                            "quiz": json.dumps([q.name for q in questions])})


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
        asked = json.loads(f.metadata().get("quiz", "[]"))
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    _write_quiz_answers(Path(answers_dir) / QUIZ_FILE, asked)
    for e, item in enumerate(plan):
        uses = json.dumps(_borrowed_by(EXERCISES[item["exercise"]],
                                       namespace.get(item["exercise"])))
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
                        "values": json.dumps(values),
                        "borrowed": uses}
            write_whole(Path(answers_dir) / _case_file(e, c),
                        lambda path: save_file(out_tensors, str(path), metadata=metadata))


def _write_quiz_answers(path: Path, asked: list[str]) -> None:
    """The answers the notebook gave with `quiz` (numbers and strings; anything else as its
    repr)."""
    from minipeft.course.feedback import QUIZ_ANSWERS

    given = {name: QUIZ_ANSWERS[name] for name in asked if name in QUIZ_ANSWERS}
    given = {name: value if isinstance(value, (str, int, float)) and not isinstance(value, bool)
             else shorten(repr(value), MAX_QUIZ_ANSWER_CHARS) for name, value in given.items()}
    path.write_text(json.dumps(given))


def read_quiz_answers(path: Path) -> dict[str, str | int | float]:
    """The kernel's quiz answers, read as data only (a missing or malformed file: none)."""
    try:
        if path.stat().st_size > MAX_QUIZ_BYTES:
            return {}
        given = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(given, dict):
        return {}
    return {name: shorten(value, MAX_QUIZ_ANSWER_CHARS) if isinstance(value, str) else value
            for name, value in given.items()
            if isinstance(name, str) and isinstance(value, (str, int, float))
            and not isinstance(value, bool)}


def _borrowed_by(exercise: Exercise, solution: object) -> list[str]:
    try:
        return borrowed_in(exercise, solution) if callable(solution) else []
    except Exception:  # a notebook that broke the detector is not flagged for it
        return []


def _answer_case(name: str, case: Case, namespace: dict, case_timeout: float) -> Answer:
    solution = namespace.get(name)
    if not callable(solution):
        return Answer(MISSING, error=f"the notebook defines no function named {name}")
    exercise = EXERCISES[name]
    try:
        with _time_limit(max(case_timeout, exercise.seconds or 0)):
            return answer(exercise, solution, case)
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
        uses = json.loads(metadata.get("borrowed", "[]"))
        if not isinstance(uses, list) or not all(isinstance(name, str) for name in uses):
            raise ValueError("'borrowed' is not a list of names")
        return Answer(status, outputs, shorten(metadata.get("error", "")),
                      [shorten(name, 80) for name in uses[:20]])
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
    borrowed_policy: str = "score"  # BORROWED_POLICIES: what a borrowed answer scores

    def points(self, exercise: ExerciseResult) -> int:
        """The passing cases, or 0 for a borrowed answer under the "zero" policy."""
        return 0 if exercise.borrowed and self.borrowed_policy == "zero" else exercise.passed

    @property
    def score(self) -> int:
        return sum(self.points(e) for e in self.exercises)

    @property
    def max_score(self) -> int:
        return sum(e.total for e in self.exercises)

    def table(self) -> str:
        width = max([len("exercise"), *(len(e.name) + 2 for e in self.exercises)])
        lines = [f"{'exercise':<{width}}  points  status"]
        for e in self.exercises:
            flag = f"  ⚑ borrowed: {', '.join(e.borrowed)}" if e.borrowed else ""
            name = e.name if e.kind == "exercise" else f"? {e.name}"
            lines.append(f"{name:<{width}}  {self.points(e):>2} / {e.total:<2} {e.status}{flag}")
        percent = 100 * self.score / self.max_score if self.max_score else 0
        lines.append(f"{'total':<{width}}  {self.score:>2} / {self.max_score:<2} {percent:.0f} %")
        if any(e.kind != "exercise" for e in self.exercises):
            lines.append("? a concept check: one point for the right answer")
        if any(e.borrowed for e in self.exercises):
            lines.append(f"⚑ borrowed: the answer uses minipeft's own implementation; policy "
                         f"{self.borrowed_policy!r} ({BORROWED_POLICIES[self.borrowed_policy]})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"notebook": self.notebook, "assignment": self.assignment, "seed": self.seed,
                "score": self.score, "max_score": self.max_score,
                "borrowed_policy": self.borrowed_policy, "seconds": round(self.seconds, 1),
                "notebook_problems": self.notebook_problems,
                "exercises": [{"name": e.name, "kind": e.kind, "points": self.points(e),
                               "passed": e.passed,
                               "total": e.total, "status": e.status, "borrowed": e.borrowed,
                               "cases": [asdict(c) for c in e.cases]}
                              for e in self.exercises]}

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["notebook", "assignment", "exercise", "kind", "points", "passed",
                             "total", "status", "borrowed"])
            for e in self.exercises:
                writer.writerow([self.notebook, self.assignment, e.name, e.kind, self.points(e),
                                 e.passed, e.total, e.status, "; ".join(e.borrowed)])
            writer.writerow([self.notebook, self.assignment, "total", "", self.score, "",
                             self.max_score, "", ""])


def assignment_of(nb, path: Path) -> str:
    """Which exercise notebook a submission is: its metadata (set by the generator), else its file
    name: one that contains an assignment's name ("bob-06_nf4.ipynb") or starts with its number
    ("02_mine.ipynb").
    """
    named = nb.metadata.get("minipeft", {}).get("assignment")
    if named in notebooks():
        return named
    for candidate in notebooks():
        if candidate in path.stem or path.stem.startswith(candidate.split("_")[0] + "_"):
            return candidate
    raise ValueError(f"cannot tell which exercise notebook {path.name} is (no minipeft metadata, "
                     f"and the file name names none of {notebooks()}). "
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
                   case_timeout: float = DEFAULT_CASE_TIMEOUT,
                   borrowed_policy: str = "score") -> Grade:
    """Execute a submitted notebook headlessly and grade every exercise of its assignment."""
    import nbformat

    start = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no notebook at {path}: pass the path of a submitted .ipynb file")
    nb = nbformat.read(path, as_version=4)
    assignment = assignment or assignment_of(nb, path)
    exercises, questions = exercises_of(assignment), questions_of(assignment)
    if not exercises and not questions:
        raise ValueError(f"no exercises are registered for {assignment!r}: choose one of "
                         f"{notebooks()}")
    seed = secrets.randbelow(2**31) if seed is None else seed
    cases = [cases_for(exercise, seed) for exercise in exercises]

    workdir = Path(tempfile.mkdtemp(prefix="minipeft-grading-"))
    try:
        questions_file, answers_dir = workdir / "questions.safetensors", workdir / "answers"
        answers_dir.mkdir()
        write_questions(questions_file, exercises, cases, questions)
        harness = (f"import minipeft.course.grader\n"
                   f"minipeft.course.grader.answer_questions({str(questions_file)!r}, "
                   f"{str(answers_dir)!r}, globals(), {case_timeout!r})")
        case_seconds = sum(len(c) * max(case_timeout, e.seconds or 0)
                           for e, c in zip(exercises, cases))
        problems = run_notebook(nb, path.parent.resolve(), harness, cell_timeout,
                                harness_timeout=60 + case_seconds)
        results = []
        for e, (exercise, exercise_cases) in enumerate(zip(exercises, cases)):
            answers = [read_answer(answers_dir / _case_file(e, c))
                       for c in range(len(exercise_cases))]
            results.append(judge(exercise, exercise_cases, answers))
            results[-1].borrowed = sorted({name for a in answers for name in a.borrowed})
        given = read_quiz_answers(answers_dir / QUIZ_FILE)
        results += [judge_question(q, given.get(q.name)) for q in questions]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Grade(str(path), assignment, seed, results, problems, time.perf_counter() - start,
                 borrowed_policy)


def _failures(grade: Grade) -> Iterator[str]:
    for e in grade.exercises:
        if e.status in (NOT_ATTEMPTED, MISSING, NO_ANSWER):
            continue
        for c in e.cases:
            if c.status != PASS:
                yield (f"{e.name} / {c.name}: {c.message}"
                       + (f"\n    hint: {c.hint}" if c.hint else ""))


# --------------------------------------------------------------------------------------------------
# A class: every submission in a folder, one gradebook
# --------------------------------------------------------------------------------------------------

def _grade_one(path: Path, assignment: str | None, seed: int, cell_timeout: float,
               case_timeout: float, borrowed_policy: str) -> Grade | str:
    """A Grade, or the one-line reason this submission could not be graded (never raises)."""
    try:
        return grade_notebook(path, assignment, seed, cell_timeout, case_timeout, borrowed_policy)
    except Exception as error:  # a broken or hostile submission must not stop the batch
        return shorten(f"{type(error).__name__}: {error}")


def grade_folder(folder: Path, assignment: str | None = None, seed: int | None = None,
                 cell_timeout: float = DEFAULT_CELL_TIMEOUT,
                 case_timeout: float = DEFAULT_CASE_TIMEOUT, borrowed_policy: str = "score",
                 jobs: int = 1) -> tuple[int, dict[str, Grade | str]]:
    """Grade every notebook below `folder` (one per learner, or one folder per learner), all on
    the same cases (one seed), `jobs` at a time; returns the seed and, per submission (its path
    relative to `folder`), its Grade or why it could not be graded."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    submissions = sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if not submissions:
        raise ValueError(f"no .ipynb files below {folder}: pass a folder of submitted notebooks")
    seed = secrets.randbelow(2**31) if seed is None else seed
    arguments = (assignment, seed, cell_timeout, case_timeout, borrowed_policy)
    # Processes, not threads: each grading sets torch's thread count and random state.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {path: pool.submit(_grade_one, path, *arguments) for path in submissions}
        results: dict[str, Grade | str] = {}
        for path, future in futures.items():
            try:
                results[str(path.relative_to(folder))] = future.result()
            except Exception as error:  # the worker process itself died
                results[str(path.relative_to(folder))] = shorten(f"{type(error).__name__}: {error}")
    return seed, results


def gradebook_rows(results: dict[str, Grade | str], seed: int) -> list[dict[str, object]]:
    """One row per submission: score, a column per exercise (its points), flags and problems."""
    exercise_names = list(dict.fromkeys(e.name for g in results.values() if isinstance(g, Grade)
                                        for e in g.exercises))
    columns = ["submission", "assignment", "seed", "score", "max_score", *exercise_names,
               "borrowed", "problems", "error"]
    rows = []
    for submission, grade in results.items():
        row = dict.fromkeys(columns, "") | {"submission": submission, "seed": seed}
        if isinstance(grade, str):
            row["error"] = grade
        else:
            row |= {"assignment": grade.assignment, "score": grade.score,
                    "max_score": grade.max_score,
                    "borrowed": "; ".join(e.name for e in grade.exercises if e.borrowed),
                    "problems": len(grade.notebook_problems)}
            row |= {e.name: grade.points(e) for e in grade.exercises}
        rows.append(row)
    return rows


def _write_gradebook(rows: list[dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipeft.course.grader",
                                     description="Execute submitted exercise notebooks and grade "
                                                 "them: one notebook, or a folder of them.")
    parser.add_argument("notebook", help="a submitted .ipynb, or a folder of submissions")
    parser.add_argument("--json", type=Path, help="write the full result (every case) as JSON here")
    parser.add_argument("--csv", type=Path, help="write the score table (a folder: the "
                                                 "gradebook, a row per submission) as CSV here")
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
    parser.add_argument("--borrowed", choices=sorted(BORROWED_POLICIES), default="score",
                        help="what an answer that uses minipeft's own implementation scores: "
                             + "; ".join(f"{k}: {v}" for k, v in BORROWED_POLICIES.items())
                             + " (default: score)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="a folder: submissions graded at a time (default: half the cores)")
    args = parser.parse_args(argv)
    if Path(args.notebook).is_dir():
        return _main_folder(parser, args)
    try:
        grade = grade_notebook(args.notebook, args.assignment, args.seed, args.cell_timeout,
                               args.case_timeout, args.borrowed)
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


def _main_folder(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    folder = Path(args.notebook)
    try:
        seed, results = grade_folder(folder, args.assignment, args.seed, args.cell_timeout,
                                     args.case_timeout, args.borrowed, max(1, args.jobs))
    except ValueError as e:
        parser.error(str(e))
    rows = gradebook_rows(results, seed)
    print(f"{folder}: {len(rows)} submissions, seed {seed}, borrowed answers: {args.borrowed}")
    for row in rows:
        verdict = (f"error: {row['error']}" if row["error"] else
                   f"{row['score']} / {row['max_score']}"
                   + (f"  ⚑ borrowed: {row['borrowed']}" if row["borrowed"] else ""))
        print(f"  {row['submission']}: {verdict}")
    if args.json:
        report = {"seed": seed, "borrowed_policy": args.borrowed,
                  "submissions": {name: grade.to_json() if isinstance(grade, Grade)
                                  else {"error": grade} for name, grade in results.items()}}
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if args.csv:
        _write_gradebook(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
