"""exercises/ is generated from solutions/, so the two never drift.

    python -m minipeft.course.exercises            # (re)write exercises/ from solutions/
    python -m minipeft.course.exercises --check    # exit 1, listing every difference, if
                                                   # exercises/ is stale

A solution notebook `solutions/NN_name.ipynb` is the only source. In its code cells, solution code
sits between nbgrader's markers:

    def lora_forward(x, W0, b, A, B, alpha, r):
        \"\"\"...\"\"\"
        ### BEGIN SOLUTION
        return ...
        ### END SOLUTION

and the exercise notebook `exercises/NN_name.ipynb` gets, at the marker's indentation,

        # YOUR CODE HERE
        raise NotImplementedError()

(nbgrader's own placeholder), which `minipeft.course.feedback.check` reports as "not attempted
yet". A concept check's answer, the second argument of a `quiz("name", answer)` line, becomes
`...`, which `quiz` reads as "not answered yet" (it then shows the question). The exercise also
loses the solution's outputs and execution counts (learners start clean),
its `# NBVAL_...` markers (it has no outputs to compare: `make test` runs it through the grader,
where each check reports "not attempted"), and its Colab link points at exercises/.
The output is a pure function of the solution notebook, written byte for byte the same every time.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PLACEHOLDER = ("# YOUR CODE HERE", "raise NotImplementedError()")
NBVAL_MARKER = re.compile(r"^\s*# NBVAL_\w+\s*$")
QUIZ_ANSWER = re.compile(r"^(\s*quiz\(\s*[\"']\w+[\"']\s*,\s*)(.+?)(\)\s*(#.*)?)$")


def strip_solution(source: str, where: str) -> tuple[str, int]:
    """`source` with every solution region replaced by the placeholder and every quiz answer by
    `...`; also returns how many of those there were.
    """
    lines, out, regions = source.split("\n"), [], 0
    inside_from = None
    for number, line in enumerate(lines, start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside_from is not None:
                raise ValueError(f"{where}, line {number}: {BEGIN!r} inside the region opened on "
                                 f"line {inside_from}. Close that one with {END!r} first.")
            inside_from = number
            indent = line[:len(line) - len(line.lstrip())]
            out += [indent + text for text in PLACEHOLDER]
            regions += 1
        elif marker == END:
            if inside_from is None:
                raise ValueError(f"{where}, line {number}: {END!r} without a {BEGIN!r} before it. "
                                 f"Add the {BEGIN!r} line above the solution code.")
            inside_from = None
        elif inside_from is None and QUIZ_ANSWER.match(line):
            out.append(QUIZ_ANSWER.sub(r"\1...\3", line))
            regions += 1
        elif inside_from is None and not NBVAL_MARKER.match(line):
            out.append(line)
    if inside_from is not None:
        raise ValueError(f"{where}, line {inside_from}: {BEGIN!r} is never closed. Add {END!r} "
                         f"after the solution code.")
    return "\n".join(out), regions


def exercise_notebook(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The exercise notebook made from solution notebook `name` (e.g. "02_lora")."""
    nb = copy.deepcopy(solution)
    regions = 0
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.source, found = strip_solution(cell.source,
                                                f"solutions/{name}.ipynb, cell {index}")
            regions += found
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source = cell.source.replace(f"/solutions/{name}.ipynb",
                                              f"/exercises/{name}.ipynb")
    if not regions:
        raise ValueError(f"solutions/{name}.ipynb has no solution region: put the solution code "
                         f"between {BEGIN!r} and {END!r} lines, or it would be given away in "
                         "exercises/.")
    nb.metadata["minipeft"] = {"assignment": name}
    return nb


def generate(solutions: Path) -> dict[str, str]:
    """File name -> text of every exercise notebook that `solutions` makes."""
    generated = {}
    for path in sorted(solutions.glob("*.ipynb")):
        nb = exercise_notebook(nbformat.read(path, as_version=4), path.stem)
        generated[path.name] = nbformat.writes(nb) + "\n"
    return generated


def drift(solutions: Path, exercises: Path) -> list[str]:
    """Each way in which `exercises` is not what `solutions` generates (empty when they agree)."""
    generated = generate(solutions)
    problems = []
    for name, text in generated.items():
        target = exercises / name
        if not target.exists():
            problems.append(f"{target} is missing")
        elif target.read_text() != text:
            problems.append(f"{target} differs from what {solutions / name} generates")
    for extra in sorted(set(p.name for p in exercises.glob("*.ipynb")) - set(generated)):
        problems.append(f"{exercises / extra} has no solution notebook {solutions / extra}")
    return problems


def write(solutions: Path, exercises: Path) -> list[Path]:
    """Regenerate `exercises` from `solutions` (removing exercises that have no solution any
    more).
    """
    generated = generate(solutions)  # everything is generated before anything is written
    exercises.mkdir(exist_ok=True)
    for extra in set(p.name for p in exercises.glob("*.ipynb")) - set(generated):
        (exercises / extra).unlink()
    written = []
    for name, text in generated.items():
        target = exercises / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipeft.course.exercises",
                                     description="Generate exercises/ from solutions/.")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 listing the differences if exercises/ is "
                             "stale")
    parser.add_argument("--solutions", type=Path, default=Path("solutions"),
                        help="default: ./solutions")
    parser.add_argument("--exercises", type=Path, default=Path("exercises"),
                        help="default: ./exercises")
    args = parser.parse_args(argv)
    if not args.solutions.is_dir():
        parser.error(f"no solutions folder at {args.solutions}: run this from the repository root, "
                     f"or pass --solutions DIR")
    try:
        if args.check:
            problems = drift(args.solutions, args.exercises)
            for problem in problems:
                print(problem)
            if problems:
                print("exercises/ is stale: regenerate it with `make exercises` "
                      "(python -m minipeft.course.exercises)")
                return 1
            print(f"{args.exercises} is up to date with {args.solutions}")
            return 0
        written = write(args.solutions, args.exercises)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} exercise notebook(s)" + "".join(f"\n  {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
