"""minipeft QLoRA against peft + bitsandbytes: the same 4-bit base (byte for byte), the same LoRA
adapters and inputs, one training step timed in one run.

    python bench/qlora.py [--seq-len 128] [--batch 4]     # CPU: SmolLM2-135M
    python bench/qlora.py --gpu [--shape llama-2-7b]       # a CUDA GPU: a 7B-shaped model

Model: the course's offline "llm", SmolLM2-135M-Instruct (30 layers, hidden 576), every linear
layer but the head in NF4 with double quantisation, LoRA r=16 (alpha 32) on all of them, gradient
checkpointing on, float32 compute (the CPU default). Measured on CPU with 2 threads:

- train step: forward + backward + AdamW step on a causal-LM batch
- peak memory: the peak growth of live tensors over 3 training steps (PyTorch's profiler, in this
  process), and of the resident set, each implementation in a fresh process (it also holds what
  the C library's allocator keeps of freed blocks, which varies between runs)

GPU (--gpu): a model of a shipped config's shape (minipeft/configs; Llama-2-7B by default) with
random bfloat16 weights (memory and speed do not depend on their values), built on the GPU and
quantised there (its 16-bit weights need about 14 GB while it is built), bfloat16 compute, batch 1
and 4 x 512 and 2,048 tokens. Per shape: the training step's time and tokens/s, and each
implementation's peak (the CUDA allocator's `max_memory_allocated`: tensors only, its model
included) against the planner's total and a T4's 14.75 GiB. What the allocator reserved beyond
its peak and the CUDA context are printed on their own lines, not hidden in the peak.

Times are medians over repeats after warm-up, the two implementations interleaved. Ratios are
minipeft / peft: below 1.0 means minipeft is faster/smaller. Both sides quantise the same weights
to the same bytes (checked here) and give the same loss before training (checked here).
"""
from __future__ import annotations

import argparse
import gc
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from minipeft import planner
from minipeft.memory import count_parameters, format_bytes, peak_memory, peak_tensor_memory
from minipeft.planner import plan
from timing import (bnb_4bit, median_times, peak_in_subprocess, print_table, train_step_fn,
                    training_peak)

THREADS = 2
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, REPEATS = 2, 7
MEMORY_STEPS = 3
GPU_SHAPES = [(1, 512), (4, 512), (1, 2048), (4, 2048)]       # (batch, sequence length)
GPU_WARMUP, GPU_REPEATS, GPU_MEMORY_STEPS = 1, 3, 2


def load_llm() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from minipeft import course
    return AutoModelForCausalLM.from_pretrained(course.model_source("llm", "offline"))


