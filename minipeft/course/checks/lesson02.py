"""Lessons 2 and 3's exercises: the LoRA forward pass, merging, and counting LoRA's parameters."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minipeft.course.checks import (Case, Draw, Exercise, Inputs, Mistake, Outputs, Question,
                                    register)
from minipeft.lora import LoraConfig, LoraLinear
from minipeft.memory import count_parameters

def _lora_layer(W0: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float,
                r: int) -> LoraLinear:
    """minipeft's LoraLinear holding exactly these weights."""
    out_features, in_features = W0.shape
    layer = LoraLinear(nn.Linear(in_features, out_features, dtype=W0.dtype))
    layer.add_adapter("default", LoraConfig(target_modules=["layer"], r=r, alpha=alpha),
                      dtype=A.dtype)
    layer.set_active("default")
    with torch.no_grad():
        layer.base_layer.weight.copy_(W0)
        layer.base_layer.bias.copy_(b)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def _lora_cases(draw: Draw, with_input: bool) -> list[Case]:
    def case(name: str, batch_shape: tuple[int, ...], in_features: int, out_features: int, r: int,
             alpha: float, dtype: torch.dtype = torch.float32, fresh: bool = False) -> Case:
        inputs: Inputs = {
            "W0": draw.tensor(out_features, in_features, dtype=dtype, scale=in_features ** -0.5),
            "b": draw.tensor(out_features, dtype=dtype, scale=0.5),
            "A": draw.tensor(r, in_features, dtype=dtype, scale=in_features ** -0.5),
            # B is trained away from zero in every case but the fresh adapter's
            "B": (torch.zeros(out_features, r, dtype=dtype) if fresh
                  else draw.tensor(out_features, r, dtype=dtype)),
            "alpha": alpha, "r": r}
        if with_input:
            inputs["x"] = draw.tensor(*batch_shape, in_features, dtype=dtype)
        return Case(name, inputs)

    return [case("square layer", (3,), 8, 8, r=2, alpha=8),
            case("rank 1", (4,), 6, 5, r=1, alpha=3),
            case("odd sizes and a 3-d input" if with_input else "odd sizes", (2, 3), 7, 13, r=3,
                 alpha=5),
            case("bf16", (5,), 16, 12, r=4, alpha=16, dtype=torch.bfloat16),
            case("fresh adapter (B = 0)", (3,), 9, 4, r=2, alpha=4, fresh=True)]


def _run_lora_forward(lora_forward: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"h": lora_forward(i["x"], i["W0"], i["b"], i["A"], i["B"], i["alpha"], i["r"])}


@torch.no_grad()
def _reference_lora_forward(x, W0, b, A, B, alpha, r):
    return _lora_layer(W0, b, A, B, alpha, r)(x)


SHAPE_ERROR = r"cannot be multiplied|size mismatch|must match the size|shape .* is invalid"
LORA_ERROR_HINTS = (
    (SHAPE_ERROR, "Check each matrix's orientation: x is (..., in), W0 is (out, in), A is (r, in), "
                  "B is (out, r). So x @ W0.T and x @ A.T @ B.T are both (..., out)."),
)
MERGE_ERROR_HINTS = (
    (SHAPE_ERROR, "Check each matrix's orientation: W0 is (out, in), A is (r, in), B is (out, r). "
                  "So B @ A is (out, in), the shape of W0."),
)

