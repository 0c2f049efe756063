"""What the exercises check: for every function a learner writes, the cases it runs on, minipeft's
own solution (which gives the expected outputs), and the usual mistakes with the hint each one earns.

An `Exercise` is data, and `minipeft.grading` is the machinery that uses it (instant feedback with
`check`, and the grading command). Each exercise has

- `make_cases(draw)`: named cases with random inputs drawn from one seed (`Draw`), edge cases included;
- `run(solution, inputs)`: calls a solution on one case's inputs, the same way for the learner's
  function, minipeft's reference and the mistakes, and collects what it returns as named outputs;
- `reference`: the right answer, written with minipeft's own modules (lora, memory, quant), so the
  expected outputs always come from the package the lessons teach;
- `mistakes`: wrong solutions, written the way learners get it wrong (the scaling forgotten, the
  nibbles swapped, ...). When a learner's outputs match one of them, its hint explains the slip.
  This is how a check diagnoses behaviour without reading source code.

Adding the exercise of a new lesson: write `solutions/NN_name.ipynb` (solution code between
`### BEGIN SOLUTION` / `### END SOLUTION`, then a cell `check("name", name)`), and register an
`Exercise` below with `notebook="NN_name"`: a reference, a `run`, at least three cases, and the
usual mistakes.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from minipeft import training
from minipeft.lora import LoraConfig, LoraLinear
from minipeft.memory import count_parameters, training_state_bytes
from minipeft.quant import NF4State, NF4_CODE, NF4_MIDPOINTS, dequantize_nf4, quantize_nf4

Inputs = dict[str, Any]   # tensors, and JSON values (numbers, strings, lists, dicts)
Outputs = dict[str, Any]  # what `Exercise.run` collects: tensors and numbers, by name


class Draw:
    """Random inputs from one seed: the same seed gives the same cases in every process."""

    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(str(seed))  # str seeds are hashed the same way in every process
        self.generator = torch.Generator().manual_seed(self.rng.getrandbits(63))

    def tensor(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.generator) * scale).to(dtype)

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high], both included."""
        return self.rng.randint(low, high)

    def seed(self) -> int:
        return self.rng.getrandbits(31)


@dataclass(frozen=True)
class Case:
    name: str       # what the report calls it, e.g. "rank 1" or "bf16"
    inputs: Inputs
    hint: str = ""  # for a failure on this case that no usual mistake explains


@dataclass(frozen=True)
class Mistake:
    hint: str
    solution: Callable  # a wrong solution, with the learner's signature


@dataclass(frozen=True)
class Exercise:
    name: str                              # the function the learner writes, and the name `check` takes
    notebook: str                          # the stem of its notebook in solutions/ and exercises/
    make_cases: Callable[[Draw], list[Case]]
    run: Callable[[Callable, Inputs], Outputs]
    reference: Callable
    mistakes: tuple[Mistake, ...] = ()
    error_hints: tuple[tuple[str, str], ...] = ()  # (regex on "ErrorType: message", hint)
    hint: str = ""                         # when no usual mistake explains a difference
    tolerance: float | None = None         # max |got - expected| / max |expected| for float outputs;
                                           # None: by dtype (see grading.TOLERANCE)


EXERCISES: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    if exercise.name in EXERCISES:
        raise ValueError(f"an exercise named {exercise.name!r} is already registered: pick another name")
    EXERCISES[exercise.name] = exercise
    return exercise


def exercises_of(notebook: str) -> list[Exercise]:
    """The exercises of one notebook, in the order they were registered (the notebook's order)."""
    return [e for e in EXERCISES.values() if e.notebook == notebook]


def notebooks() -> list[str]:
    return sorted({e.notebook for e in EXERCISES.values()})


# ---------------------------------------------------------------------------------------------------
# Lesson 1: one full fine-tuning step, and the 16-bytes-per-parameter rule
# ---------------------------------------------------------------------------------------------------

TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=16, num_labels=2)


