"""Committed notebooks are clean and portable: their outputs name no machine.

Learners read the committed outputs on GitHub and Colab. A warning that prints a library's file
path, a repr with a memory address, or a token is noise at best and a leak at worst: each is fixed
at its cause (the course runtime silences known library warnings; cells avoid printing reprs).
"""
from __future__ import annotations

import getpass
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for folder in ("lessons", "solutions", "exercises")
                   for p in (ROOT / folder).glob("*.ipynb"))
LEAKS = {
    "an absolute path": re.compile(r"(/home/|/root/|/tmp/|/Users/|site-packages|\b[A-Za-z]:[\\/])"),
    "a memory address": re.compile(r"\b0x[0-9a-fA-F]{8,}\b"),
    "a hub token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
}


def output_texts(notebook: dict) -> list[tuple[int, str]]:
    """(cell number from 1, text) of every output of every code cell, all text formats."""
    texts = []
    for number, cell in enumerate(notebook["cells"], start=1):
        for output in cell.get("outputs", []):
            parts = [output.get("text", ""), output.get("evalue", ""), *output.get("traceback", [])]
            parts += [value for key, value in output.get("data", {}).items()
                      if key.startswith("text/") or key.endswith("json")]
            texts += [(number, "".join(p) if isinstance(p, list) else str(p)) for p in parts]
    return texts


def leaks(notebook: dict) -> list[str]:
    """What in the outputs names this machine, as 'cell N: <what> (<the text>)'."""
    patterns = dict(LEAKS)
    user = getpass.getuser()
    if len(user) > 3:
        patterns["this machine's user name"] = re.compile(rf"\b{re.escape(user)}\b")
    found = []
    for number, text in output_texts(notebook):
        for what, pattern in patterns.items():
            for match in pattern.finditer(text):
                context = text[max(0, match.start() - 30):match.end() + 30].replace("\n", " ")
                found.append(f"cell {number}: {what} (…{context}…)")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_outputs_name_no_machine(path):
    found = leaks(json.loads(path.read_text()))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("planted", [
    "/work/main/.venv/lib/python3.11/site-packages/transformers/utils.py:12: FutureWarning",
    "see /home/alice/course/lessons",
    "<torch.utils.data.DataLoader object at 0x7f3a2b1c4d50>",
    "C:\\Users\\alice\\minipeft",
    "D:/work/course/lesson.py:3: UserWarning",
    "token hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
])
def test_a_planted_leak_is_found(planted):
    notebook = {"cells": [{"cell_type": "code", "source": "", "outputs": [
        {"output_type": "stream", "name": "stderr", "text": [planted]}]}]}
    assert len(leaks(notebook)) >= 1


def test_short_hex_such_as_bytes_is_not_an_address():
    notebook = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "execute_result", "data": {"text/plain": "packed byte 0xA8, 0x59"}}]}]}
    assert leaks(notebook) == []


FIGURES = ROOT / "lessons" / "figures"


@pytest.mark.parametrize("path", sorted((ROOT / "lessons").glob("*.ipynb")),
                         ids=lambda p: p.name)
def test_figures_are_embedded_as_drawn(path):
    """A lesson shows a figure as a cell attachment (so it shows on Colab too); the attachment must
    be the file lessons/figures/make_figures.py draws (run it after changing a figure)."""
    import base64

    for cell in json.loads(path.read_text())["cells"]:
        for name in re.findall(r"attachment:([\w.-]+\.png)", "".join(cell["source"])):
            attached = cell.get("attachments", {}).get(name, {}).get("image/png", "")
            assert base64.b64decode(attached) == (FIGURES / name).read_bytes(), (
                f"{path.name}: the attached {name} is not lessons/figures/{name}: run "
                "python lessons/figures/make_figures.py")


def test_every_method_lesson_has_a_diagram():
    for name in ("02_lora_math", "03_lora", "04_adapters", "05_prompt_and_prefix_tuning",
                 "06_nf4_quantization"):
        text = (ROOT / "lessons" / f"{name}.ipynb").read_text()
        assert "](attachment:" in text, f"{name} shows no diagram"
