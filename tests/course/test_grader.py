"""minipeft.course.grader: the grading command, and the process boundary it grades across.

The command is run on a notebook that loops, prints, raises, tampers with minipeft and kills its
kernel; answer files that are not what the kernel's harness writes fail softly.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from minipeft.course import grader
from minipeft.course.checks import EXERCISES, questions_of
from minipeft.course.feedback import ERROR, MISSING, NO_ANSWER, cases_for, judge
from minipeft.course.grader import read_answer

ROOT = Path(__file__).resolve().parents[2]


def merge_in_place(W0, A, B, alpha, r):
    W0 += (alpha / r) * B @ A
    return W0


# ----------------------------------------------------------- answer files (the process boundary)


def test_answer_files_are_data_only_and_malformed_ones_fail_softly(tmp_path):
    assert read_answer(tmp_path / "absent.safetensors").status == NO_ANSWER
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04 not a safetensors file, maybe a pickle")
    assert read_answer(garbage).status == ERROR

    from safetensors.torch import save_file
    forged = tmp_path / "forged.safetensors"
    save_file({}, str(forged), metadata={"status": "pass", "error": "", "values": "{}"})
    assert read_answer(forged).status == ERROR  # "pass" is the grader's verdict, never an answer's


def test_questions_and_answers_round_trip(tmp_path):
    exercise = EXERCISES["merge"]
    cases = cases_for(exercise, seed=3)
    questions, answers = tmp_path / "q.safetensors", tmp_path / "answers"
    answers.mkdir()
    grader.write_questions(questions, [exercise], [cases])
    grader.answer_questions(str(questions), str(answers), {"merge": merge_in_place},
                            case_timeout=10)
    read = [read_answer(answers / grader._case_file(0, c)) for c in range(len(cases))]
    result = judge(exercise, cases, read)
    assert result.passed == 1 and "changed in place" in result.cases[0].hint  # only B = 0 passes
    grader.answer_questions(str(questions), str(answers), {}, case_timeout=10)
    assert read_answer(answers / grader._case_file(0, 0)).status == MISSING


# ---------------------------------------------------------------- the grading command, end to end

HOSTILE_CELLS = [
    "import torch",
    "def lora_forward(x, W0, b, A, B, alpha, r):\n"
    "    return x @ W0.T + b + (alpha / r) * (x @ A.T @ B.T)",
    # runs past the cell limit
    "while True:\n    pass",
    "for i in range(20000):\n    print('a lot of output ' * 20)",          # prints ~6 MB
    "raise ValueError('boom')",                                               # raises
    # tampering with minipeft in the kernel must not change the grader's verdicts
    "import minipeft.course.feedback as f\nf.judge = lambda *a, **k: None\n"
    "f.difference = lambda *a, **k: None",
    "def merge(W0, A, B, alpha, r):\n    W0 += (alpha / r) * B @ A\n    return W0",
    # a function that never returns, and swallows every Exception
    "def lora_param_count(i, o, r):\n    while True:\n        try:\n            pass\n"
    "        except Exception:\n            pass",
    "import os\nos._exit(3)",                                                 # kills the kernel
]


def test_grading_a_hostile_notebook_still_scores_what_works(tmp_path, capsys):
    path = tmp_path / "02_lora-submitted.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in HOSTILE_CELLS]), path)
    out_json, out_csv = tmp_path / "grade.json", tmp_path / "grade.csv"
    assert grader.main([str(path), "--json", str(out_json), "--csv", str(out_csv),
                        "--cell-timeout", "4", "--case-timeout", "1", "--seed", "11"]) == 0
    printed = capsys.readouterr().out
    assert "cell 3: ran past the 4 s limit" in printed and "cell 9: stopped the kernel" in printed
    assert "cell 5 raised ValueError: boom" in printed

    result = json.loads(out_json.read_text())
    assert result["assignment"] == "02_lora" and result["seed"] == 11
    by_name = {e["name"]: e for e in result["exercises"]}
    assert by_name["lora_forward"]["passed"] == by_name["lora_forward"]["total"] == 5
    assert all(e["borrowed"] == [] for e in result["exercises"])
    # only the fresh adapter (B = 0) case: W0 unchanged there
    assert by_name["merge"]["passed"] == 1
    assert all(c["status"] == ERROR and "1 s limit" in c["message"]
               for c in by_name["lora_param_count"]["cases"])
    assert result["score"] == 6 and result["max_score"] == 15 + 4  # 4 concept checks, unanswered

    rows = list(csv.DictReader(out_csv.open()))
    assert [r["exercise"] for r in rows] == ["lora_forward", "merge", "lora_param_count",
                                             *(q.name for q in questions_of("02_lora")), "total"]
    assert rows[-1]["points"] == "6" and rows[-1]["total"] == "19"


def test_grading_refuses_what_it_cannot_grade(tmp_path):
    with pytest.raises(ValueError, match="no notebook"):
        grader.grade_notebook(tmp_path / "missing.ipynb")
    unnamed = tmp_path / "homework.ipynb"
    nbformat.write(new_notebook(), unnamed)
    with pytest.raises(ValueError, match="--assignment"):
        grader.grade_notebook(unnamed)


BORROWING_NF4 = [
    "import torch\nfrom minipeft import quant\nfrom minipeft.quant import NF4_CODE",
    # borrowed: through a module, and through a helper of the notebook's own
    "def quantize_nf4_blockwise(x, blocksize):\n"
    "    packed, state = quant.quantize_nf4(x, blocksize)\n"
    "    return packed.view(-1), state.absmax",
    "def unpack(packed):\n    return quant.dequantize_nf4",
    # written by hand (NF4_CODE, a constant, is fine)
    "def dequantize_nf4_blockwise(packed, absmax, n, blocksize):\n"
    "    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten()[:n].long()\n"
    "    return NF4_CODE[codes] * absmax.repeat_interleave(blocksize)[:n]",
    # concept checks: one right, one wrong, one not answered, one unknown to the grader's table
    "from minipeft.course.feedback import quiz\nquiz('nf4_bits_per_weight', 4.5)",
    "quiz('block_of_value_70', 0)",
    "quiz('why_normal_quantiles', ...)",
    "quiz('doubling_r', 'b')",
]


@pytest.mark.parametrize("policy, points", [("score", 5), ("zero", 0)])
def test_a_borrowed_answer_is_flagged_in_every_format(tmp_path, capsys, policy, points):
    path = tmp_path / "06_nf4-borrowed.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in BORROWING_NF4]), path)
    out_json, out_csv = tmp_path / "grade.json", tmp_path / "grade.csv"
    assert grader.main([str(path), "--json", str(out_json), "--csv", str(out_csv), "--seed", "3",
                        "--borrowed", policy]) == 0
    printed = capsys.readouterr().out
    assert "⚑ borrowed: minipeft.quant.quantize_nf4" in printed and f"policy {policy!r}" in printed
    by_name = {e["name"]: e for e in json.loads(out_json.read_text())["exercises"]}
    assert by_name["quantize_nf4_blockwise"]["borrowed"] == ["minipeft.quant.quantize_nf4"]
    assert by_name["quantize_nf4_blockwise"]["passed"] == 5
    assert by_name["quantize_nf4_blockwise"]["points"] == points
    assert by_name["dequantize_nf4_blockwise"]["borrowed"] == []
    rows = {r["exercise"]: r for r in csv.DictReader(out_csv.open())}
    assert rows["quantize_nf4_blockwise"]["borrowed"] == "minipeft.quant.quantize_nf4"
    assert rows["total"]["points"] == str(points + 5 + 1)


def test_concept_checks_count_in_every_format(tmp_path, capsys):
    path = tmp_path / "06_nf4-quiz.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in BORROWING_NF4]), path)
    out_json, out_csv = tmp_path / "grade.json", tmp_path / "grade.csv"
    assert grader.main([str(path), "--json", str(out_json), "--csv", str(out_csv),
                        "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "? nf4_bits_per_weight        1 / 1  right" in printed
    assert "? block_of_value_70          0 / 1  wrong" in printed
    assert "? why_normal_quantiles       0 / 1  not attempted" in printed
    assert "doubling_r" not in printed                 # another notebook's question: not counted
    report = json.loads(out_json.read_text())
    by_name = {e["name"]: e for e in report["exercises"]}
    assert by_name["nf4_bits_per_weight"] | {"cases": None} == {
        "name": "nf4_bits_per_weight", "kind": "concept check", "points": 1, "passed": 1,
        "total": 1, "status": "right", "borrowed": [], "cases": None}
    assert by_name["block_of_value_70"]["cases"][0]["hint"].startswith("Block 0 holds")
    assert report["max_score"] == 24
    rows = {r["exercise"]: r for r in csv.DictReader(out_csv.open())}
    assert ((rows["block_of_value_70"]["kind"], rows["block_of_value_70"]["points"])
            == ("concept check", "0"))
    assert ((rows["double_quantize"]["kind"], rows["double_quantize"]["status"])
            == ("exercise", "missing"))


def test_a_folder_of_submissions_makes_one_gradebook(tmp_path, capsys):
    class_folder = tmp_path / "class"
    (class_folder / "alice").mkdir(parents=True)
    shutil.copy(ROOT / "solutions" / "06_nf4.ipynb", class_folder / "alice" / "06_nf4.ipynb")
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in BORROWING_NF4]),
                   class_folder / "bob-06_nf4.ipynb")
    (class_folder / "carol-06_nf4.ipynb").write_text("{ not a notebook")
    gradebook, report = tmp_path / "gradebook.csv", tmp_path / "gradebook.json"
    assert grader.main([str(class_folder), "--csv", str(gradebook), "--json", str(report),
                        "--seed", "5", "--jobs", "2"]) == 0
    rows = {r["submission"]: r for r in csv.DictReader(gradebook.open())}
    assert set(rows) == {"alice/06_nf4.ipynb", "bob-06_nf4.ipynb", "carol-06_nf4.ipynb"}
    assert rows["alice/06_nf4.ipynb"]["score"] == rows["alice/06_nf4.ipynb"]["max_score"] == "24"
    assert rows["alice/06_nf4.ipynb"]["why_normal_quantiles"] == "1"
    assert rows["bob-06_nf4.ipynb"]["nf4_bits_per_weight"] == "1"
    assert rows["alice/06_nf4.ipynb"]["quantize_nf4_blockwise"] == "5"
    assert rows["bob-06_nf4.ipynb"]["borrowed"] == "quantize_nf4_blockwise"
    assert rows["carol-06_nf4.ipynb"]["error"] and rows["carol-06_nf4.ipynb"]["score"] == ""
    assert all(r["seed"] == "5" for r in rows.values())
    submissions = json.loads(report.read_text())["submissions"]
    assert submissions["alice/06_nf4.ipynb"]["score"] == 24 and "error" in submissions[
        "carol-06_nf4.ipynb"]
    assert "carol-06_nf4.ipynb: error:" in capsys.readouterr().out
