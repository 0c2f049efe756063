"""Lesson 9's exercises: a parameter's shard as FSDP2 cuts it, and the bytes DDP all-reduces."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from minipeft.course.checks import (Case, Draw, Exercise, Inputs, Mistake, Outputs, Question,
                                    register)

# --------------------------------------------------------------------------------------------------
# 1. A shard, as FSDP2 cuts it
# --------------------------------------------------------------------------------------------------


def _shard_cases(draw: Draw) -> list[Case]:
    def case(name: str, shape: tuple[int, ...], rank: int, world: int) -> Case:
        return Case(name, {"param": draw.tensor(*shape), "rank": rank, "world_size": world})

    rows = draw.integer(9, 40)
    return [case("10 rows on 4 processes: the last one's share, padded", (10, 3), 3, 4),
            case("an even split: 8 rows on 2 processes, the first", (8, 5), 0, 2),
            case("fewer rows than processes: the last has none, only padding", (2, 4), 3, 4),
            case("a bias (1-D), 7 values on 3 processes, the middle one", (7,), 1, 3),
            case("random rows on 3 processes, the last", (rows, 6), 2, 3),
            case("one process keeps everything", (5, 2), 0, 1)]


def _run_shard(fsdp_shard: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"shard": fsdp_shard(i["param"].clone(), i["rank"], i["world_size"])}


def _shard_with(param: torch.Tensor, rank: int, world: int, *, rows_each=None,
                pad: bool = True, pad_front: bool = False) -> torch.Tensor:
    """Process `rank`'s rows of `param` (dim 0), written with the usual slips as options."""
    n = param.shape[0]
    rows_each = -(-n // world) if rows_each is None else rows_each
    shard = param[rank * rows_each:(rank + 1) * rows_each]
    missing = rows_each - shard.shape[0]
    if not pad or missing == 0:
        return shard
    zeros = param.new_zeros((missing, *param.shape[1:]))
    return torch.cat([zeros, shard] if pad_front else [shard, zeros])


def _reference_shard(param: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """FSDP2's cut: torch.chunk along dim 0 into chunks of ceil(rows / N) (the last ones may be
    short or missing), each padded with zeros to that size."""
    chunks = torch.chunk(param, world_size, dim=0)
    rows_each = chunks[0].shape[0]
    shard = chunks[rank] if rank < len(chunks) else param[:0]
    padding = [0, 0] * (param.dim() - 1) + [0, rows_each - shard.shape[0]]
    return F.pad(shard, padding)


register(Exercise(
    name="fsdp_shard",
    notebook="09_multi_gpu",
    make_cases=_shard_cases,
    run=_run_shard,
    reference=_reference_shard,
    mistakes=(
        Mistake("Every process holds the same number of rows, rounded up: ceil(rows / N), "
                "-(-rows // N), not rows // N (which drops the last rows).",
                lambda p, r, n: _shard_with(p, r, n, rows_each=p.shape[0] // n)),
        Mistake("Shards all have the same size, so that one all-gather can collect them: pad a "
                "short (or empty) last shard with zeros.",
                lambda p, r, n: _shard_with(p, r, n, pad=False)),
        Mistake("The padding goes after the rows, at the end of the parameter, so that the "
                "gathered tensor starts with the real rows.",
                lambda p, r, n: _shard_with(p, r, n, pad_front=True)),
        Mistake("FSDP cuts contiguous blocks of rows (rows k*ceil(n/N) onwards), not every N-th "
                "row.",
                lambda p, r, n: p[r::n]),
    ),
    hint="rows_each = -(-rows // N); process k keeps rows k*rows_each ... (k+1)*rows_each, padded "
         "with zeros at the end to rows_each (lesson 9, section 4).",
))

# --------------------------------------------------------------------------------------------------
# 2. What DDP all-reduces
# --------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "uint8": torch.uint8}       # uint8: NF4 codes, two per byte


def _ddp_cases(draw: Draw) -> list[Case]:
    def p(shape: list[int], dtype: str, trainable: bool) -> dict:
        return {"shape": shape, "dtype": dtype, "trainable": trainable}

    h, r = 384, 8
    minilm_lora = [p([30522, h], "float32", False), p([h, h], "float32", False),
                   p([r, h], "float32", True), p([h, r], "float32", True),
                   p([2, h], "float32", True), p([2], "float32", True)]
    qlora = [p([1536 * 576 // 2], "uint8", False), p([49152, 576], "bfloat16", False),
             p([16, 576], "float32", True), p([576, 16], "float32", True)]
    full_bf16 = [p([4096, 4096], "bfloat16", True), p([4096], "bfloat16", True),
                 p([32000, 4096], "bfloat16", True)]
    mixed = [p([draw.integer(2, 64), draw.integer(2, 64)], dtype, draw.integer(0, 1) == 1)
             for dtype in ("float32", "bfloat16", "float16", "float32", "float16")]
    frozen = [p([64, 64], "float32", False), p([64], "bfloat16", False)]
    return [Case("LoRA on MiniLM-sized layers, with a trained head", {"parameters": minilm_lora}),
            Case("QLoRA: frozen codes and bf16 embeddings, float32 adapters",
                 {"parameters": qlora}),
            Case("full fine-tuning in bf16", {"parameters": full_bf16}),
            Case("random shapes and dtypes", {"parameters": mixed}),
            Case("nothing trains", {"parameters": frozen})]


def _run_ddp(ddp_bytes_per_step: Callable, inputs: Inputs) -> Outputs:
    return {"bytes": ddp_bytes_per_step([dict(p) for p in inputs["parameters"]])}


def _reference_ddp(parameters: list[dict]) -> int:
    """The gradients DDP's buckets hold: one per trainable parameter, in its dtype (meta tensors:
    shapes and dtypes, no memory)."""
    tensors = [torch.empty(p["shape"], dtype=DTYPES[p["dtype"]], device="meta")
               for p in parameters if p["trainable"]]
    return sum(t.numel() * t.element_size() for t in tensors)


def _ddp_with(parameters: list[dict], *, frozen_too=False, width=None) -> int:
    return sum(math.prod(p["shape"]) * (width or DTYPES[p["dtype"]].itemsize)
               for p in parameters if p["trainable"] or frozen_too)


register(Exercise(
    name="ddp_bytes_per_step",
    notebook="09_multi_gpu",
    make_cases=_ddp_cases,
    run=_run_ddp,
    reference=_reference_ddp,
    mistakes=(
        Mistake("Frozen parameters have no gradient, so DDP sends nothing for them: count only "
                "the trainable ones.",
                lambda ps: _ddp_with(ps, frozen_too=True)),
        Mistake("Count bytes, not numbers: each gradient element takes its dtype's size (4 bytes "
                "in float32, 2 in bfloat16 or float16).",
                lambda ps: _ddp_with(ps, width=1)),
        Mistake("A gradient has its parameter's dtype: 2 bytes per element for bfloat16 and "
                "float16, 4 only for float32.",
                lambda ps: _ddp_with(ps, width=4)),
    ),
    hint="Sum numel x bytes per element over the trainable parameters only; a gradient has its "
         "parameter's dtype (lesson 9, section 2).",
))

# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="fsdp1_quant_storage",
    notebook="09_multi_gpu",
    text="Why did QLoRA under PyTorch's first FSDP need the 4-bit codes stored in a float dtype "
         "(bitsandbytes' bnb_4bit_quant_storage=torch.bfloat16)?",
    options={"a": "FSDP1 flattens each unit's parameters into one tensor of one dtype and "
                  "refuses integer tensors, so uint8 codes could not join the bf16 weights.",
             "b": "bfloat16 codes are dequantised more accurately than uint8 ones.",
             "c": "NCCL cannot send uint8 tensors between GPUs."},
    answer="a",
    why="The bytes are the same either way; only the dtype label changes so that FSDP1 can "
        "flatten them with the rest. FSDP2 shards each parameter on its own and gathers mixed "
        "dtypes as bytes, so minipeft keeps the codes uint8.",
    wrong={"b": "The codes are the same bits whatever dtype holds them; dequantisation reads the "
                "same 4-bit indices.",
           "c": "NCCL sends any bytes; FSDP1's flat parameter was the constraint."},
))

register(Question(
    name="ddp_lora_mib",
    notebook="09_multi_gpu",
    text="DDP trains QLoRA with r=16 on every linear layer of Llama-2-7B: 39,976,960 float32 "
         "trainable parameters. How many MiB does it all-reduce per step? (A number.)",
    answer=39_976_960 * 4 / 2**20,
    tolerance=0.01,
    why="4 bytes per trainable parameter, once per step: 152.5 MiB, against 12.6 GiB of bf16 "
        "gradients for full fine-tuning.",
    wrong={39_976_960 * 2 / 2**20: "The adapters train in float32: 4 bytes per gradient, not 2.",
           39_976_960 / 2**20: "Count bytes: 4 per float32 gradient.",
           39_976_960 * 8 / 2**20: "The all-reduce sends the gradients once per step; the ring's "
                                   "2 (N-1)/N factor is traffic per link, not what is reduced."},
    otherwise="Multiply the trainable parameters by 4 bytes and divide by 2**20.",
))

register(Question(
    name="fsdp_what_stays",
    notebook="09_multi_gpu",
    text="FSDP over more and more GPUs, each with one sequence: which part of a GPU's memory "
         "does not shrink?",
    options={"a": "The 4-bit codes of the frozen base.",
             "b": "AdamW's moments for the adapters.",
             "c": "The activations and logits of the GPU's own sequence."},
    answer="c",
    why="FSDP divides parameters, gradients and optimizer state by N; each GPU still computes "
        "its own sequence, whose activations and logits it keeps (lesson 9, section 5).",
    wrong={"a": "The codes are parameters (minipeft makes them so): FSDP divides them by N.",
           "b": "Optimizer state follows its parameter's shard: 1/N on each GPU."},
))
