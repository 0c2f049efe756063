"""Memory accounting: what a model and its training state cost, predicted and measured.

Full fine-tuning with Adam in fp32 keeps, for every parameter,

    weight (4 B) + gradient (4 B) + Adam first moment m (4 B) + second moment v (4 B) = 16 B

plus activations. PEFT keeps the weights but pays gradients and optimizer state only for the
trainable set, which is the whole point of the course. `training_state_bytes` computes that
prediction from a model; `peak_memory` measures what really happened, and `peak_tensor_memory`
what of it was tensors (the figure a prediction counts).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

ADAM_STATES_PER_PARAM = 2  # Adam keeps two moments (m and v) per trainable parameter


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        # Same wording and layout as peft's print_trainable_parameters, so the two can be compared
        # by eye.
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {self.percent:.4f}")


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return ParamCount(trainable, total)


@dataclass(frozen=True)
class TrainingStateBytes:
    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def training_state_bytes(model: nn.Module, optimizer_states_per_param: int = ADAM_STATES_PER_PARAM,
                         optimizer_dtype: torch.dtype = torch.float32) -> TrainingStateBytes:
    """Predicted bytes of weights + gradients + optimizer state (activations not included).

    Gradients have the dtype of their parameter; Adam's moments are kept in `optimizer_dtype`.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    state_size = torch.tensor([], dtype=optimizer_dtype).element_size()
    optimizer = sum(p.numel() for p in trainable) * optimizer_states_per_param * state_size
    return TrainingStateBytes(weights, gradients, optimizer)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux: /proc; elsewhere psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


@dataclass
class PeakMemory:
    """Filled in when the `peak_memory` block ends."""
    device: str = "cpu"
    start_bytes: int = 0
    peak_bytes: int = 0

    @property
    def increase_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


# The CPU blocks now open whose peak is the kernel's high-water mark: a block opened inside another
# resets that mark, so it first hands the outer blocks the peak they have reached.
_open_cpu_blocks: list[PeakMemory] = []


def _high_water_mark() -> int:
    """The process's peak resident set since the last reset (Linux's VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM line in /proc/self/status")


def _reset_high_water_mark() -> bool:
    """Set the kernel's high-water mark to the resident set now (Linux 4.0 and later: writing 5
    to /proc/self/clear_refs); False where that is not possible."""
    try:
        reached = _high_water_mark()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    for block in _open_cpu_blocks:
        block.peak_bytes = max(block.peak_bytes, reached)
    return True


@contextmanager
def _sampled_peak(result: PeakMemory) -> Iterator[None]:
    """Where the kernel's mark cannot be reset: sample the resident set every 5 ms (a peak
    shorter than that can be missed)."""
    import threading

    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            result.peak_bytes = max(result.peak_bytes, rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        result.peak_bytes = max(result.peak_bytes, rss_bytes())


@contextmanager
def peak_memory(device: str | torch.device = "cpu") -> Iterator[PeakMemory]:
    """Measure peak memory inside a `with` block.

    On CUDA this is the allocator's peak (`torch.cuda.max_memory_allocated`). On CPU it is the
    process's peak resident set size: on Linux the kernel's own high-water mark, reset when the
    block starts; elsewhere the resident set sampled by a background thread. The reset also
    lowers what `getrusage` and `/usr/bin/time -v` report as the process's maximum resident set.
    Blocks may nest; blocks open at once in several threads would reset each other's mark.
    """
    device = torch.device(device)
    result = PeakMemory(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.start_bytes = torch.cuda.memory_allocated(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak_bytes = torch.cuda.max_memory_allocated(device)
        return

    result.start_bytes = result.peak_bytes = rss_bytes()
    if not _reset_high_water_mark():
        with _sampled_peak(result):
            yield result
        return
    _open_cpu_blocks.append(result)
    try:
        yield result
    finally:
        # by identity: two blocks' figures can be equal, and == would compare those
        _open_cpu_blocks[:] = [block for block in _open_cpu_blocks if block is not result]
        result.peak_bytes = max(result.peak_bytes, _high_water_mark())


@contextmanager
def peak_tensor_memory(device: str | torch.device = "cpu") -> Iterator[PeakMemory]:
    """The peak of the bytes held by live tensors inside a `with` block, above where it started.

    On CUDA that is `peak_memory` itself (the allocator's tensors). On CPU `peak_memory` measures
    the resident set, which also holds what the C library's allocator keeps of freed blocks for
    reuse (on Linux, glibc keeps freed blocks below its adaptive mmap threshold, up to 32 MiB
    each, in the heap): training's many mid-sized temporaries can more than double it. This one
    adds up the allocations and frees PyTorch's profiler records, in order; it slows the block
    down (and the profiler prints its start and stop on stderr).
    """
    device = torch.device(device)
    if device.type == "cuda":
        with peak_memory(device) as result:
            yield result
        return
    from torch.profiler import ProfilerActivity, profile

    result = PeakMemory(device=str(device))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield result
    changes = sorted(((event.start_ns(), event.nbytes())
                      for event in profiler.profiler.kineto_results.events()
                      if event.name() == "[memory]"
                      and event.device_type() == torch.autograd.DeviceType.CPU),
                     key=lambda change: change[0])    # by time only: ties keep their order
    live = 0
    for _, nbytes in changes:
        live += nbytes
        result.peak_bytes = max(result.peak_bytes, live)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
