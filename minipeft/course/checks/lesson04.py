"""Lesson 4's exercises: a bottleneck adapter, its placement in a post-norm block (Houlsby and
Pfeiffer), and what it trains."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minipeft.adapters import AdapterConfig, PostNormAdapters, bottleneck_parameters
from minipeft.course.checks import (Case, Draw, Exercise, Inputs, Mistake, Outputs, Question,
                                    register)

LN_EPS = 1e-12  # BERT's LayerNorm epsilon, in the exercise's contract


def _weights(draw: Draw, d: int, m: int, fresh: bool = False) -> Inputs:
    return {"W_down": draw.tensor(m, d, scale=d ** -0.5), "b_down": draw.tensor(m, scale=0.1),
            "W_up": torch.zeros(d, m) if fresh else draw.tensor(d, m, scale=m ** -0.5),
            "b_up": torch.zeros(d) if fresh else draw.tensor(d, scale=0.1)}


def _host(kind: str, W_down, b_down, W_up, b_up, ln_weight=None, ln_bias=None) -> PostNormAdapters:
    """minipeft's post-norm adapter host around a sublayer whose dense and dropout are the
    identity (so its input is h), holding exactly these weights."""
    d, m = W_up.shape
    sublayer = nn.Module()
    sublayer.dense, sublayer.dropout = nn.Identity(), nn.Identity()
    sublayer.LayerNorm = nn.LayerNorm(d, eps=LN_EPS)
    host = PostNormAdapters(sublayer)
    host.add_adapter("default", AdapterConfig(kind=kind, reduction_factor=d // m,
                                              non_linearity="relu"), d, torch.float32,
                     torch.device("cpu"))
    host.set_active("default")
    with torch.no_grad():
        adapter = host.adapters["default"]
        for target, value in ((adapter.down.weight, W_down), (adapter.down.bias, b_down),
                              (adapter.up.weight, W_up), (adapter.up.bias, b_up)):
            target.copy_(value)
        if ln_weight is not None:
            sublayer.LayerNorm.weight.copy_(ln_weight)
            sublayer.LayerNorm.bias.copy_(ln_bias)
    return host


# --------------------------------------------------------------------------------------------------
# 1. The bottleneck
# --------------------------------------------------------------------------------------------------

def _bottleneck_cases(draw: Draw) -> list[Case]:
    def case(name: str, batch: tuple[int, ...], d: int, m: int, fresh: bool = False) -> Case:
        return Case(name, {"z": draw.tensor(*batch, d)} | _weights(draw, d, m, fresh))

    return [case("one hidden state", (1,), 16, 4),
            case("a batch of sequences", (2, 5), 16, 4),
            case("odd widths", (3,), 12, 3),
            case("a fresh adapter (W_up = 0, b_up = 0)", (4,), 8, 2, fresh=True)]


def _run_bottleneck(bottleneck: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"A(z)": bottleneck(i["z"], i["W_down"], i["b_down"], i["W_up"], i["b_up"])}


@torch.no_grad()
def _reference_bottleneck(z, W_down, b_down, W_up, b_up):
    return _host("pfeiffer", W_down, b_down, W_up, b_up).adapters["default"](z)


SHAPES = ("W_down is (m, d) and W_up is (d, m), as nn.Linear stores them: z @ W_down.T is "
          "(..., m), and that @ W_up.T is (..., d).")
register(Exercise(
    name="bottleneck",
    notebook="04_adapters",
    make_cases=_bottleneck_cases,
    run=_run_bottleneck,
    reference=_reference_bottleneck,
    mistakes=(
        Mistake("The non-linearity is missing: without f, W_up (W_down z) is one linear map, a "
                "rank-m matrix, like LoRA's. Apply ReLU between the two projections.",
                lambda z, Wd, bd, Wu, bu: (z @ Wd.T + bd) @ Wu.T + bu),
        Mistake("A(z) is the correction alone; the block adds the skip connection itself. Do not "
                "add z.",
                lambda z, Wd, bd, Wu, bu: z + _reference_bottleneck(z, Wd, bd, Wu, bu)),
        Mistake("The biases are part of A: W_up f(W_down z + b_down) + b_up.",
                lambda z, Wd, bd, Wu, bu: torch.relu(z @ Wd.T) @ Wu.T),
        Mistake("b_down goes inside the non-linearity: f(W_down z + b_down), not f(W_down z) + "
                "b_down.",
                lambda z, Wd, bd, Wu, bu: (torch.relu(z @ Wd.T) + bd) @ Wu.T + bu),
    ),
    error_hints=((r"cannot be multiplied|size mismatch|must match the size", SHAPES),),
    hint="See lesson 4, section 1: down to m numbers, the non-linearity, up to d again.",
))

# --------------------------------------------------------------------------------------------------
# 2. In the block
# --------------------------------------------------------------------------------------------------

def _output_cases(draw: Draw) -> list[Case]:
    def case(name: str, kind: str, batch: tuple[int, ...], d: int, m: int,
             fresh: bool = False) -> Case:
        return Case(name, {"h": draw.tensor(*batch, d), "r": draw.tensor(*batch, d),
                           "ln_weight": 1 + draw.tensor(d, scale=0.1),
                           "ln_bias": draw.tensor(d, scale=0.1), "kind": kind}
                    | _weights(draw, d, m, fresh))

    return [case("Houlsby, one token", "houlsby", (1,), 16, 4),
            case("Pfeiffer, one token", "pfeiffer", (1,), 16, 4),
            case("Houlsby, a batch of sequences", "houlsby", (2, 5), 12, 3),
            case("Pfeiffer, a batch of sequences", "pfeiffer", (2, 5), 12, 3),
            case("Pfeiffer, a fresh adapter (A = 0)", "pfeiffer", (3,), 8, 2, fresh=True)]


def _run_output(adapter_output: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"output": adapter_output(i["h"], i["r"], i["kind"], i["W_down"], i["b_down"],
                                     i["W_up"], i["b_up"], i["ln_weight"], i["ln_bias"])}


@torch.no_grad()
def _reference_output(h, r, kind, W_down, b_down, W_up, b_up, ln_weight, ln_bias):
    return _host(kind, W_down, b_down, W_up, b_up, ln_weight, ln_bias)(h, r)


def _output_with(h, r, kind, W_down, b_down, W_up, b_up, ln_weight, ln_bias, *,
                 adapter_reads: str = "by kind", skip: bool = True, residual: bool = True,
                 final_ln: bool = True):
    """The block's output written with the usual slips as options."""
    def LN(x):
        return F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, LN_EPS)

    def A(z):
        return torch.relu(z @ W_down.T + b_down) @ W_up.T + b_up

    reads = {"h": h, "h + r": h + r, "LN(h + r)": LN(h + r)}[
        adapter_reads if adapter_reads != "by kind"
        else ("h" if kind == "houlsby" else "LN(h + r)")]
    total = A(reads) + (h if skip else 0) + (r if residual else 0)
    return LN(total) if final_ln else total


