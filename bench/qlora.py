"""minipeft QLoRA against peft + bitsandbytes: the same 4-bit base (byte for byte), the same LoRA
adapters and inputs, one training step timed in one run.

    python bench/qlora.py [--seq-len 128] [--batch 4]

Model: the course's offline "llm", SmolLM2-135M-Instruct (30 layers, hidden 576), every linear
layer but the head in NF4 with double quantisation, LoRA r=16 (alpha 32) on all of them, gradient
checkpointing on, float32 compute (the CPU default). Measured on CPU with 2 threads:

- train step: forward + backward + AdamW step on a causal-LM batch
- peak memory: the peak growth of live tensors over 3 training steps (PyTorch's profiler, in this
  process), and of the resident set, each implementation in a fresh process (it also holds what
  the C library's allocator keeps of freed blocks, which varies between runs)

Times are medians over repeats after warm-up, the two implementations interleaved. Ratios are
minipeft / peft: below 1.0 means minipeft is faster/smaller. On a GPU this script needs a 7B-shaped
model to say anything about QLoRA's real use; that run is still to be made.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from minipeft.memory import count_parameters, format_bytes, peak_tensor_memory
from minipeft.planner import plan
from timing import (bnb_4bit, median_times, peak_in_subprocess, print_table, train_step_fn,
                    training_peak)

THREADS = 2
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, REPEATS = 2, 7
MEMORY_STEPS = 3


def load_llm() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from minipeft import course
    return AutoModelForCausalLM.from_pretrained(course.model_source("llm", "offline"))


def with_qlora(impl: str) -> nn.Module:
    """The base, quantised and given LoRA adapters by `impl`, checkpointing on."""
    torch.manual_seed(0)
    model = load_llm()
    if impl == "minipeft":
        from minipeft.lora import LoraConfig, add_lora
        from minipeft.qlora import prepare_for_training, quantize_model
        model = add_lora(quantize_model(model), LoraConfig(target_modules=TARGETS, r=RANK,
                                                           alpha=ALPHA))
        return prepare_for_training(model)
    import peft
    model = bnb_4bit(model)
    # peft's prepare_model_for_kbit_training turns checkpointing on only for a model transformers
    # loaded in 4 bits (is_loaded_in_4bit), not for this one: the same checkpointing as minipeft's
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                      target_modules=TARGETS))


def batch_of(batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(100, 40000, (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def measure_peak(impl: str, batch: int, seq_len: int) -> int:
    """Run in a child process: peak RSS growth over MEMORY_STEPS training steps."""
    torch.set_num_threads(THREADS)
    step = train_step_fn(with_qlora(impl), batch_of(batch, seq_len))
    return training_peak(step, MEMORY_STEPS)


def bench(batch: int, seq_len: int) -> list[tuple[str, float, float, str]]:
    models = {impl: with_qlora(impl) for impl in ("minipeft", "peft")}
    counts = {impl: count_parameters(m).trainable for impl, m in models.items()}
    assert counts["minipeft"] == counts["peft"], counts
    inputs = batch_of(batch, seq_len)
    with torch.no_grad():
        losses = {impl: m.eval()(**inputs).loss.item() for impl, m in models.items()}
    assert abs(losses["minipeft"] - losses["peft"]) < 1e-4, losses
    train = median_times({impl: train_step_fn(m, inputs) for impl, m in models.items()},
                         REPEATS, WARMUP)
    peaks = {impl: peak_in_subprocess(__file__, impl, str(batch), str(seq_len))
             for impl in ("minipeft", "peft")}
    print(f"trainable parameters {counts['minipeft']:,}; loss before training "
          f"{losses['minipeft']:.5f} (minipeft) vs {losses['peft']:.5f} (peft + bitsandbytes)")
    print(f"tokens / s: {batch * seq_len / train['minipeft']:.0f} (minipeft), "
          f"{batch * seq_len / train['peft']:.0f} (peft + bitsandbytes)")
    predicted = plan(models["minipeft"].config, "qlora", batch=batch, seq_len=seq_len, rank=RANK,
                     weight_dtype="float32")
    # the adapters' own weights exist before the measured steps: their gradients and AdamW's
    # moments, the activations and the logits come during them
    growth = (predicted.trainable_state - 4 * predicted.trainable_params + predicted.activations
              + predicted.logits)
    tensors = {impl: tensor_peak(impl, inputs) for impl in ("minipeft", "peft")}
    print(f"planner: training adds {format_bytes(growth)} to the loaded model (gradients, AdamW, "
          f"activations, logits); measured (minipeft): live tensors' peak "
          f"{format_bytes(tensors['minipeft'])} "
          f"({100 * (tensors['minipeft'] - growth) / growth:+.0f} %), resident set's peak "
          f"{format_bytes(peaks['minipeft'])} "
          f"({100 * (peaks['minipeft'] - growth) / growth:+.0f} %: what the C allocator keeps of "
          "freed blocks included)")
    return [("train step (fwd+bwd+AdamW)", train["minipeft"], train["peft"], "ms"),
            (f"peak live tensors, {MEMORY_STEPS} steps", tensors["minipeft"], tensors["peft"],
             "bytes"),
            (f"peak resident set, {MEMORY_STEPS} steps", peaks["minipeft"], peaks["peft"],
             "bytes")]


def tensor_peak(impl: str, inputs: dict[str, torch.Tensor]) -> int:
    """Peak growth of live tensors over MEMORY_STEPS training steps of a fresh model and AdamW:
    what the steps allocate, without the C allocator's reserve (which made the resident set
    vary by up to a fifth between runs of the same code)."""
    return training_peak(train_step_fn(with_qlora(impl), inputs), MEMORY_STEPS,
                         peak_tensor_memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--peak", nargs=3, metavar=("IMPL", "BATCH", "SEQ"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.peak:
        impl, batch, seq_len = args.peak
        print(measure_peak(impl, int(batch), int(seq_len)))
        return
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {THREADS} threads, SmolLM2-135M, NF4 + double quant, LoRA "
          f"r={RANK} on all linear layers, checkpointing, batch {args.batch} x {args.seq_len} "
          f"tokens, median of {REPEATS} after {WARMUP} warm-up")
    print_table(bench(args.batch, args.seq_len))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
