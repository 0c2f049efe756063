"""The CI entry points instructors use: .ci/run, and the GitHub Actions workflow for a fork."""
from pathlib import Path

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