def _tiny_bert(config: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A one-layer BERT classifier with the given weights, in eval mode (as from_pretrained returns it)."""
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(**config))
    model.load_state_dict(weights)
    return model.eval()


def _train_step_cases(draw: Draw) -> list[Case]:
    def case(name: str, optimizer: str, steps: int, padded: bool) -> Case:
        with torch.random.fork_rng(devices=[]):  # the initial weights come from the seed, not the caller's RNG
            torch.manual_seed(draw.seed())
            from transformers import BertConfig, BertForSequenceClassification
            weights = BertForSequenceClassification(BertConfig(**TINY_BERT)).state_dict()
        inputs: Inputs = {f"weights.{k}": v for k, v in weights.items()}
        for step in range(steps):
            batch, length = 4, 6
            ids = torch.randint(1, TINY_BERT["vocab_size"], (batch, length), generator=draw.generator)
            mask = torch.ones(batch, length, dtype=torch.long)
            if padded:
                mask[1:, 3:] = 0
                ids[mask == 0] = 0
            inputs |= {f"batch{step}.input_ids": ids, f"batch{step}.attention_mask": mask,
                       f"batch{step}.labels": torch.randint(0, 2, (batch,), generator=draw.generator)}
        return Case(name, inputs | {"config": TINY_BERT, "optimizer": optimizer, "steps": steps,
                                    "seed": draw.seed()})

    return [case("one AdamW step", "adamw", 1, False),
            case("two steps in a row", "adamw", 2, False),
            case("SGD with momentum", "sgd", 2, False),
            case("padded batch", "adamw", 1, True)]


def _run_train_step(train_step: Callable, inputs: Inputs) -> Outputs:
    """Build the model, batches and optimizer of a case; call train_step on each batch; collect losses and weights."""
    model = _tiny_bert(inputs["config"], {k.removeprefix("weights."): v for k, v in inputs.items()
                                          if k.startswith("weights.")})
    if inputs["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(inputs["seed"])  # the same dropout masks for every solution
    outputs: Outputs = {}
    for step in range(inputs["steps"]):
        batch = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(f"batch{step}.")}
        outputs[f"loss returned by step {step + 1}"] = train_step(model, batch, optimizer)
    return outputs | {f"{name} after training": p for name, p in model.named_parameters()}


def _step_without_zero_grad(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_without_optimizer_step(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.zero_grad()
    return loss.item()


def _step_in_eval_mode(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


register(Exercise(
    name="train_step",
    notebook="01_full_finetuning",
    make_cases=_train_step_cases,
    run=_run_train_step,
    reference=training.train_step,
    mistakes=(
        Mistake("The weights did not change. After loss.backward() (which fills each parameter's .grad), "
                "optimizer.step() is what updates the weights.", _step_without_optimizer_step),
        Mistake("The first step is right but the second is not: gradients add up across backward() calls. "
                "Call optimizer.zero_grad() after optimizer.step() (or before backward()).",
                _step_without_zero_grad),
        Mistake("The loss differs from a training step's: call model.train() first. A pretrained model comes "
                "in eval mode, and training switches dropout on.", _step_in_eval_mode),
    ),
    error_hints=(
        (r"unexpected keyword argument", "The batch is a dict of input_ids, attention_mask and labels: "
                                         "model(**batch) passes them all, labels included."),
    ),
    hint="A full step is: model.train(), loss = cross-entropy of model(...).logits against the labels (or "
         "model(**batch).loss), loss.backward(), optimizer.step(), optimizer.zero_grad(), return loss.item(). "
         "Use the optimizer you are given: making a new one inside the step loses its state.",
    tolerance=1e-4,
))


def _training_bytes_cases(draw: Draw) -> list[Case]:
    def case(name: str, n_params: int, n_trainable: int, bytes_per_weight: int) -> Case:
        return Case(name, {"n_params": n_params, "n_trainable": n_trainable, "bytes_per_weight": bytes_per_weight})

    bert = draw.integer(100_000_000, 120_000_000)
    llama = draw.integer(6_500_000_000, 7_500_000_000)
    small = draw.integer(20_000_000, 30_000_000)
    return [case("full fine-tuning in fp32", bert, bert, 4),
            case("full fine-tuning of a 7B model", llama, llama, 4),
            case("PEFT: 1% trainable", small, small // 100, 4),
            case("bf16 weights with half trainable", llama, llama // 2, 2),
            case("nothing trainable", small, 0, 4)]


def _run_training_bytes(training_bytes: Callable, inputs: Inputs) -> Outputs:
    return {"bytes": training_bytes(inputs["n_params"], inputs["n_trainable"], inputs["bytes_per_weight"])}


WEIGHT_DTYPES = {4: torch.float32, 2: torch.bfloat16}


def _reference_training_bytes(n_params: int, n_trainable: int, bytes_per_weight: int = 4) -> int:
    """`minipeft.memory.training_state_bytes` of a model of that size, built on the meta device (no memory)."""
    dtype = WEIGHT_DTYPES[bytes_per_weight]
    model = nn.Module()
    model.frozen = nn.Parameter(torch.empty(n_params - n_trainable, dtype=dtype, device="meta"), requires_grad=False)
    model.trainable = nn.Parameter(torch.empty(n_trainable, dtype=dtype, device="meta"))
    return training_state_bytes(model).total


register(Exercise(
    name="training_bytes",
    notebook="01_full_finetuning",
    make_cases=_training_bytes_cases,
    run=_run_training_bytes,
    reference=_reference_training_bytes,
    mistakes=(
        Mistake("16 bytes per parameter holds for fp32 weights with every parameter trainable. Here weights "
                "take bytes_per_weight bytes, and only the n_trainable parameters have gradients and Adam state.",
                lambda n, t, w=4: 16 * n),
        Mistake("Frozen parameters have no gradient and no optimizer state: only the n_trainable "
                "parameters pay for those.",
                lambda n, t, w=4: n * w + n * w + n * 8),
        Mistake("Frozen parameters have no gradient: count gradients for the n_trainable parameters only.",
                lambda n, t, w=4: n * w + n * w + t * 8),
        Mistake("Frozen parameters have no optimizer state: Adam's m and v exist for trainable parameters only.",
                lambda n, t, w=4: n * w + t * w + n * 8),
        Mistake("The gradients are missing: every trainable parameter has one, the size of its weight.",
                lambda n, t, w=4: n * w + t * 8),
        Mistake("Adam keeps two numbers per trainable parameter, m and v: you counted one.",
                lambda n, t, w=4: n * w + t * w + t * 4),
        Mistake("Adam's m and v are kept in fp32 (4 bytes each) even when the weights are bf16.",
                lambda n, t, w=4: n * w + t * w + t * 2 * w),
        Mistake("A gradient has the dtype of its weight: bytes_per_weight, not always 4.",
                lambda n, t, w=4: n * w + t * 4 + t * 8),
    ),
    hint="Weights: n_params x bytes_per_weight. Gradients: n_trainable x bytes_per_weight. "
         "Adam: n_trainable x 2 moments x 4 bytes (fp32). In fp32 with everything trainable that is 16 bytes "
         "per parameter.",
))

# ---------------------------------------------------------------------------------------------------
# Lessons 2 and 3: the LoRA forward pass, merging, and counting LoRA's parameters
# ---------------------------------------------------------------------------------------------------


def _lora_layer(W0: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float,
                r: int) -> LoraLinear:
    """minipeft's LoraLinear holding exactly these weights."""
    out_features, in_features = W0.shape
    layer = LoraLinear(nn.Linear(in_features, out_features, dtype=W0.dtype))
    layer.add_adapter("default", LoraConfig(target_modules=["layer"], r=r, alpha=alpha), dtype=A.dtype)
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
            "B": torch.zeros(out_features, r, dtype=dtype) if fresh else draw.tensor(out_features, r, dtype=dtype),
            "alpha": alpha, "r": r}
        if with_input:
            inputs["x"] = draw.tensor(*batch_shape, in_features, dtype=dtype)
        return Case(name, inputs)

    return [case("square layer", (3,), 8, 8, r=2, alpha=8),
            case("rank 1", (4,), 6, 5, r=1, alpha=3),
            case("odd sizes and a 3-d input", (2, 3), 7, 13, r=3, alpha=5),
            case("bf16", (5,), 16, 12, r=4, alpha=16, dtype=torch.bfloat16),
            case("fresh adapter (B = 0)", (3,), 9, 4, r=2, alpha=4, fresh=True)]


