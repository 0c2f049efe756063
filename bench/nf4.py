"""minipeft NF4 against bitsandbytes NF4: same matrices, timed side by side in one run.

    python bench/nf4.py                 # CPU: 4096 x 4096, float32 and bfloat16
    python bench/nf4.py --threads 1     # both libraries on one core (bitsandbytes through
                                        # OMP_NUM_THREADS)
    python bench/nf4.py --march x86-64-v3  # minipeft's C kernel built for AVX2 only (its AVX2 paths
                                           # on an AVX-512 CPU; bitsandbytes unchanged)
    python bench/nf4.py --small-pages   # minipeft's C kernel without asking for 2 MiB pages
    python bench/nf4.py --gpu           # also the CUDA part (Triton kernels), needs a GPU
    python bench/nf4.py --gpu --skip-cpu  # the CUDA part only

CPU: quantize_nf4 vs bitsandbytes.functional.quantize_4bit(quant_type="nf4") and dequantize_nf4 vs
dequantize_4bit (to the input's dtype), on a random normal 4096 x 4096 matrix in float32 and
bfloat16. The outputs are checked to be identical first. Each time is the minimum over repeats, the
two libraries interleaved (the course machines are shared, and the minimum is the least disturbed
run). Goals: quantise at least 2x faster than bitsandbytes, dequantise no slower.

GPU (--gpu): dequantisation NF4 -> bfloat16 of a 4096 x 14336 matrix (an MLP weight of an 8B model)
with the Triton kernel vs bitsandbytes' CUDA kernel, and the effective bandwidth: bytes that must
move (0.5 per packed value, 4 per 64 values of absmax, 2 per bfloat16 output: 2.5625 per parameter)
over time, against the GPU's peak memory bandwidth (from --peak-gbs, or a table of known GPUs).
Goal: >= 85% of peak and faster than bitsandbytes. Times from CUDA events, median over repeats.

Ratios are bitsandbytes time / minipeft time: above 1.0 means minipeft is faster.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from typing import Callable

# bitsandbytes' OpenMP reads this once, at load: set it before the import
if "--threads" in sys.argv:
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes
    import bitsandbytes.functional as bnb_f

from minipeft import quant_c
from minipeft.course.timing import interleaved_times
from minipeft.quant import NF4State, dequantize_nf4, quantize_nf4

CPU_SHAPE = (4096, 4096)
GPU_SHAPE = (4096, 14336)
REPEATS = 15
PEAK_GBS = {"H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "H200": 4800,
            "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100": 1555, "L4": 300, "T4": 320,
            "A10G": 600, "RTX 4090": 1008}


def bnb_quantize(x: torch.Tensor):
    return bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")


def min_times(fns: dict[str, Callable[[], object]], repeats: int = REPEATS) -> dict[str, float]:
    """Minimum seconds per call of each fn, calls interleaved, after one warm-up call each."""
    return {name: min(ts) for name, ts in interleaved_times(fns, repeats, warmup=1).items()}


def cpu_rows(dtype: torch.dtype) -> list[tuple[str, float, float]]:
    x = torch.randn(CPU_SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = quantize_nf4(x)
    ref_packed, ref_state = bnb_quantize(x)
    assert (torch.equal(packed, ref_packed)
            and torch.equal(state.absmax, ref_state.absmax)), "outputs differ"
    assert torch.equal(dequantize_nf4(packed, state), bnb_f.dequantize_4bit(ref_packed, ref_state))
    quant = min_times({"minipeft": lambda: quantize_nf4(x), "bnb": lambda: bnb_quantize(x)})
    dequant = min_times({"minipeft": lambda: dequantize_nf4(packed, state),
                         "bnb": lambda: bnb_f.dequantize_4bit(ref_packed, ref_state)})
    name = str(dtype).removeprefix("torch.")
    return [(f"quantise {name}", quant["minipeft"], quant["bnb"]),
            (f"dequantise {name}", dequant["minipeft"], dequant["bnb"])]


def cuda_median(fn: Callable[[], object], repeats: int = 50) -> float:
    """Median seconds of fn on the GPU (CUDA events). Before each call 512 MB are read, which
    evicts the L2 cache: the inputs then come from memory, not from L2 (the 4096 x 14336 input,
    31 MB, would fit in it). Reading, not writing: a write would leave the L2 full of dirty lines
    whose write-back to memory would then be charged to fn."""
    flush = torch.ones(128 * 2**20, dtype=torch.float32, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        flush.max()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """What a device-to-device copy of 1 GiB achieves here (bytes read + written): a measured
    ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_median(lambda: dst.copy_(src), repeats=20) / 1e9


