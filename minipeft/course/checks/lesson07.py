"""Lesson 7's exercises: the bytes a 4-bit weight takes, and what QLoRA trains in a model."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minipeft.course.checks import (Case, Draw, Exercise, Inputs, Outputs, Mistake, Question,
                                    register)
from minipeft.lora import LoraConfig, add_lora
from minipeft.memory import count_parameters
from minipeft.quant import quantize_nf4

# --------------------------------------------------------------------------------------------------
# 1. The bytes of an NF4 weight
# --------------------------------------------------------------------------------------------------


def _storage_cases(draw: Draw) -> list[Case]:
    def case(name: str, n: int, blocksize: int, double_quant: bool) -> Case:
        return Case(name, {"n": n, "blocksize": blocksize, "double_quant": double_quant})

    return [case("one block, one constant", 64, 64, False),
            case("SmolLM2's 576 x 1536 layer, double quantisation", 576 * 1536, 64, True),
            case("an odd count: a half-used last byte and a partial last block",
                 2 * draw.integer(500, 5000) + 1, 64, True),
            case("blocks of 128, no double quantisation", 128 * draw.integer(10, 100) + 5, 128,
                 False),
            case("more than 256 blocks: several second-level constants", 64 * 600 + 5, 64, True)]


def _run_storage(nf4_storage_bytes: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"bytes": nf4_storage_bytes(i["n"], i["blocksize"], i["double_quant"])}


def _reference_storage(n: int, blocksize: int, double_quant: bool) -> int:
    """What minipeft's quantiser stores for n weights: packed codes and constants."""
    packed, state = quantize_nf4(torch.randn(n), blocksize, double_quant)
    return packed.numel() * packed.element_size() + state.nbytes()


