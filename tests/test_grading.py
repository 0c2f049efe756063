"""minipeft.grading: instant feedback, the hints for usual mistakes, and the grading command.

Every check must be able to fail: each usual mistake is written here as a learner would write it
(independently of the wrong solutions in minipeft.checks) and must earn its own hint. The grading
command is run on a notebook that loops, prints, raises, tampers with minipeft and kills its kernel.
"""
from __future__ import annotations

import csv
import json

import nbformat
import pytest
import torch
import torch.nn.functional as F
from nbformat.v4 import new_code_cell, new_notebook

from minipeft import grading
from minipeft.checks import EXERCISES
from minipeft.grading import (ERROR, FAIL, MISSING, NO_ANSWER, NOT_ATTEMPTED, PASS, Answer, check, evaluate,
                              read_answer)
from minipeft.quant import NF4_CODE

# ---------------------------------------------------------------- learner-style answers, right and wrong


def lora_forward(x, W0, b, A, B, alpha, r):
    return x @ W0.T + b + (alpha / r) * (x @ A.T @ B.T)


def merge(W0, A, B, alpha, r):
    return W0 + (alpha / r) * B @ A


def training_bytes(n, t, w=4):
    return n * w + t * w + t * 8


def train_step(model, batch, optimizer):
    model.train()
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss  # a 0-d tensor is accepted as a number