def quantized(impl: str, model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Every linear layer but the head in NF4 with double quantisation, by `impl`."""
    if impl == "minipeft":
        from minipeft.qlora import quantize_model
        return quantize_model(model, compute_dtype=compute_dtype)
    return bnb_4bit(model, compute_dtype)


def check_same_bytes(ours: nn.Module, theirs: nn.Module) -> None:
    """minipeft's 4-bit codes against bitsandbytes' in every quantised layer: prints how many
    bytes differ, and fails above one in a million (bitsandbytes' CUDA library is built with fast
    math, whose approximate reciprocal could tip a value lying on a code boundary)."""
    from minipeft.quant import Linear4bit
    differ = total = 0
    for name, layer in ours.named_modules():
        if isinstance(layer, Linear4bit):
            reference = theirs.get_submodule(name).weight.data.flatten()
            assert layer.weight_packed.numel() == reference.numel(), name
            differ += int((layer.weight_packed.flatten() != reference).sum())
            total += reference.numel()
    print(f"4-bit codes: {differ:,} of {total:,} bytes differ from bitsandbytes'")
    assert total and differ <= total // 10**6, "4-bit codes differ from bitsandbytes'"


def with_lora(impl: str, model: nn.Module) -> nn.Module:
    """LoRA r=RANK on TARGETS of a quantised model, by `impl`, checkpointing on."""
    torch.manual_seed(0)            # the same draws for the first adapters (B = 0 on both sides)
    if impl == "minipeft":
        from minipeft.lora import LoraConfig, add_lora
        from minipeft.qlora import prepare_for_training
        model = add_lora(model, LoraConfig(target_modules=TARGETS, r=RANK, alpha=ALPHA))
        return prepare_for_training(model)
    import peft
    # not peft's prepare_model_for_kbit_training: besides checkpointing, it casts every bf16 or
    # fp16 parameter left (embeddings, norms, head) to float32, which minipeft keeps as they are;
    # the same checkpointing as minipeft's, by hand
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False              # as minipeft's prepare_for_training does
    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                      target_modules=TARGETS))


def with_qlora(impl: str) -> nn.Module:
    """The offline LLM, quantised and given LoRA adapters by `impl` (CPU, float32 compute)."""
    return with_lora(impl, quantized(impl, load_llm(), torch.float32))


def batch_of(batch: int, seq_len: int, vocab: int = 40000, device: str = "cpu"
             ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(100, vocab, (batch, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def measure_peak(impl: str, batch: int, seq_len: int) -> int:
    """Run in a child process: peak RSS growth over MEMORY_STEPS training steps."""
    torch.set_num_threads(THREADS)
    step = train_step_fn(with_qlora(impl), batch_of(batch, seq_len))
    return training_peak(step, MEMORY_STEPS)


def bench(batch: int, seq_len: int) -> list[tuple[str, float, float, str]]:
    bases = {impl: quantized(impl, load_llm(), torch.float32) for impl in ("minipeft", "peft")}
    check_same_bytes(bases["minipeft"], bases["peft"])
    models = {impl: with_lora(impl, base) for impl, base in bases.items()}
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
    growth = predicted.training_growth        # the adapters' own weights exist before the steps
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


def random_model(config: dict, device: str) -> nn.Module:
    """A causal LM of `config`'s shape (a shipped config) with random bfloat16 weights, built on
    `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = {key: value for key, value in config.items() if not key.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields),
                                                dtype=torch.bfloat16)


def gpu_bench(shape: str) -> None:
    """QLoRA on a model of a shipped config's shape, minipeft against peft + bitsandbytes, on the
    GPU: the times and peaks of GPU_SHAPES (see the module's docstring)."""
    import bitsandbytes
    import peft
    import transformers

    from minipeft.qlora import compute_dtype_for
    config, dtype = planner.load_config(shape), compute_dtype_for("cuda")
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__}; {shape} shape, random weights, NF4 + double quant, "
          f"{dtype} compute, LoRA r={RANK} on all linear layers, checkpointing")
    models, model_bytes = {}, {}
    for impl in ("minipeft", "peft"):
        before = torch.cuda.memory_allocated()
        models[impl] = quantized(impl, random_model(config, "cuda"), dtype)
        gc.collect()
        model_bytes[impl] = torch.cuda.memory_allocated() - before
    check_same_bytes(models["minipeft"], models["peft"])
    for impl in models:
        before = torch.cuda.memory_allocated()
        models[impl] = with_lora(impl, models[impl])
        model_bytes[impl] += torch.cuda.memory_allocated() - before
    torch.cuda.empty_cache()
    probe = batch_of(1, 128, config["vocab_size"], "cuda")
    with torch.no_grad():
        losses = {impl: m.eval()(**probe).loss.item() for impl, m in models.items()}
    for model in models.values():       # libraries' first-use buffers (cuBLAS workspaces) now,
        train_step_fn(model, probe)()   # not inside the first measured peak
    print(f"loss before training {losses['minipeft']:.4f} (minipeft), "
          f"{losses['peft']:.4f} (peft); the model with its adapters: "
          + ", ".join(f"{format_bytes(n)} ({impl})" for impl, n in model_bytes.items())
          + f"; plan {format_bytes(plan(config, 'qlora', rank=RANK).model_bytes)}")
    assert abs(losses["minipeft"] - losses["peft"]) < 1e-2, losses
    t4 = planner.GPUS["T4 (16 GB)"] * 2**30
    print(f"\n{'batch x tokens':>15s} {'ms / step':>17s} {'ratio':>6s} {'tokens / s':>15s} "
          f"{'peak allocated':>21s} {'ratio':>6s} {'plan':>9s} {'vs plan':>8s} {'T4':>4s}")
    for batch, seq_len in GPU_SHAPES:
        inputs = batch_of(batch, seq_len, config["vocab_size"], "cuda")
        peaks, slack = {}, {}
        for impl, model in models.items():
            growth = training_peak(train_step_fn(model, inputs), GPU_MEMORY_STEPS,
                                   lambda: peak_memory("cuda"))
            peaks[impl] = model_bytes[impl] + growth
            slack[impl] = torch.cuda.max_memory_reserved() - torch.cuda.max_memory_allocated()
            gc.collect()
            torch.cuda.empty_cache()
        times = median_times({impl: train_step_fn(m, inputs) for impl, m in models.items()},
                             GPU_REPEATS, GPU_WARMUP)
        predicted = plan(config, "qlora", batch=batch, seq_len=seq_len, rank=RANK).total
        ours, theirs = peaks["minipeft"], peaks["peft"]
        print(f"{f'{batch} x {seq_len}':>15s} {times['minipeft'] * 1e3:8.1f} "
              f"{times['peft'] * 1e3:8.1f} {times['minipeft'] / times['peft']:6.3f} "
              f"{batch * seq_len / times['minipeft']:7.0f} {batch * seq_len / times['peft']:7.0f} "
              f"{format_bytes(ours):>10s} {format_bytes(theirs):>10s} {ours / theirs:6.3f} "
              f"{format_bytes(predicted):>9s} {100 * (ours - predicted) / predicted:+7.1f}% "
              f"{'yes' if max(ours, theirs) <= t4 else 'no':>4s}")
        print(f"{'':15s} (reserved beyond the peak: {format_bytes(slack['minipeft'])} minipeft, "
              f"{format_bytes(slack['peft'])} peft)")
    free, total = torch.cuda.mem_get_info()
    print(f"\nms / step and tokens / s: minipeft, peft; peak allocated: minipeft, peft, each its "
          f"model and {GPU_MEMORY_STEPS} training steps alone; plan: minipeft.planner's total; "
          f"vs plan: minipeft's peak against it; T4: both peaks within a T4's 14.75 GiB. "
          f"Beyond PyTorch's allocator, this process's CUDA context and libraries hold "
          f"{format_bytes(total - free - torch.cuda.memory_reserved())} of device memory (all "
          "device memory in use, less what the allocator reserved).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gpu", action="store_true",
                        help="QLoRA on a 7B-shaped model on a CUDA GPU instead")
    parser.add_argument("--shape", default="llama-2-7b", choices=planner.SEVEN_B,
                        help="the shipped config whose shape --gpu builds")
    parser.add_argument("--peak", nargs=3, metavar=("IMPL", "BATCH", "SEQ"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")
        t0 = time.perf_counter()
        gpu_bench(args.shape)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        return
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
