"""The package as learners get it: what the wheel holds, what the methods need, how code reads.

Colab installs minipeft from a built wheel, not from this checkout, so a module or data file left
out of the wheel would only fail there. This builds the wheel, installs it into a throwaway folder
(no dependencies: they are this environment's) and imports every module from there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minipeft"
MAX_LINE = 100  # code is shown in notebook panes
METHODS = ["minipeft.lora", "minipeft.adapters", "minipeft.prompts", "minipeft.inject",
           "minipeft.adapter_io", "minipeft.memory", "minipeft.quant", "minipeft.quant_cpu",
           "minipeft.quant_c", "minipeft.quant_triton", "minipeft.qlora", "minipeft.planner",
           "minipeft.loading", "minipeft.offload", "minipeft.distributed"]


def package_files() -> list[Path]:
    """Every file of the package as it is in the repository (caches left out)."""
    return sorted(p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix != ".pyc")


def module_names() -> list[str]:
    names = []
    for path in package_files():
        if path.suffix == ".py":
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_wheel_holds_every_module_and_data_file_and_they_import(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "minipeft", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "--disable-pip-version-check", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("minipeft-*.whl"))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--disable-pip-version-check", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    missing = [str(p.relative_to(ROOT)) for p in package_files()
               if not (site / p.relative_to(ROOT)).is_file()]
    assert not missing, f"left out of the wheel: {missing}"
    imported = run_python(
        "import importlib, minipeft\n"
        f"for name in {module_names()!r}:\n"
        "    importlib.import_module(name)\n"
        "from minipeft import quant_c\n"
        "print(minipeft.__file__, quant_c.SOURCE.is_file())", cwd=tmp_path, pythonpath=site)
    location, c_source_found = imported.split()
    assert Path(location).is_relative_to(site) and c_source_found == "True"


def test_the_methods_need_neither_the_course_nor_the_references(tmp_path):
    blocked = ["transformers", "datasets", "tqdm", "pandas", "matplotlib", "IPython", "nbformat",
               "nbclient", "psutil", "peft", "bitsandbytes"]
    run_python(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {METHODS!r}:\n"
        "    importlib.import_module(name)\n", cwd=tmp_path, pythonpath=ROOT)


@pytest.mark.parametrize("path", [p for p in package_files() if p.suffix in (".py", ".c")]
                         + sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_package_lines_fit_a_notebook_pane(path):
    long = [f"line {i}: {len(line)} characters" for i, line in
            enumerate(path.read_text().splitlines(), start=1) if len(line) > MAX_LINE]
    assert not long, f"{path.relative_to(ROOT)} has lines over {MAX_LINE} characters: {long[:5]}"


def test_every_method_module_is_checked_for_its_dependencies():
    methods = {name for name in module_names() if not name.startswith("minipeft.course")}
    assert methods - {"minipeft"} == set(METHODS)