def train_step_no_zero_grad(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def train_step_no_step(model, batch, optimizer):
    model.train()
    optimizer.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item()


def train_step_zero_grad_too_early(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    return loss.item()


def train_step_eval_mode(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def quantize(x, blocksize, *, nibbles="high first", absmax_of="block", rounding="nearest", guard=True,
             tail=True, absmax_dtype=torch.float32, divide=True):
    """A learner's blockwise NF4 quantiser, with switches for the usual mistakes."""
    flat = x.float().flatten()
    if not tail:
        flat = flat[:flat.numel() // blocksize * blocksize]
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1) if absmax_of == "block" else flat.abs().max().repeat(len(blocks))
    scaled = blocks / (absmax.clamp(min=1e-12) if guard else absmax)[:, None] if divide else blocks
    if rounding == "nearest":
        q = (scaled[..., None] - NF4_CODE).abs().argmin(-1)
    else:
        q = (torch.bucketize(scaled, NF4_CODE, right=True) - 1).clamp(0, 15)
    q = F.pad(q.flatten()[:n], (0, n % 2), value=7).to(torch.uint8)
    first, second = (q[0::2], q[1::2]) if nibbles == "high first" else (q[1::2], q[0::2])
    return (first << 4) | second, absmax.to(absmax_dtype)


def dequantize(packed, absmax, n, blocksize, *, nibbles="high first", scale="repeat_interleave", keep=None):
    pairs = [packed >> 4, packed & 15] if nibbles == "high first" else [packed & 15, packed >> 4]
    q = torch.stack(pairs, dim=1).flatten().long()
    keep = n if keep is None else keep(n, blocksize, q.numel())
    if scale == "none":
        return NF4_CODE[q[:keep]]
    per_value = absmax.repeat_interleave(blocksize) if scale == "repeat_interleave" else absmax.repeat(blocksize)
    return NF4_CODE[q[:keep]] * per_value[:keep]


RIGHT = {
    "train_step": train_step,
    "training_bytes": training_bytes,
    "lora_forward": lora_forward,
    "merge": merge,
    "lora_param_count": lambda i, o, r: r * (i + o),
    "quantize_nf4_blockwise": quantize,
    "dequantize_nf4_blockwise": dequantize,
}


def merge_in_place(W0, A, B, alpha, r):
    W0 += (alpha / r) * B @ A
    return W0


# (exercise, wrong answer, words of the hint it must earn)
WRONG = [
    ("train_step", train_step_no_zero_grad, "zero_grad"),
    ("train_step", train_step_no_step, "optimizer.step()"),
    ("train_step", train_step_zero_grad_too_early, "optimizer.step()"),
    ("train_step", train_step_eval_mode, "model.train()"),
    ("training_bytes", lambda n, t, w=4: 16 * n, "16 bytes per parameter holds"),
    ("training_bytes", lambda n, t, w=4: n * w + n * w + n * 8, "no gradient and no optimizer state"),
    ("training_bytes", lambda n, t, w=4: n * w + n * w + t * 8, "count gradients for the n_trainable"),
    ("training_bytes", lambda n, t, w=4: n * w + t * w + n * 8, "Adam's m and v exist for trainable"),
    ("training_bytes", lambda n, t, w=4: n * w + t * 8, "gradients are missing"),
    ("training_bytes", lambda n, t, w=4: n * w + t * w + t * 4, "you counted one"),
    ("training_bytes", lambda n, t, w=4: n * w + t * w + 2 * t * w, "kept in fp32"),
    ("training_bytes", lambda n, t, w=4: n * w + 12 * t, "dtype of its weight"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + x @ A.T @ B.T, "alpha / r seems to be missing"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha * (x @ A.T @ B.T), "You scaled by alpha"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + r / alpha * (x @ A.T @ B.T), "not r / alpha"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + alpha / r * (x @ A.T @ B.T), "bias"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: alpha / r * (x @ A.T @ B.T), "LoRA branch only"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b, "frozen layer's output only"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha / r * (x @ B @ A), "wrong way round"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha / r * (x @ A @ B), "orientation"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: lora_forward(x.float(), W0.float(), b.float(), A.float(),
                                                                   B.float(), alpha, r), "dtype"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: None, "return"),
    ("merge", merge_in_place, "changed in place"),
    ("merge", lambda W0, A, B, alpha, r: W0 + B @ A, "alpha / r seems to be missing"),
    ("merge", lambda W0, A, B, alpha, r: W0 + alpha * B @ A, "You scaled by alpha"),
    ("merge", lambda W0, A, B, alpha, r: W0 + r / alpha * B @ A, "not r / alpha"),
    ("merge", lambda W0, A, B, alpha, r: alpha / r * B @ A, "update only"),
    ("merge", lambda W0, A, B, alpha, r: W0 + alpha / r * A.T @ B.T, "its transpose"),
    ("lora_param_count", lambda i, o, r: r * (i + o) + o, "no bias"),
    ("lora_param_count", lambda i, o, r: i * o, "full matrix"),
    ("lora_param_count", lambda i, o, r: r * i * o, "added, not multiplied"),
    ("lora_param_count", lambda i, o, r: r * i, "A (r x in) only"),
    ("lora_param_count", lambda i, o, r: o * r, "B (out x r) only"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, nibbles="low first"), "nibbles are the wrong way"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, absmax_of="tensor"), "absmax is per block"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, tail=False), "last block may be partial"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, rounding="down"), "nearest code"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, guard=False), "absmax 0"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, absmax_dtype=x.dtype), "stored in float32"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, divide=False), "Divide each value by its block's"),
    ("quantize_nf4_blockwise", lambda x, bs: (quantize(x.flatten().view(-1, bs), bs)), "pad the last block"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, nibbles="low first"),
     "nibbles are the wrong way"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, scale="none"), "multiplied by its block"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, scale="repeat"), "repeat_interleave"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, keep=lambda n, bs, m: m),
     "exactly n values"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, keep=lambda n, bs, m: n // bs * bs),
     "dequantise it too"),
]


@pytest.mark.parametrize("name", sorted(EXERCISES))
@pytest.mark.parametrize("seed", [0, 12345])
def test_right_answers_pass_every_case(name, seed):
    result = evaluate(name, RIGHT[name], seed=seed)
    assert [c.status for c in result.cases] == [PASS] * result.total, result.report()
    assert result.total >= 3