register(Exercise(
    name="lora_forward",
    notebook="02_lora",
    make_cases=lambda draw: _lora_cases(draw, with_input=True),
    run=_run_lora_forward,
    reference=_reference_lora_forward,
    mistakes=(
        Mistake("The LoRA branch is scaled: h = x W0ᵀ + b + (alpha / r) x Aᵀ Bᵀ. The factor "
                "alpha / r seems to be missing.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(x, W0, b, A, B, r, r)),
        Mistake("You scaled by alpha; the factor is alpha / r (so that trying another rank keeps "
                "the update's size).",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(
                    x, W0, b, A, B, alpha * r, r)),
        Mistake("The factor is alpha / r, not r / alpha.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(
                    x, W0, b, A, B, r * r / alpha, r)),
        Mistake("The frozen layer has a bias: h = x W0ᵀ + b + ...; b seems to be missing.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(
                    x, W0, torch.zeros_like(b), A, B, alpha, r)),
        Mistake("h is the frozen layer's output plus the update; you returned the LoRA branch "
                "only. Add x W0ᵀ + b.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(
                    x, torch.zeros_like(W0), torch.zeros_like(b), A, B, alpha, r)),
        Mistake("You returned the frozen layer's output only: add the LoRA branch "
                "(alpha / r) x Aᵀ Bᵀ.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(
                    x, W0, b, A, torch.zeros_like(B), alpha, r)),
        Mistake("A and B are the wrong way round: A (r x in) comes first, then B (out x r), "
                "as in x @ A.T @ B.T.",
                lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + (alpha / r) * (x @ B @ A)),
    ),
    error_hints=LORA_ERROR_HINTS,
    hint="Compare with h = x W0ᵀ + b + (alpha / r) x Aᵀ Bᵀ term by term, and keep x's dtype.",
))


def _run_merge(merge: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    W0 = i["W0"]
    merged = merge(W0, i["A"], i["B"], i["alpha"], i["r"])
    return {"W": merged, "W0 after the call": W0}


@torch.no_grad()
def _reference_merge(W0, A, B, alpha, r):
    layer = _lora_layer(W0, torch.zeros(W0.shape[0], dtype=W0.dtype), A, B, alpha, r)
    layer.merge()
    return layer.base_layer.weight.detach().clone()


def _merge_in_place(W0, A, B, alpha, r):
    W0 += _reference_merge(W0, A, B, alpha, r) - W0
    return W0


register(Exercise(
    name="merge",
    notebook="02_lora",
    make_cases=lambda draw: _lora_cases(draw, with_input=False),
    run=_run_merge,
    reference=_reference_merge,
    mistakes=(
        Mistake("W0 was changed in place: return a new tensor, W0 + (alpha / r) B @ A, and leave "
                "W0 as it was (`W0 + ...`, not `W0 += ...`), or unmerging is impossible.",
                _merge_in_place),
        Mistake("The update is scaled: W = W0 + (alpha / r) B @ A. The factor alpha / r seems to "
                "be missing.",
                lambda W0, A, B, alpha, r: _reference_merge(W0, A, B, r, r)),
        Mistake("You scaled by alpha; the factor is alpha / r.",
                lambda W0, A, B, alpha, r: _reference_merge(W0, A, B, alpha * r, r)),
        Mistake("The factor is alpha / r, not r / alpha.",
                lambda W0, A, B, alpha, r: _reference_merge(W0, A, B, r * r / alpha, r)),
        Mistake("You returned the update only: the merged weight is W0 plus the update.",
                lambda W0, A, B, alpha, r: _reference_merge(torch.zeros_like(W0), A, B, alpha, r)),
        Mistake("The update is B @ A, shaped like W0 (out x in); A.T @ B.T is its transpose.",
                lambda W0, A, B, alpha, r: W0 + (alpha / r) * (A.T @ B.T)),
    ),
    error_hints=MERGE_ERROR_HINTS,
    hint="W = W0 + (alpha / r) B @ A, in W0's dtype, as a new tensor.",
))


def _lora_param_count_cases(draw: Draw) -> list[Case]:
    def case(name: str, in_features: int, out_features: int, r: int) -> Case:
        return Case(name, {"in_features": in_features, "out_features": out_features, "r": r})

    return [case("BERT-base query with r = 8", 768, 768, 8),
            case("rank 1", draw.integer(10, 99), draw.integer(100, 999), 1),
            case("odd sizes", 2 * draw.integer(5, 50) + 1, 2 * draw.integer(5, 50) + 1, 3),
            case("feed-forward with r = 16", 384, 1536, 16),
            case("Llama-7B q_proj with r = 64", 4096, 4096, 64)]


def _run_lora_param_count(lora_param_count: Callable, inputs: Inputs) -> Outputs:
    return {"count": lora_param_count(inputs["in_features"], inputs["out_features"], inputs["r"])}


def _reference_lora_param_count(in_features: int, out_features: int, r: int) -> int:
    """The trainable parameters minipeft's LoraLinear adds (built on the meta device: no memory)."""
    layer = LoraLinear(nn.Linear(in_features, out_features, device="meta"))
    layer.add_adapter("default", LoraConfig(target_modules=["layer"], r=r), dtype=torch.float32)
    layer.base_layer.requires_grad_(False)
    layer.set_active("default")
    return count_parameters(layer).trainable


register(Exercise(
    name="lora_param_count",
    notebook="02_lora",
    make_cases=_lora_param_count_cases,
    run=_run_lora_param_count,
    reference=_reference_lora_param_count,
    mistakes=(
        Mistake("LoRA's A and B have no bias: count r x in + out x r only.",
                lambda i, o, r: r * (i + o) + o),
        Mistake("That is the full matrix's count (in x out): LoRA trains A (r x in) and B "
                "(out x r) instead.",
                lambda i, o, r: i * o),
        Mistake("A (r x in) and B (out x r) are added, not multiplied: r x in + out x r.",
                lambda i, o, r: r * i * o),
        Mistake("You counted A (r x in) only: B (out x r) trains too.", lambda i, o, r: r * i),
        Mistake("You counted B (out x r) only: A (r x in) trains too.", lambda i, o, r: r * o),
    ),
    hint="A is r x in and B is out x r: r x (in + out) parameters in all.",
))


# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="which_starts_at_zero",
    notebook="02_lora",
    text="LoRA's update is (alpha / r) B A. How are A and B initialised, and why?",
    options={"a": "B = 0 and A random: the update starts at exactly zero, so training starts from "
                  "the pretrained model, and B still gets a gradient through A's random rows.",
             "b": "Both at zero: the update starts at zero.",
             "c": "Both random and small: a small random update does no harm."},
    answer="a",
    why="With B = 0 the model starts exactly as pretrained; A being random gives B's gradient "
        "(which goes through A x) a direction from the first step.",
    wrong={"b": "Then each matrix's gradient is multiplied by the other one, which is zero: "
                "neither ever moves.",
           "c": "Then the pretrained model's outputs change before any training: the run starts "
                "from a perturbed model, not the pretrained one."},
))