def _run_lora_forward(lora_forward: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"h": lora_forward(i["x"], i["W0"], i["b"], i["A"], i["B"], i["alpha"], i["r"])}


@torch.no_grad()
def _reference_lora_forward(x, W0, b, A, B, alpha, r):
    return _lora_layer(W0, b, A, B, alpha, r)(x)


LORA_ERROR_HINTS = (
    (r"cannot be multiplied|size mismatch|must match the size|shape .* is invalid",
     "Check each matrix's orientation: x is (..., in), W0 is (out, in), A is (r, in), B is (out, r). "
     "So x @ W0.T and x @ A.T @ B.T are both (..., out)."),
)

register(Exercise(
    name="lora_forward",
    notebook="02_lora",
    make_cases=lambda draw: _lora_cases(draw, with_input=True),
    run=_run_lora_forward,
    reference=_reference_lora_forward,
    mistakes=(
        Mistake("The LoRA branch is scaled: h = x W0ᵀ + b + (alpha / r) x Aᵀ Bᵀ. The factor alpha / r "
                "seems to be missing.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(x, W0, b, A, B, r, r)),
        Mistake("You scaled by alpha; the factor is alpha / r (so that trying another rank keeps the "
                "update's size).",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(x, W0, b, A, B, alpha * r, r)),
        Mistake("The factor is alpha / r, not r / alpha.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(x, W0, b, A, B, r * r / alpha, r)),
        Mistake("The frozen layer has a bias: h = x W0ᵀ + b + ...; b seems to be missing.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(x, W0, torch.zeros_like(b), A, B, alpha, r)),
        Mistake("h is the frozen layer's output plus the update; you returned the LoRA branch only. "
                "Add x W0ᵀ + b.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(
                    x, torch.zeros_like(W0), torch.zeros_like(b), A, B, alpha, r)),
        Mistake("You returned the frozen layer's output only: add the LoRA branch (alpha / r) x Aᵀ Bᵀ.",
                lambda x, W0, b, A, B, alpha, r: _reference_lora_forward(x, W0, b, A, torch.zeros_like(B), alpha, r)),
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
        Mistake("W0 was changed in place: return a new tensor, W0 + (alpha / r) B @ A, and leave W0 as it was "
                "(`W0 + ...`, not `W0 += ...`), or unmerging is impossible.", _merge_in_place),
        Mistake("The update is scaled: W = W0 + (alpha / r) B @ A. The factor alpha / r seems to be missing.",
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
    error_hints=LORA_ERROR_HINTS,
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
        Mistake("That is the full matrix's count (in x out): LoRA trains A (r x in) and B (out x r) instead.",
                lambda i, o, r: i * o),
        Mistake("A (r x in) and B (out x r) are added, not multiplied: r x in + out x r.",
                lambda i, o, r: r * i * o),
        Mistake("You counted A (r x in) only: B (out x r) trains too.", lambda i, o, r: r * i),
        Mistake("You counted B (out x r) only: A (r x in) trains too.", lambda i, o, r: r * o),
    ),
    hint="A is r x in and B is out x r: r x (in + out) parameters in all.",
))

# ---------------------------------------------------------------------------------------------------
# Lesson 6: blockwise NF4 quantisation and dequantisation
# ---------------------------------------------------------------------------------------------------


def _clear_of_boundaries(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`x` with the values that fall within 1e-4 of a rounding boundary (x / absmax near a midpoint between
    two NF4 codes) moved off it: there, the order of float operations, not the method, picks the code."""

    flat = x.flatten()
    for _ in range(10):
        padded = F.pad(flat.float(), (0, -flat.numel() % blocksize)).view(-1, blocksize)
        scaled = (padded / padded.abs().amax(1, keepdim=True).clamp(min=1e-30)).flatten()[:flat.numel()]
        near = (scaled[:, None] - NF4_MIDPOINTS).abs().amin(1) < 1e-4
        if not near.any():
            return flat.view(x.shape)
        flat = torch.where(near, flat * 0.97, flat)  # never the block's absmax (|x / absmax| = 1 is no midpoint)
    raise AssertionError("could not move the inputs off the rounding boundaries")


ZERO_BLOCK_HINT = ("A block of zeros has absmax 0, and x / 0 is NaN. Guard the division (e.g. "
                   "absmax.clamp(min=1e-12)) so that zeros get the code of 0.0, index 7.")


def _nf4_cases(draw: Draw, quantized: bool) -> list[Case]:
    """Quantisation cases (inputs x, blocksize); with `quantized`, dequantisation cases made from them by
    minipeft.quant (inputs packed, absmax, n, blocksize)."""

    def case(name: str, shape: tuple[int, ...], blocksize: int, dtype: torch.dtype = torch.float32,
             zero_block: bool = False, hint: str = "") -> Case:
        x = draw.tensor(*shape, dtype=dtype, scale=draw.integer(1, 100) / 10)
        if zero_block:
            x.view(-1)[:blocksize] = 0
        x = _clear_of_boundaries(x, blocksize)
        if not quantized:
            return Case(name, {"x": x, "blocksize": blocksize}, hint)
        packed, state = quantize_nf4(x.float(), blocksize)
        return Case(name, {"packed": packed.view(-1), "absmax": state.absmax, "n": x.numel(),
                           "blocksize": blocksize}, hint)

    return [case("one block", (64,), 64),
            case("several blocks of a matrix", (8, 24), 32),
            case("odd length with a last partial block", (75,), 16),
            case("large blocks", (5, 60), 128) if quantized else case("bf16 input", (6, 16), 32, dtype=torch.bfloat16),
            case("a block of zeros", (3, 64), 64, zero_block=True, hint=ZERO_BLOCK_HINT)]


def _nibbles_swapped(packed: torch.Tensor) -> torch.Tensor:
    return (packed << 4) | (packed >> 4)


def _run_quantize(quantize: Callable, inputs: Inputs) -> Outputs:
    result = quantize(inputs["x"], inputs["blocksize"])
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"expected a tuple (packed, absmax), got {type(result).__name__}")
    packed, absmax = result
    flat = packed.reshape(-1) if isinstance(packed, torch.Tensor) else packed  # any shape, in memory order
    return {"packed": flat, "absmax": absmax}


def _reference_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:

    packed, state = quantize_nf4(x, blocksize)
    return packed.view(-1), state.absmax


def _quantize_with_one_absmax(x, blocksize):

    n = x.numel()
    packed, state = quantize_nf4(x, blocksize=min(4096, 2 ** math.ceil(math.log2(max(n, 2)))))
    return packed.view(-1), state.absmax.expand(-(-n // blocksize))


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit indices, two per byte (the first in the high nibble), an odd count padded with index 7."""
    codes = F.pad(codes.flatten(), (0, codes.numel() % 2), value=7).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 rows of `blocksize` (the last zero-padded), and each row's absmax."""
    flat = x.float().flatten()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    return blocks, blocks.abs().amax(1)


def _quantize_rounding_down(x, blocksize):

    blocks, absmax = _blocks(x, blocksize)
    scaled = blocks / absmax.clamp(min=1e-12)[:, None]
    codes = (torch.searchsorted(NF4_CODE, scaled.contiguous(), right=True) - 1).clamp(0, 15)
    return _pack(codes.flatten()[:x.numel()]), absmax


def _quantize_dividing_by_zero(x, blocksize):

    blocks, absmax = _blocks(x, blocksize)
    scaled = blocks / absmax[:, None]  # NaN in a block of zeros
    return _pack((scaled.flatten()[:x.numel(), None] - NF4_CODE).abs().argmin(1)), absmax


def _quantize_without_scaling(x, blocksize):

    _, absmax = _blocks(x, blocksize)
    return _pack(torch.bucketize(x.float().flatten().clamp(-1, 1), NF4_MIDPOINTS)), absmax


register(Exercise(
    name="quantize_nf4_blockwise",
    notebook="06_nf4",
    make_cases=lambda draw: _nf4_cases(draw, quantized=False),
    run=_run_quantize,
    reference=_reference_quantize,
    mistakes=(
        Mistake("The nibbles are the wrong way round: the first value of each pair goes in the high nibble, "
                "(q[0::2] << 4) | q[1::2].",
                lambda x, bs: (lambda p, a: (_nibbles_swapped(p), a))(*_reference_quantize(x, bs))),
        Mistake("absmax is per block: each block of blocksize values is scaled by its own max |x|, not by the "
                "whole tensor's.", _quantize_with_one_absmax),
        Mistake("The last block may be partial: quantise it too, with its own absmax. (Pad with zeros to a "
                "whole block; zeros take index 7.)",
                lambda x, bs: _reference_quantize(x.flatten()[:x.numel() // bs * bs], bs)),
        Mistake("Round to the nearest code (argmin |v - NF4_CODE|, or compare with the midpoints between "
                "codes), not to the code below.", _quantize_rounding_down),
        Mistake(ZERO_BLOCK_HINT, _quantize_dividing_by_zero),
        Mistake("absmax is stored in float32, whatever x's dtype: compute it from x.float().",
                lambda x, bs: (lambda p, a: (p, a.to(x.dtype)))(*_reference_quantize(x, bs))),
        Mistake("Divide each value by its block's absmax before looking up the code: the codes span [-1, 1].",
                _quantize_without_scaling),
    ),
    error_hints=(
        (r"shape '\[.*\]' is invalid for input of size",
         "x.numel() need not be a multiple of blocksize: pad the last block with zeros before view(-1, blocksize)."),
    ),
    hint="Per block: absmax = max |x| (float32); v = x / absmax; q = index of the nearest NF4_CODE value; "
         "then two indices per byte, the first in the high nibble, an odd count padded with index 7.",
))


def _run_dequantize(dequantize: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"x": dequantize(i["packed"], i["absmax"], i["n"], i["blocksize"])}


def _reference_dequantize(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:

    return dequantize_nf4(packed.view(-1, 1), NF4State(absmax, torch.Size([n]), torch.float32, blocksize))


def _unpacked_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).flatten().long()


def _dequantize_repeating_absmax(packed, absmax, n, blocksize):

    return NF4_CODE[_unpacked_codes(packed)[:n]] * absmax.repeat(blocksize)[:n]


def _dequantize_keeping_padding(packed, absmax, n, blocksize):

    codes = _unpacked_codes(packed)
    return NF4_CODE[codes] * absmax.repeat_interleave(blocksize)[:codes.numel()]


register(Exercise(
    name="dequantize_nf4_blockwise",
    notebook="06_nf4",
    make_cases=lambda draw: _nf4_cases(draw, quantized=True),
    run=_run_dequantize,
    reference=_reference_dequantize,
    mistakes=(
        Mistake("The nibbles are the wrong way round: the high nibble (byte >> 4) holds the first value, the "
                "low nibble (byte & 15) the second.",
                lambda p, a, n, bs: _reference_dequantize(_nibbles_swapped(p), a, n, bs)),
        Mistake("Each code value is multiplied by its block's absmax: x = NF4_CODE[q] * absmax[block].",
                lambda p, a, n, bs: _reference_dequantize(p, torch.ones_like(a), n, bs)),
        Mistake("Each absmax scales blocksize consecutive values: absmax.repeat_interleave(blocksize), "
                "not absmax.repeat(...).", _dequantize_repeating_absmax),
        Mistake("Return exactly n values: an odd n leaves one padding nibble to drop.", _dequantize_keeping_padding),
        Mistake("The last block may be partial: dequantise it too, with its own absmax.",
                lambda p, a, n, bs: _reference_dequantize(p[:n // bs * bs // 2], a[:n // bs], n // bs * bs, bs)),
    ),
    hint="Unpack two indices per byte (byte >> 4 first, then byte & 15), look them up in NF4_CODE, multiply "
         "by the absmax of their block (value i is in block i // blocksize), and keep the first n values.",
))
