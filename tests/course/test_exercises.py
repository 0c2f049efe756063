"""exercises/ is generated from solutions/ (minipeft.course.exercises), and both grade as they
should.

Every solution notebook grades at full marks; every generated exercise, as shipped, grades at zero
with every part "not attempted" (so the checks can fail). nbval runs the solutions themselves.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from minipeft.course import exercises, grader
from minipeft.course.checks import exercises_of, notebooks, questions_of

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS, EXERCISES_DIR = ROOT / "solutions", ROOT / "exercises"


def test_exercises_folder_is_what_the_generator_makes():
    problems = exercises.drift(SOLUTIONS, EXERCISES_DIR)
    assert not problems, "\n".join(problems) + "\nRegenerate with `make exercises`."


def test_every_registered_exercise_has_its_notebooks_and_every_notebook_its_exercises():
    assert sorted(p.stem for p in SOLUTIONS.glob("*.ipynb")) == notebooks()
    for name in notebooks():
        source = "\n".join(c.source for c in nbformat.read(SOLUTIONS / f"{name}.ipynb", 4).cells
                           if c.cell_type == "code")
        checked = re.findall(r'check\("(\w+)", (\w+)\)', source)
        assert ([a for a, b in checked] == [b for a, b in checked]
                == [e.name for e in exercises_of(name)])
        assert re.findall(r'quiz\("(\w+)"', source) == [q.name for q in questions_of(name)]


@pytest.mark.parametrize("name", notebooks())
def test_exercise_opens_with_what_it_practises_and_how_it_is_graded(name):
    nb = nbformat.read(EXERCISES_DIR / f"{name}.ipynb", 4)
    intro = nb.cells[0].source
    assert (intro.startswith("# Exercise") and "What you practise" in intro
            and "How it is graded" in intro)
    assert f"blob/main/exercises/{name}.ipynb" in intro  # the Colab badge opens the exercise
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert "BEGIN SOLUTION" not in nbformat.writes(nb)


def unchecked_outputs(name: str) -> list[str]:
    """The check and quiz cells of a solution whose output nbval does not compare."""
    nb = nbformat.read(SOLUTIONS / f"{name}.ipynb", 4)
    return [c.source for c in nb.cells if c.cell_type == "code"
            and re.search(r"^(check|quiz)\(", c.source, re.M)
            and "NBVAL_CHECK_OUTPUT" not in c.source]


@pytest.mark.parametrize("name", notebooks())
def test_solution_grades_full_and_exercise_grades_zero_not_attempted(name):
    # nbval runs every solution and compares each check's committed "all pass" line (see
    # test_nbval_compares_every_check_of_every_solution), so the solutions are not graded again.

    shipped = grader.grade_notebook(EXERCISES_DIR / f"{name}.ipynb", seed=2024)
    assert shipped.assignment == name and shipped.score == 0
    # every cell runs as shipped (make test runs no nbval here)
    assert not shipped.notebook_problems
    parts = len(exercises_of(name)) + len(questions_of(name))
    assert [e.status for e in shipped.exercises] == [grader.NOT_ATTEMPTED] * parts
    assert shipped.max_score >= 3 * len(exercises_of(name)) + 3


def test_nbval_compares_every_check_of_every_solution():
    # a training check's summary line holds its time and loss: tests/nbval_sanitize.cfg masks them
    assert {name: unchecked_outputs(name) for name in notebooks() if unchecked_outputs(name)} == {}


# ---------------------------------------------------------------- the generator itself

SOLVED = '''def f(x):
    """Docstring stays."""
    ### BEGIN SOLUTION
    y = x + 1
    return y
    ### END SOLUTION

    # NBVAL_CHECK_OUTPUT
print(f(1))'''


def test_a_quiz_answer_becomes_an_ellipsis():
    stripped, regions = exercises.strip_solution(
        'quiz("doubling_r", "b")\nquiz(\'query_lora_params\', 12_288)  # 2 r n\n'
        'print("quiz(")', "cell")
    assert stripped == ('quiz("doubling_r", ...)\nquiz(\'query_lora_params\', ...)  # 2 r n\n'
                        'print("quiz(")')
    assert regions == 2


def test_strip_solution_keeps_indentation_and_uses_nbgraders_placeholder():
    stripped, regions = exercises.strip_solution(SOLVED, "cell")
    assert regions == 1
    assert stripped == ('def f(x):\n    """Docstring stays."""\n    # YOUR CODE HERE\n'
                        '    raise NotImplementedError()\n\nprint(f(1))')
    namespace = {}
    exec(stripped.replace("print(f(1))", ""), namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)


@pytest.mark.parametrize("source, problem", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside the region"),
])
def test_unbalanced_markers_are_refused_with_the_fix(source, problem):
    with pytest.raises(ValueError, match=problem):
        exercises.strip_solution(source, "solutions/x.ipynb, cell 3")


def make_solutions(folder: Path, name: str = "01_demo", code: str = SOLVED) -> Path:
    folder.mkdir(exist_ok=True)
    nb = new_notebook(cells=[
        new_markdown_cell("[badge](https://colab.research.google.com/github/minipeft/minipeft/"
                          f"blob/main/solutions/{name}.ipynb)", id="intro"),
        new_code_cell(code, id="code", execution_count=3,
                      outputs=[nbformat.v4.new_output("stream", text="2\n")])])
    nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


def test_generated_notebook_is_clean_and_deterministic(tmp_path):
    solutions = make_solutions(tmp_path / "solutions")
    first = exercises.generate(solutions)
    assert first == exercises.generate(solutions)
    nb = nbformat.reads(first["01_demo.ipynb"], 4)
    assert nb.cells[1].outputs == [] and nb.cells[1].execution_count is None
    assert "NBVAL" not in nb.cells[1].source and "raise NotImplementedError()" in nb.cells[1].source
    assert "blob/main/exercises/01_demo.ipynb" in nb.cells[0].source
    assert nb.metadata["minipeft"] == {"assignment": "01_demo"}


def test_a_solution_without_a_region_is_refused(tmp_path):
    solutions = make_solutions(tmp_path / "solutions", code="print('all given away')")
    with pytest.raises(ValueError, match="no solution region"):
        exercises.generate(solutions)


def test_check_reports_drift_and_write_fixes_it(tmp_path, capsys):
    solutions, target = make_solutions(tmp_path / "solutions"), tmp_path / "exercises"
    args = ["--solutions", str(solutions), "--exercises", str(target)]
    assert exercises.main([*args, "--check"]) == 1
    assert "missing" in capsys.readouterr().out

    assert exercises.main(args) == 0
    (target / "99_orphan.ipynb").write_text("{}")
    edited = target / "01_demo.ipynb"
    edited.write_text(edited.read_text().replace("YOUR CODE HERE", "my answer"))
    assert exercises.main([*args, "--check"]) == 1
    out = capsys.readouterr().out
    assert "01_demo.ipynb differs" in out and "99_orphan.ipynb has no solution" in out

    assert exercises.main(args) == 0
    assert exercises.main([*args, "--check"]) == 0
    assert not (target / "99_orphan.ipynb").exists()


@pytest.mark.parametrize("name", notebooks())
def test_exercise_set_up_cells_import_nothing_the_learner_writes(name):
    """An exercise notebook imports the course runtime, `check` and data tables (NF4_CODE), never a
    minipeft function that does what an exercise asks for."""
    import ast

    allowed = {"course", "check", "quiz", "NF4_CODE", "DYNAMIC_CODE"}
    if name == "03_lora":
        allowed.add("training")  # lesson 1's loop, to train the layer the learner wrote
    nb = nbformat.read(EXERCISES_DIR / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minipeft"):
                assert {a.name for a in node.names} <= allowed, (name, ast.unparse(node))
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("minipeft.") for a in node.names), (
                    name, ast.unparse(node))