def _storage_with(n: int, blocksize: int, double_quant: bool, *, code_bytes=None,
                  blocks=None, constants=None) -> int:
    """The count written with the usual slips as options."""
    code_bytes = (n + 1) // 2 if code_bytes is None else code_bytes
    blocks = -(-n // blocksize) if blocks is None else blocks
    if constants is None:
        constants = blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks
    return code_bytes + constants


register(Exercise(
    name="nf4_storage_bytes",
    notebook="07_qlora",
    make_cases=_storage_cases,
    run=_run_storage,
    reference=_reference_storage,
    mistakes=(
        Mistake("The constants count too: every block stores its absmax (4 bytes in float32, or "
                "a 1-byte code with double quantisation).",
                lambda n, b, dq: _storage_with(n, b, dq, constants=0)),
        Mistake("Two 4-bit codes share a byte: the codes take n / 2 bytes, not n.",
                lambda n, b, dq: _storage_with(n, b, dq, code_bytes=n)),
        Mistake("An odd count still needs its last half-used byte: (n + 1) // 2.",
                lambda n, b, dq: _storage_with(n, b, dq, code_bytes=n // 2)),
        Mistake("A partial last block still has its own absmax: round the block count up, "
                "-(-n // blocksize), not down.",
                lambda n, b, dq: _storage_with(n, b, dq, blocks=n // b)),
        Mistake("With double quantisation each block's absmax is a 1-byte code, not 4 bytes.",
                lambda n, b, dq: _storage_with(n, b, dq, constants=4 * -(-n // b))),
        Mistake("Double quantisation has a second level: one float32 absmax per 256 blocks, "
                "plus one float32 offset (the mean subtracted before quantising).",
                lambda n, b, dq: _storage_with(n, b, dq, constants=(
                    -(-n // b) if dq else 4 * -(-n // b)))),
    ),
    hint="Codes: (n + 1) // 2 bytes. Constants: one per block (rounded up); 4 bytes each, or "
         "with double quantisation 1 byte each plus 4 per 256 blocks plus a 4-byte offset "
         "(lesson 6, section on double quantisation; lesson 7, section 1).",
))

# --------------------------------------------------------------------------------------------------
# 2. What QLoRA trains
# --------------------------------------------------------------------------------------------------

LLAMA_2_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
              "o_proj": (4096, 4096), "gate_proj": (4096, 11008), "up_proj": (4096, 11008),
              "down_proj": (11008, 4096)}
SMOLLM2 = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192),
           "o_proj": (576, 576), "gate_proj": (576, 1536), "up_proj": (576, 1536),
           "down_proj": (1536, 576)}


def _lora_cases(draw: Draw) -> list[Case]:
    def case(name: str, layers: dict, blocks: int, r: int, targets: list[str]) -> Case:
        return Case(name, {"layers": {k: list(v) for k, v in layers.items()},
                           "num_blocks": blocks, "r": r, "targets": targets})

    random_layers = {"q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16),
                     "o_proj": (64, 64), "up_proj": (64, draw.integer(65, 300))}
    return [case("Llama-2-7B, r = 16 on every linear layer", LLAMA_2_7B, 32, 16,
                 list(LLAMA_2_7B)),
            case("Llama-2-7B, r = 8 on q and v (the LoRA paper's choice)", LLAMA_2_7B, 32, 8,
                 ["q_proj", "v_proj"]),
            case("SmolLM2: k and v are narrower than q (grouped-query attention)", SMOLLM2, 30,
                 16, list(SMOLLM2)),
            case("a random model, rank 1, three targets", random_layers, draw.integer(2, 12), 1,
                 ["k_proj", "o_proj", "up_proj"])]


def _run_lora(lora_trainable_params: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    layers = {name: tuple(shape) for name, shape in i["layers"].items()}
    return {"params": lora_trainable_params(layers, i["num_blocks"], i["r"], list(i["targets"]))}


def _reference_lora(layers: dict, num_blocks: int, r: int, targets: list[str]) -> int:
    """minipeft's LoRA on one block of meta-device layers (shapes, no memory), times the
    blocks."""
    block = nn.Module()
    for name, (d_in, d_out) in layers.items():
        block.add_module(name, nn.Linear(d_in, d_out, bias=False, device="meta"))
    add_lora(block, LoraConfig(target_modules=targets, r=r))
    return num_blocks * count_parameters(block).trainable


def _lora_with(layers, num_blocks, r, targets, *, per_layer=None, all_layers=False,
               one_block=False) -> int:
    per_layer = per_layer or (lambda d_in, d_out: r * (d_in + d_out))
    chosen = layers if all_layers else {k: v for k, v in layers.items() if k in targets}
    return (1 if one_block else num_blocks) * sum(per_layer(*shape) for shape in chosen.values())


register(Exercise(
    name="lora_trainable_params",
    notebook="07_qlora",
    make_cases=_lora_cases,
    run=_run_lora,
    reference=_reference_lora,
    mistakes=(
        Mistake("A and B both train: A is r x in, B is out x r, so r (in + out) per layer.",
                lambda L, n, r, t: _lora_with(L, n, r, t, per_layer=lambda i, o: r * i)),
        Mistake("A and B both train: B is out x r and A is r x in, so r (in + out) per layer.",
                lambda L, n, r, t: _lora_with(L, n, r, t, per_layer=lambda i, o: r * o)),
        Mistake("LoRA trains r (in + out) numbers per layer, not the layer's in x out.",
                lambda L, n, r, t: _lora_with(L, n, r, t, per_layer=lambda i, o: i * o)),
        Mistake("Every block has its own adapters: multiply by the number of blocks.",
                lambda L, n, r, t: _lora_with(L, n, r, t, one_block=True)),
        Mistake("Only the targeted layers get adapters: leave the others out.",
                lambda L, n, r, t: _lora_with(L, n, r, t, all_layers=True)),
        Mistake("k and v can be narrower than q (grouped-query attention): use each layer's "
                "own (in, out), not the hidden size twice.",
                lambda L, n, r, t: _lora_with(L, n, r, t, per_layer=lambda i, o: 2 * r * i)),
    ),
    hint="Per targeted layer: r (in + out); per block: the sum over the targets; in the model: "
         "times the blocks (lesson 2; lesson 7, sections 5 and 6).",
))

# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="t4_compute_dtype",
    notebook="07_qlora",
    text="A T4 has no bfloat16. Which dtype should 4-bit layers compute in there, and why?",
    options={"a": "float32: float16's range (at most 65,504) overflows in 4-bit training often "
                  "enough to give NaN losses.",
             "b": "float16: it is half the memory of float32 and the T4 has fast float16 units.",
             "c": "bfloat16 anyway: PyTorch emulates it at the same speed."},
    answer="a",
    why="The weights stay 4-bit either way; only the dequantised tile and the activations are in "
        "the compute dtype. float32 is slower on a T4 but does not overflow; minipeft's "
        "compute_dtype_for picks it there.",
    wrong={"b": "The memory saved is small (the weights are 4-bit whatever the compute dtype), "
                "and float16's overflow turns losses into NaN.",
           "c": "Without bfloat16 units it is not emulated at full speed, and minipeft refuses "
                "it on such a GPU with an error that says why."},
))

register(Question(
    name="paged_optimizer_moves",
    notebook="07_qlora",
    text="When does bitsandbytes' paged AdamW move optimizer state to host memory?",
    options={"a": "Every step, there and back.",
             "b": "Only when the GPU runs out of memory: unified memory pages on demand, and "
                  "the pages come back before they are used.",
             "c": "Never: paging is only for the weights."},
    answer="b",
    why="The state lives in CUDA unified memory; the driver evicts pages to the host under "
        "pressure and they are prefetched before the optimizer step. With room to spare, "
        "nothing moves. minipeft's OffloadedAdamW moves every step, on purpose, to show the cost.",
    wrong={"a": "That is OffloadedAdamW, which always keeps the moments on the host; "
                "bitsandbytes' pages only under pressure.",
           "c": "The weights are not paged; the optimizer's moments are."},
))

register(Question(
    name="loading_peak",
    notebook="07_qlora",
    text="load_quantized reads a 16-bit checkpoint into a 4-bit model. What does its peak "
         "memory come to, roughly?",
    options={"a": "The whole 16-bit model, briefly, then the 4-bit one.",
             "b": "The 4-bit model plus one layer in 16 bits (and its quantisation's scratch).",
             "c": "The 4-bit model: nothing else is ever held."},
    answer="b",
    why="It builds the model on the meta device and quantises each weight as soon as it is "
        "read, so at most one full-precision layer exists at a time (lesson 7, section 2).",
    wrong={"a": "That is from_pretrained followed by quantising; load_quantized never holds "
                "the whole model in 16 bits.",
           "c": "Each layer has to be read in full precision before it can be quantised."},
))