register(Exercise(
    name="adapter_output",
    notebook="04_adapters",
    make_cases=_output_cases,
    run=_run_output,
    reference=_reference_output,
    mistakes=(
        Mistake("The residual input r is missing: the block still adds it before its LayerNorm, "
                "LN(h + A(.) + r).",
                lambda *a: _output_with(*a, residual=False)),
        Mistake("The sublayer's own output h is missing: the adapter adds a correction to h "
                "(h + A(.)), it does not replace it.",
                lambda *a: _output_with(*a, skip=False)),
        Mistake("The block ends with its LayerNorm: LN(h + A(.) + r).",
                lambda *a: _output_with(*a, final_ln=False)),
        Mistake("Pfeiffer's adapter reads LN(h + r), the normalised sum; Houlsby's reads h.",
                lambda h, r, kind, *a: _output_with(h, r, kind, *a, adapter_reads=(
                    "h" if kind == "pfeiffer" else "LN(h + r)"))),
        Mistake("Pfeiffer's adapter reads the sum after the block's LayerNorm, LN(h + r), not "
                "h + r.",
                lambda *a: _output_with(*a, adapter_reads="h + r")),
    ),
    hint="See lesson 4, section 2: Houlsby LN(h + A(h) + r), Pfeiffer LN(h + A(LN(h + r)) + r), "
         "with the block's LayerNorm (eps 1e-12) and A as in part 1.",
))

# --------------------------------------------------------------------------------------------------
# 3. What it trains
# --------------------------------------------------------------------------------------------------

def _count_cases(draw: Draw) -> list[Case]:
    def case(name: str, d: int, factor: int, blocks: int, kind: str) -> Case:
        return Case(name, {"hidden_size": d, "reduction_factor": factor, "blocks": blocks,
                           "kind": kind})

    return [case("the course bert, Houlsby", 384, 16, 6, "houlsby"),
            case("the course bert, Pfeiffer", 384, 16, 6, "pfeiffer"),
            case("BERT-base, Houlsby, factor 8", 768, 8, 12, "houlsby"),
            case("a width the factor does not divide", 16 * draw.integer(20, 50) + 11, 16,
                 draw.integer(2, 30), "pfeiffer")]