def peak_bandwidth_gbs(given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-gbs"
    name = torch.cuda.get_device_name()
    for key, gbs in PEAK_GBS.items():  # most specific names first
        if key in name:
            return gbs, f"datasheet, {key}"
    return None, "unknown GPU: pass --peak-gbs"


def gpu_report(peak_gbs: float | None) -> None:
    x = torch.randn(GPU_SHAPE, device="cuda", dtype=torch.bfloat16,
                    generator=torch.Generator("cuda").manual_seed(0))
    packed, state = quantize_nf4(x)
    ref_packed, ref_state = bnb_quantize(x)
    same_bytes = torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    ours_from_theirs = dequantize_nf4(ref_packed, NF4State(ref_state.absmax, x.shape, x.dtype, 64))
    same_values = torch.equal(ours_from_theirs, bnb_f.dequantize_4bit(ref_packed, ref_state))
    n = x.numel()
    bytes_moved = n / 2 + 4 * n / 64 + 2 * n
    t_ours = cuda_median(lambda: dequantize_nf4(packed, state))
    t_bnb = cuda_median(lambda: bnb_f.dequantize_4bit(ref_packed, ref_state))
    tq_ours = cuda_median(lambda: quantize_nf4(x))
    tq_bnb = cuda_median(lambda: bnb_quantize(x))
    peak, source = peak_bandwidth_gbs(peak_gbs)
    copy_gbs = copy_bandwidth_gbs()
    print(f"\nGPU: {torch.cuda.get_device_name()}, {GPU_SHAPE[0]} x {GPU_SHAPE[1]} bfloat16, "
          "median of 50, L2 flushed before each call; quantised bytes identical to "
          f"bitsandbytes' CUDA kernel: {same_bytes}; dequantised values identical: {same_values}")
    print(f"{'':28s} {'minipeft':>10s} {'bnb':>10s} {'bnb/minipeft':>13s}")
    print(f"{'dequantise NF4 -> bf16':28s} {t_ours * 1e6:8.1f}us {t_bnb * 1e6:8.1f}us "
          f"{t_bnb / t_ours:13.2f}")
    print(f"{'quantise bf16 -> NF4':28s} {tq_ours * 1e6:8.1f}us {tq_bnb * 1e6:8.1f}us "
          f"{tq_bnb / tq_ours:13.2f}")
    print(f"device-to-device copy, measured: {copy_gbs:.0f} GB/s" +
          (f" ({100 * copy_gbs / peak:.0f}% of the {peak:.0f} GB/s peak, {source})" if peak
           else f" ({source})"))
    for who, t in (("minipeft", t_ours), ("bnb", t_bnb)):
        gbs = bytes_moved / t / 1e9
        share = f"{100 * gbs / peak:.0f}% of peak, " if peak else ""
        print(f"dequantise effective bandwidth, {who}: {gbs:.0f} GB/s "
              f"({share}{100 * gbs / copy_gbs:.0f}% of the copy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA part")
    parser.add_argument("--skip-cpu", action="store_true", help="leave out the CPU part")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="the GPU's peak memory bandwidth, GB/s")
    parser.add_argument("--march", default=None,
                        help="build minipeft's C kernel with -march=MARCH instead of native")
    parser.add_argument("--small-pages", action="store_true",
                        help="minipeft's C kernel without asking the OS for 2 MiB pages")
    args = parser.parse_args()
    quant_c.HUGE_PAGES = not args.small_pages
    if args.march:  # before the first build: the flags are part of the compiled file's name
        quant_c.MARCH = args.march
        if quant_c.kernel() is None:
            sys.exit(f"--march {args.march}: the C kernel could not be built "
                     f"({quant_c.build()[1]})")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
    if not args.skip_cpu:
        print(f"CPU: {args.threads} threads, {CPU_SHAPE[0]} x {CPU_SHAPE[1]}, blocksize 64, "
              f"min of {REPEATS} interleaved runs; minipeft's C kernel built with "
              f"-march={quant_c.MARCH}, {'' if quant_c.HUGE_PAGES else 'not '}"
              "asking for 2 MiB pages")
        print(f"{'':22s} {'minipeft':>10s} {'bnb':>10s} {'bnb/minipeft':>13s}")
        for dtype in (torch.float32, torch.bfloat16):
            for name, ours, theirs in cpu_rows(dtype):
                print(f"{name:22s} {ours * 1e3:8.1f}ms {theirs * 1e3:8.1f}ms {theirs / ours:13.2f}")
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here")
        gpu_report(args.peak_gbs)


if __name__ == "__main__":
    main()
