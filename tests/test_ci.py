"""The CI entry points instructors use: .ci/run, and the GitHub Actions workflow for a fork."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readmes_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_github_workflow_runs_make_test_on_the_cpu_and_gpu_tests_only_when_asked():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "tests.yml").read_text())
    cpu, gpu = workflow["jobs"]["cpu"], workflow["jobs"]["gpu"]
    commands = [step.get("run", "") for step in cpu["steps"]]
    assert "make test" in commands
    assert any("whl/cpu" in c for c in commands), "CI must not download a CUDA build of torch"
    assert gpu["if"] == "vars.MINIPEFT_GPU_RUNNER != ''"
    assert any("pytest -m gpu" in step.get("run", "") for step in gpu["steps"])


def test_ci_installs_chromium_for_the_browser_test():
    run = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install -y -q chromium" in run
    assert run.index("chromium") < run.index("make test")


def make_variables() -> dict[str, list[str]]:
    """The Makefile's variables as make expands them (-p prints the database; -n runs nothing)."""
    database = subprocess.run(["make", "--no-print-directory", "-pn", "setup"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    return {name: value.split() for name, _, value in
            (line.partition(" := ") for line in database.splitlines()) if value}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_runs_every_notebook_once_after_the_lessons_whose_runs_it_reads():
    variables = make_variables()
    lane_a, lane_b = variables["LANE_A"], variables["LANE_B"]
    notebooks = sorted(str(p.relative_to(ROOT)) for folder in ("lessons", "solutions")
                       for p in (ROOT / folder).glob("*.ipynb"))
    assert sorted(lane_a + lane_b) == notebooks
    for first, readers in {"01_full_finetuning": ("02_lora_math", "03_lora"),
                           "04_adapters": ("02b_rslora", "05_prompt_and_prefix_tuning",
                                           "08_choosing_and_evaluating"),
                           "02b_rslora": ("08_choosing_and_evaluating",),
                           "05_prompt_and_prefix_tuning": ("08_choosing_and_evaluating",)}.items():
        lane = lane_a if f"lessons/{first}.ipynb" in lane_a else lane_b
        for reader in readers:
            assert lane.index(f"lessons/{first}.ipynb") < lane.index(f"lessons/{reader}.ipynb")