@pytest.mark.parametrize("name, wrong, hint", WRONG, ids=[f"{n}-{h}" for n, _, h in WRONG])
def test_a_usual_mistake_fails_with_its_hint(name, wrong, hint):
    result = evaluate(name, wrong)
    failing = [c for c in result.cases if c.status != PASS]
    assert failing, f"{name}: the wrong answer passed every case"
    assert any(hint in c.hint for c in failing), result.report()


def test_every_usual_mistake_is_reached_by_a_wrong_answer():
    """Each mistake's hint in minipeft.checks is earned by at least one learner-style answer above."""
    earned = {c.hint for name, wrong, _ in WRONG for c in evaluate(name, wrong).cases}
    for exercise in EXERCISES.values():
        for mistake in exercise.mistakes:
            assert mistake.hint in earned, f"{exercise.name}: no wrong answer earns {mistake.hint!r}"


def test_wrong_answers_cover_every_exercise():
    assert {name for name, _, _ in WRONG} == set(EXERCISES)


def test_each_exercise_has_three_cases_with_distinct_names():
    for exercise in EXERCISES.values():
        names = [c.name for c in grading.cases_for(exercise, seed=0)]
        assert len(names) >= 3 and len(set(names)) == len(names), exercise.name


def test_cases_depend_on_the_seed_and_only_on_it():
    exercise = EXERCISES["lora_forward"]
    first, again, other = (grading.cases_for(exercise, s) for s in (7, 7, 8))
    assert all(torch.equal(a.inputs["x"], b.inputs["x"]) for a, b in zip(first, again))
    assert not torch.equal(first[0].inputs["x"], other[0].inputs["x"])


def test_placeholder_is_not_attempted_never_a_traceback(capsys):
    def placeholder(*args):
        # YOUR CODE HERE
        raise NotImplementedError()

    result = evaluate("merge", placeholder)
    assert {c.status for c in result.cases} == {NOT_ATTEMPTED}
    check("merge", placeholder)
    printed = capsys.readouterr().out
    assert "not attempted yet" in printed and "Traceback" not in printed


def test_an_exception_is_one_line_per_case(capsys):
    def broken(i, o, r):
        return {}[i]

    check("lora_param_count", broken)
    printed = capsys.readouterr().out
    assert "raised KeyError" in printed and "Traceback" not in printed
    assert evaluate("lora_param_count", broken).cases[0].status == ERROR


