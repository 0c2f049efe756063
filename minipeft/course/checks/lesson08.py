"""Lesson 8's exercises: the expected calibration error, and choosing and diagnosing."""
from __future__ import annotations

from typing import Callable

import torch

from minipeft.course.checks import (Case, Draw, Exercise, Inputs, Mistake, Outputs, Question,
                                    register)
from minipeft.course.evaluation import reliability

# --------------------------------------------------------------------------------------------------
# 1. The expected calibration error
# --------------------------------------------------------------------------------------------------


def _ece_cases(draw: Draw) -> list[Case]:
    def case(name: str, confidence: list[float] | torch.Tensor, correct: list[bool] | torch.Tensor,
             bins: int = 10) -> Case:
        return Case(name, {"confidence": torch.as_tensor(confidence, dtype=torch.float32),
                           "correct": torch.as_tensor(correct, dtype=torch.bool), "bins": bins})

    n = draw.integer(200, 400)
    confidence = 0.5 + 0.5 * torch.rand(n, generator=draw.generator)
    overconfident = torch.rand(n, generator=draw.generator) < confidence - 0.2
    three = 1 / 3 + (2 / 3) * torch.rand(n, generator=draw.generator)
    return [case("four predictions, two bins", [0.55, 0.58, 0.95, 0.97],
                 [True, False, True, True]),
            case("an over-confident model", confidence, overconfident),
            case("under-confident in one bin, over-confident in another",
                 [0.62, 0.64, 0.66, 0.68, 0.92, 0.94], [True, True, True, True, False, True]),
            case("bins of unequal sizes", [0.51, 0.52, 0.53, 0.54, 0.55, 0.99],
                 [False, False, True, True, True, False]),
            case("confidences on bin edges, and 1", [0.55, 0.6, 0.65, 0.7, 0.7, 1.0, 1.0],
                 [True, False, True, True, False, True, False]),
            case("three classes, 15 bins", three, torch.rand(n, generator=draw.generator) < three,
                 bins=15)]


def _run_ece(expected_calibration_error: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"ece": float(expected_calibration_error(i["confidence"].clone(), i["correct"].clone(),
                                                    i["bins"]))}


def _reference_ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> float:
    return reliability(confidence, correct, bins).expected_calibration_error


def _ece_with(confidence: torch.Tensor, correct: torch.Tensor, bins: int, *, weigh: str = "n",
              absolute: bool = True, right_closed: bool = False, drop_one: bool = False) -> float:
    """The ECE written with the usual slips as options."""
    edges = torch.linspace(0, 1, bins + 1)
    gaps, weights = [], []
    for b in range(bins):
        low, high = edges[b], edges[b + 1]
        if right_closed:
            in_bin = (confidence > low) & (confidence <= high)
        elif b == bins - 1 and not drop_one:
            in_bin = (confidence >= low) & (confidence <= high)
        else:
            in_bin = (confidence >= low) & (confidence < high)
        if in_bin.any():
            gap = correct[in_bin].float().mean() - confidence[in_bin].mean()
            gaps.append(gap.abs() if absolute else gap)
            weights.append(in_bin.float().sum() / len(confidence))
    if weigh == "bins":                   # each bin counts the same
        return (sum(gaps) / len(gaps)).item()
    if weigh == "all bins":               # empty bins count as zero gaps
        return (sum(gaps) / bins).item()
    return sum(w * g for w, g in zip(weights, gaps)).item()


