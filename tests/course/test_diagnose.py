from __future__ import annotations

import math

from torch import nn

from minipeft.course.diagnose import diagnose
from minipeft.course.training import TrainResult
from minipeft.lora import LoraConfig, add_lora
from tests.tiny_models import tiny_bert


def _flags(findings) -> dict[str, bool]:
    return {f.check: f.flagged for f in findings}


def test_a_healthy_lora_run(capsys):
    model = add_lora(tiny_bert(), LoraConfig(target_modules=["query", "value"], r=4, alpha=8,
                                             modules_to_save=["classifier"]))
    result = TrainResult(losses=[0.7] * 5 + [0.1] * 5, val_accuracy=[(0, 0.5), (10, 0.95)])
    findings = diagnose(model, result)
    assert not any(f.flagged for f in findings)
    facts = {f.check: f.fact for f in findings}
    assert facts["LoRA scaling s (α / r; α / √r with rsLoRA)"] == "2"
    assert facts["classifier head"] == "trains"
    assert "<-" not in capsys.readouterr().out


def test_each_problem_is_flagged():
    frozen = tiny_bert()
    for p in frozen.parameters():
        p.requires_grad_(False)
    flags = _flags(diagnose(frozen, TrainResult(), show=False))
    assert flags["trainable parameters"] and flags["classifier head"] and flags["loss"]

    model = add_lora(tiny_bert(), LoraConfig(target_modules=["query"], r=4))    # head frozen
    assert _flags(diagnose(model, TrainResult(losses=[0.7, 0.1]), show=False))["classifier head"]

    nan = diagnose(model, TrainResult(losses=[0.7, 0.6, math.nan, math.nan]), show=False)
    assert nan[-1].flagged and "from step 3 of 4" in nan[-1].fact

    flat = _flags(diagnose(model, TrainResult(losses=[0.69] * 20), show=False))
    assert flat["loss falls"] and flat["final loss vs chance"]

    late_drop = TrainResult(losses=[0.7] * 5 + [0.1] * 5, val_accuracy=[(5, 0.95), (10, 0.90)])
    assert _flags(diagnose(model, late_drop, show=False))["validation accuracy"]


def test_no_head_no_head_check():
    model = nn.Sequential(nn.Linear(4, 4))
    checks = [f.check for f in diagnose(model, TrainResult(losses=[1.0, 0.5]), show=False)]
    assert "classifier head" not in checks