def test_report_shows_expected_got_and_hint(capsys):
    check("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + x @ A.T @ B.T)
    printed = capsys.readouterr().out
    assert "cases pass" in printed and "expected" in printed and ", got " in printed and "hint:" in printed
    assert "✓ fresh adapter (B = 0)" in printed  # B = 0: the scaling does not matter there


def test_check_leaves_the_callers_random_state_and_threads_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("train_step", train_step)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_check_refuses_unknown_names_and_non_functions():
    with pytest.raises(ValueError, match="no exercise named 'lora'.*lora_forward"):
        check("lora", lora_forward)
    with pytest.raises(ValueError, match="without calling it"):
        check("lora_forward", lora_forward(*[torch.ones(1, 1)] * 5, 1, 1))


def test_a_learner_changing_the_inputs_does_not_change_the_reference():
    def vandal(x, W0, b, A, B, alpha, r):
        out = lora_forward(x, W0, b, A, B, alpha, r)
        for t in (x, W0, b, A, B):
            t.zero_()
        return out

    assert evaluate("lora_forward", vandal).passed == len(evaluate("lora_forward", lora_forward).cases)


def test_difference_tolerates_rounding_but_not_mistakes():
    want = {"h": torch.tensor([1.0, -2.0, 4.0])}
    assert grading.difference(want, {"h": want["h"] * (1 + 1e-6)}) is None
    assert grading.difference(want, {"h": want["h"] * 1.01}).kind == "value"
    assert grading.difference(want, {"h": want["h"].double()}).kind == "dtype"
    assert grading.difference(want, {"h": want["h"][:2]}).kind == "shape"
    assert grading.difference({"n": 12}, {"n": 12.0}) is None
    assert grading.difference({"n": 12}, {"n": True}).kind == "type"
    nan = {"h": torch.tensor([float("nan"), 1.0])}
    assert grading.difference(nan, {"h": nan["h"].clone()}) is None
    assert grading.difference(nan, {"h": torch.tensor([0.0, 1.0])}) is not None


# ---------------------------------------------------------------- answer files (the process boundary)


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
    cases = grading.cases_for(exercise, seed=3)
    questions, answers = tmp_path / "q.safetensors", tmp_path / "answers"
    answers.mkdir()
    grading.write_questions(questions, [exercise], [cases])
    grading.answer_questions(str(questions), str(answers), {"merge": merge_in_place}, case_timeout=10)
    read = [read_answer(answers / grading._case_file(0, c)) for c in range(len(cases))]
    result = grading.judge(exercise, cases, read)
    assert result.passed == 1 and "changed in place" in result.cases[0].hint  # only B = 0 passes
    grading.answer_questions(str(questions), str(answers), {}, case_timeout=10)
    assert read_answer(answers / grading._case_file(0, 0)).status == MISSING


# ---------------------------------------------------------------- the grading command, end to end

HOSTILE_CELLS = [
    "import torch",
    "def lora_forward(x, W0, b, A, B, alpha, r):\n    return x @ W0.T + b + (alpha / r) * (x @ A.T @ B.T)",
    "while True:\n    pass",                                                  # runs past the cell limit
    "for i in range(20000):\n    print('a lot of output ' * 20)",          # prints ~6 MB
    "raise ValueError('boom')",                                               # raises
    # tampering with minipeft in the kernel must not change the grader's verdicts
    "import minipeft.grading as g\ng.judge = lambda *a, **k: None\ng.difference = lambda *a, **k: None",
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
    assert grading.main([str(path), "--json", str(out_json), "--csv", str(out_csv), "--cell-timeout", "4",
                         "--case-timeout", "1", "--seed", "11"]) == 0
    printed = capsys.readouterr().out
    assert "cell 3: ran past the 4 s limit" in printed and "cell 9: stopped the kernel" in printed
    assert "cell 5 raised ValueError: boom" in printed

    result = json.loads(out_json.read_text())
    assert result["assignment"] == "02_lora" and result["seed"] == 11
    by_name = {e["name"]: e for e in result["exercises"]}
    assert by_name["lora_forward"]["passed"] == by_name["lora_forward"]["total"] == 5
    assert by_name["merge"]["passed"] == 1  # only the fresh adapter (B = 0) case: W0 unchanged there
    assert all(c["status"] == ERROR and "1 s limit" in c["message"] for c in by_name["lora_param_count"]["cases"])
    assert result["score"] == 6 and result["max_score"] == 15

    rows = list(csv.DictReader(out_csv.open()))
    assert [r["exercise"] for r in rows] == ["lora_forward", "merge", "lora_param_count", "total"]
    assert rows[-1]["passed"] == "6" and rows[-1]["total"] == "15"


def test_grading_refuses_what_it_cannot_grade(tmp_path):
    with pytest.raises(ValueError, match="no notebook"):
        grading.grade_notebook(tmp_path / "missing.ipynb")
    unnamed = tmp_path / "homework.ipynb"
    nbformat.write(new_notebook(), unnamed)
    with pytest.raises(ValueError, match="--assignment"):
        grading.grade_notebook(unnamed)


def test_statuses_summarise_an_exercise():
    cases = [grading.CaseResult("a", PASS), grading.CaseResult("b", FAIL, "x", "y")]
    assert grading.ExerciseResult("e", cases).status == "1 failing"
    assert grading.ExerciseResult("e", [grading.CaseResult("a", NOT_ATTEMPTED)] * 3).status == NOT_ATTEMPTED
    assert Answer("ok").outputs == {}