register(Exercise(
    name="expected_calibration_error",
    notebook="08_choosing",
    make_cases=_ece_cases,
    run=_run_ece,
    reference=_reference_ece,
    mistakes=(
        Mistake("Weigh each bin's gap by its share of the predictions, n_b / n: a bin holding "
                "two predictions counts less than one holding two hundred.",
                lambda c, y, b: _ece_with(c, y, b, weigh="bins")),
        Mistake("Average over the bins that hold predictions, weighted by n_b / n; dividing by "
                "the number of bins counts empty bins as perfect.",
                lambda c, y, b: _ece_with(c, y, b, weigh="all bins")),
        Mistake("Take the absolute gap |acc(b) - conf(b)|: an over-confident bin and an "
                "under-confident one must not cancel.",
                lambda c, y, b: _ece_with(c, y, b, absolute=False)),
        Mistake("Compare per bin, not once over all predictions: |accuracy - mean confidence| "
                "over the whole set hides over- and under-confidence in different bins.",
                lambda c, y, b: abs(y.float().mean() - c.mean()).item()),
        Mistake("A confidence of exactly 1 belongs to the last bin: make the last bin include "
                "its upper edge.",
                lambda c, y, b: _ece_with(c, y, b, drop_one=True)),
        Mistake("In this course a confidence on an edge belongs to the bin above it: bins are "
                "[low, high), the last one holding 1 (Guo et al. close them on the right; pick "
                "one convention and keep it).",
                lambda c, y, b: _ece_with(c, y, b, right_closed=True)),
    ),
    hint="Bins [k/bins, (k+1)/bins) (the last one includes 1); for each bin holding "
         "predictions, n_b / n x |accuracy - mean confidence|; sum them (lesson 8, section 4).",
    tolerance=1e-5,
))

# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="flat_loss_fix",
    notebook="08_choosing",
    text="A LoRA run (r=8 on query and value, the head in modules_to_save) at lr=5e-5: the loss "
         "stays near 0.69 for all 40 steps. diagnose() reports 74,498 trainable parameters and "
         "a head that trains. What do you change first?",
    options={"a": "Raise the learning rate to about 1e-3 to 1e-2.",
             "b": "Raise r to 64 so that LoRA can express more.",
             "c": "Lower the learning rate: the loss may be oscillating."},
    answer="a",
    why="B starts at zero and AdamW moves each entry by about the learning rate per step: at "
        "full fine-tuning's 5e-5 the adapter barely moves in 40 steps (lesson 8, section 3).",
    wrong={"b": "With α fixed, a larger r makes the first updates smaller (α / r), not larger; "
                "the flat loss comes from the learning rate.",
           "c": "An oscillating loss goes up and down; this one is flat at chance, ln 2."},
))

register(Question(
    name="alpha_fixed_r_up",
    notebook="08_choosing",
    text="You raise LoRA's r from 8 to 64 and keep α = 16 and the learning rate. By what factor "
         "does the size of the first update ||s B A|| change (new / old)? (A number.)",
    answer=8 ** -0.5,
    tolerance=0.02,
    why="s = α / r falls 8x, and AdamW's first steps move each of B's r columns by about the "
        "learning rate, so ||B A|| grows like √r: √8 / 8 = 1 / √8 ≈ 0.354. rsLoRA's α / √r "
        "keeps it constant.",
    wrong={1 / 8: "The scaling falls 8x, but B has 8x more columns, each moved by about the "
                  "learning rate: the norm grows by √8, so the update shrinks by 1 / √8.",
           1.0: "s = α / r changes with r: it is 8x smaller at r = 64.",
           8 ** 0.5: "The update shrinks with α fixed; it grows only if α grows with r."},
    otherwise="s = α / r changes by 1/8; ||B A|| grows like √r. Multiply the two.",
))

register(Question(
    name="seven_b_codes_gb",
    notebook="08_choosing",
    text="Llama-2-7B has 6.48 billion weights in its linear layers. How many GB (10^9 bytes) do "
         "their NF4 codes take, constants left out? (A number.)",
    answer=3.24,
    tolerance=0.01,
    why="4 bits = half a byte per weight: 6.48e9 / 2 = 3.24 GB; double-quantised constants add "
        "about 0.10 GB, the bf16 embeddings and head 0.52 GB (lesson 7).",
    wrong={6.48: "A 4-bit code is half a byte, not a byte.",
           12.96: "That is bf16 (2 bytes per weight); NF4 takes half a byte.",
           3.34: "Leave the quantisation constants out: the codes alone."},
    otherwise="Each weight is one 4-bit code: 6.48e9 weights x 0.5 byte.",
))