def _run_count(adapter_param_count: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"count": adapter_param_count(i["hidden_size"], i["reduction_factor"], i["blocks"],
                                         i["kind"])}


def _reference_count(hidden_size: int, reduction_factor: int, blocks: int, kind: str) -> int:
    per_block = {"houlsby": 2, "pfeiffer": 1}[kind]
    return blocks * per_block * bottleneck_parameters(hidden_size, reduction_factor)


def _count_with(d, f, blocks, kind, *, biases=2, per_block=None, width=None):
    m = width(d, f) if width else d // f
    per = per_block if per_block is not None else {"houlsby": 2, "pfeiffer": 1}[kind]
    return blocks * per * (2 * d * m + (m + d if biases == 2 else d if biases == 1 else 0))


register(Exercise(
    name="adapter_param_count",
    notebook="04_adapters",
    make_cases=_count_cases,
    run=_run_count,
    reference=_reference_count,
    mistakes=(
        Mistake("Count the biases too: b_down (m numbers) and b_up (d numbers).",
                lambda d, f, b, k: _count_with(d, f, b, k, biases=0)),
        Mistake("Both biases train: b_down has m numbers and b_up d.",
                lambda d, f, b, k: _count_with(d, f, b, k, biases=1)),
        Mistake("Houlsby puts two adapters in every block (after attention and after "
                "feed-forward); Pfeiffer one.",
                lambda d, f, b, k: _count_with(d, f, b, k, per_block=1)),
        Mistake("Pfeiffer puts one adapter per block, after the feed-forward sublayer.",
                lambda d, f, b, k: _count_with(d, f, b, k, per_block=2)),
        Mistake("The bottleneck is hidden_size // reduction_factor wide (rounded down), not "
                "hidden_size * reduction_factor.",
                lambda d, f, b, k: _count_with(d, f, b, k, width=lambda d, f: d * f)),
        Mistake("The width is rounded down, m = hidden_size // reduction_factor, when the factor "
                "does not divide the hidden size.",
                lambda d, f, b, k: _count_with(d, f, b, k, width=lambda d, f: round(d / f))),
    ),
    hint="One adapter: W_down (m x d), b_down (m), W_up (d x m), b_up (d), with m = d // factor; "
         "Houlsby two per block, Pfeiffer one.",
))

# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="houlsby_adapters_in_bert_base",
    notebook="04_adapters",
    text="How many adapters does the Houlsby placement insert into BERT-base (12 blocks)?",
    answer=24,
    why="Two per block, after the attention and after the feed-forward sublayer: 2 x 12 = 24.",
    wrong={12: "That is Pfeiffer's count: one per block. Houlsby puts two in each.",
           48: "Two per block, not four: after attention and after feed-forward.",
           2: "That is per block: BERT-base has 12 blocks."},
    otherwise="Count the adapters per block (Houlsby: after attention and after feed-forward), "
              "then multiply by the blocks.",
))

register(Question(
    name="why_no_merge",
    notebook="04_adapters",
    text="LoRA folds into the weights after training; why can't a bottleneck adapter?",
    options={"a": "Its weights are too small to matter once merged.",
             "b": "The non-linearity between W_down and W_up: A(z) is not a linear function of "
                  "z, so no matrix added to a weight computes it.",
             "c": "It has biases, and biases cannot be merged."},
    answer="b",
    why="W_up f(W_down z) changes with z non-linearly; LoRA's (alpha / r) B A z is linear, so it "
        "adds to W0. That is why adapters cost extra at inference (lesson 4, section 6).",
    wrong={"a": "Small or not, they change the output (that is what training them does); the "
                "obstacle is the non-linearity.",
           "c": "Biases fold into a Linear's bias easily; the obstacle is f between the two "
                "projections."},
))

register(Question(
    name="fresh_adapter",
    notebook="04_adapters",
    text="A fresh adapter has W_up = 0 and b_up = 0 (minipeft's identity init). What does the "
         "block compute before any training?",
    options={"a": "Zero: the adapter blocks the signal until it is trained.",
             "b": "Exactly what it computed without the adapter, since A(z) = 0.",
             "c": "Random values, because W_down is random."},
    answer="b",
    why="A(z) = W_up f(...) + b_up = 0, so h + A(.) = h; and W_up still gets a gradient, "
        "f(W_down z + b_down), which is not zero because W_down is random.",
    wrong={"a": "The adapter's output is added to h (a skip connection): A = 0 leaves h as it is.",
           "c": "W_down's random output is multiplied by W_up = 0 before it reaches the block."},
))
