"""The checks a practitioner runs first when fine-tuning goes wrong (lesson 8).

`diagnose(model, result)` reads the model and the run's `TrainResult` and reports facts, each
with the threshold that flags it, never a guess at a cause it cannot see:

- what trains: how many parameters, whether a new classifier head is among them, LoRA's α / r;
- the loss: finite or not (NaN from fp16 overflow, a learning rate far too high), whether it
  fell, and where it ended next to chance (ln of the number of classes);
- the validation curve: its best point and how far the end fell from it (overfitting, or a
  learning rate that overshoots late).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from torch import nn

from minipeft.course.training import TrainResult
from minipeft.memory import count_parameters

FELL_AT_LEAST = 0.10        # the loss must end 10 % below where it started to count as falling
NEAR_CHANCE = 0.90          # a final loss above 90 % of chance's is "near chance"
VALIDATION_DROP = 0.02      # accuracy lost since the best validation point that gets flagged


@dataclass(frozen=True)
class Finding:
    check: str
    fact: str
    flagged: bool           # the fact crosses the check's threshold: look here first


def _head_names(model: nn.Module) -> list[str]:
    """Names of a classification head's parameters ("classifier", "score"), if the model has
    one."""
    return [name for name, _ in model.named_parameters()
            if name.split(".")[0] in ("classifier", "score")
            or ".classifier." in name or ".score." in name]


def _what_trains(model: nn.Module) -> list[Finding]:
    count = count_parameters(model)
    share = 100 * count.trainable / max(count.total, 1)
    findings = [Finding("trainable parameters", f"{count.trainable:,} of {count.total:,} "
                        f"({share:.3f} %)", count.trainable == 0)]
    head = _head_names(model)
    if head:
        trained = [n for n, p in model.named_parameters() if n in head and p.requires_grad]
        findings.append(Finding(
            "classifier head", "trains" if trained else
            "frozen: a new head stays at its random start (train it in full: "
            "modules_to_save=['classifier'])", not trained))
    scalings = sorted({round(s, 4) for m in model.modules()
                       if isinstance(getattr(m, "scaling", None), dict)     # LoRA layers
                       for s in m.scaling.values()})
    if scalings:
        findings.append(Finding("LoRA scaling s (α / r; α / √r with rsLoRA)",
                                ", ".join(f"{s:g}" for s in scalings),
                                False))
    return findings


def _the_loss(result: TrainResult, classes: int) -> list[Finding]:
    losses = result.losses
    if not losses:
        return [Finding("loss", "no steps were taken", True)]
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        return [Finding("loss", f"not finite ({losses[bad]}) from step {bad + 1} of "
                        f"{len(losses)}", True)]
    window = max(1, len(losses) // 10)
    start, end = sum(losses[:window]) / window, sum(losses[-window:]) / window
    chance = math.log(classes)
    return [Finding("loss falls", f"{start:.3f} (first {window} steps) -> {end:.3f} (last "
                    f"{window})", end > (1 - FELL_AT_LEAST) * start),
            Finding("final loss vs chance", f"{end:.3f}, chance ln({classes}) = {chance:.3f}",
                    end > NEAR_CHANCE * chance)]


def _validation(result: TrainResult) -> list[Finding]:
    if not result.val_accuracy:
        return []
    best_step, best = max(result.val_accuracy, key=lambda point: point[1])
    last_step, last = result.val_accuracy[-1]
    return [Finding("validation accuracy", f"best {best:.3f} at step {best_step}, last {last:.3f}"
                    f" at step {last_step}", best - last > VALIDATION_DROP)]


def diagnose(model: nn.Module, result: TrainResult | None = None, classes: int = 2,
             show: bool = True) -> list[Finding]:
    """The first checks on a fine-tuning run, as facts (see the module's docstring); without a
    `result`, the model's checks only (before training). With `show`, print them as a table,
    flagged rows marked "<-"."""
    findings = _what_trains(model)
    if result is not None:
        findings += _the_loss(result, classes) + _validation(result)
    if show:
        table = pd.DataFrame([{"check": f.check, "fact": f.fact, "": "<-" if f.flagged else ""}
                              for f in findings]).set_index("check")
        print(table.to_string())
    return findings