register(Question(
    name="query_lora_params",
    notebook="02_lora",
    text="LoRA at r = 8 on one 768 x 768 projection (BERT-base's query): how many parameters "
         "train?",
    answer=12_288,
    why="A is 8 x 768 and B is 768 x 8: 2 x 768 x 8 = 12,288, 2 % of the 589,824 in the matrix.",
    wrong={589_824: "That is the full matrix (768 x 768): LoRA trains A and B instead.",
           6_144: "That is one of A (8 x 768) and B (768 x 8): both train.",
           4_718_592: "A and B are added, not multiplied: 8 x 768 + 768 x 8.",
           13_056: "LoRA's A and B have no bias: 2 x 768 x 8."},
    otherwise="A is r x in and B is out x r: count both.",
))

register(Question(
    name="doubling_r",
    notebook="02_lora",
    text="You raise r from 8 to 16 and keep alpha = 16. What happens to the scaling alpha / r?",
    options={"a": "It stays 2.", "b": "It halves, from 2 to 1.", "c": "It doubles, from 2 to 4."},
    answer="b",
    why="alpha / r = 16 / 16 = 1: a larger rank with the same alpha shrinks each update, which is "
        "why changing r usually means changing alpha (or the learning rate) too; lesson 2b's "
        "rsLoRA scales by alpha / sqrt(r) instead.",
    wrong={"a": "The scaling depends on r: alpha / r, so 16 / 16 = 1 at r = 16.",
           "c": "r is in the denominator: a larger r gives a smaller alpha / r."},
))

register(Question(
    name="merged_inference_cost",
    notebook="02_lora",
    text="After merging, W = W0 + (alpha / r) B A. What does inference cost compared with the "
         "original layer?",
    options={"a": "The same: one matrix product with a matrix the shape of W0.",
             "b": "One extra low-rank product, x A^T B^T, per call.",
             "c": "About twice as much: W0 and the update are applied separately."},
    answer="a",
    why="The update is folded into the weight: the merged layer is an ordinary Linear of the "
        "same shape, so it costs exactly what the original did.",
    wrong={"b": "That is the unmerged layer, during training. Merging folds B A into W.",
           "c": "After merging there is a single weight W: nothing is applied separately."},
))
