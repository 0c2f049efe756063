"""NF4 dequantisation on the CPU in C: minipeft/nf4_dequantize.c, compiled on first use, called by
ctypes.

Dequantisation is one table lookup and one multiply per value. PyTorch's gather looks values up one
at a time; bitsandbytes' CPU kernel is hand-vectorised C. nf4_dequantize.c looks up 16 or 32 at a
time (GCC's vector extensions: one vpermps or vpermw instruction on AVX-512; intrinsics on AVX2,
which has neither), and asks the OS for huge pages for the output. It is compiled with the
machine's GCC on first use (-march=native, so the cache is keyed by CPU too), and called through
ctypes, which releases the GIL: a thread pool splits the blocks over torch.get_num_threads() cores.
Where it cannot be built, `kernel()` is None and minipeft.quant uses PyTorch operations, with a
warning.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("nf4_dequantize.c")
FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")
MARCH = "native"    # the instruction set built for (-march); another to test or time its path
MIN_BLOCKSIZE = 32  # the kernel reads 16 bytes (32 values) of one block at a time
# Ask the OS for 2 MiB pages for each output: writing a fresh output costs a page fault per page,
# 512 times fewer with them. Granted only where transparent huge pages are on and memory is not
# too fragmented. False: no request (4 KiB pages, unless the OS uses huge pages for all memory).
HUGE_PAGES = True
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# a thread's share: ~0.1 ms of work, well above the cost of handing it over
_VALUES_PER_THREAD = 2**20


def _cache_dir() -> Path:
    if "MINIPEFT_CACHE" in os.environ:
        return Path(os.environ["MINIPEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minipeft"


def _cpu_description() -> str:
    """What -march=native depends on: a binary built for one CPU may not run on another sharing the
    cache.
    """
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def compiler() -> list[str]:
    """The compiler command: $CC (it may hold arguments), else cc."""
    return shlex.split(os.environ.get("CC", "cc"))


@functools.cache
def build() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled nf4_dequantize.c, "") or (None, why it could not be built), warning once."""
    command = [*compiler(), *FLAGS, f"-march={MARCH}"]
    try:
        fingerprint = [SOURCE.read_bytes(), " ".join(command).encode(),
                       platform.machine().encode(), _cpu_description().encode()]
        name = f"nf4_dequantize-{hashlib.sha256(b'|'.join(fingerprint)).hexdigest()[:16]}.so"
        library = _cache_dir() / name
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            # renamed: safe for parallel runs
            with tempfile.TemporaryDirectory(dir=library.parent) as build_dir:
                subprocess.run([*command, str(SOURCE), "-o", str(Path(build_dir) / name)],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(Path(build_dir) / name, library)
        kernel = ctypes.CDLL(str(library))
    except (OSError, RuntimeError,  # RuntimeError: no home directory
            subprocess.SubprocessError) as error:
        stderr = getattr(error, "stderr", None)
        problem = stderr.strip().splitlines()[-1] if stderr else f"{type(error).__name__}: {error}"
        warnings.warn(f"minipeft.quant: the CPU dequantisation kernel could not be built "
                      f"({problem}), so dequantize_nf4 uses the slower PyTorch path. "
                      "It needs GCC 9 or newer (set CC to choose the compiler) and a writable "
                      "cache folder (set MINIPEFT_CACHE to choose one).", stacklevel=5)
        return None, problem
    kernel.nf4_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    kernel.nf4_dequantize.restype = None
    kernel.ask_for_huge_pages.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    kernel.ask_for_huge_pages.restype = None
    return kernel, ""


def kernel() -> ctypes.CDLL | None:
    return build()[0]


@functools.cache
def _thread_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="minipeft-nf4")


# a forked child has none of the pool's threads
os.register_at_fork(after_in_child=_thread_pool.cache_clear)


def dequantize_whole_blocks(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            num_blocks: int, blocksize: int, out: torch.Tensor) -> None:
    """out[:num_blocks * blocksize] = code[q] * absmax of the first `num_blocks` blocks, split over
    threads.

    packed: contiguous uint8 CPU tensor; absmax, code: contiguous float32; out: contiguous float32,
    float16 or bfloat16; blocksize: a power of two >= MIN_BLOCKSIZE. The kernel reads raw memory:
    check first.
    """
    library = kernel()
    workers = max(1, min(torch.get_num_threads(), num_blocks * blocksize // _VALUES_PER_THREAD))
    bounds = [num_blocks * i // workers for i in range(workers + 1)]

    def run(first: int, last: int) -> None:
        library.nf4_dequantize(packed.data_ptr() + first * blocksize // 2,
                               absmax.data_ptr() + 4 * first, code.data_ptr(), last - first,
                               blocksize, _DTYPE_CODES[out.dtype],
                               out.data_ptr() + first * blocksize * out.element_size())

    if HUGE_PAGES:
        library.ask_for_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    others = [_thread_pool().submit(run, first, last)
              for first, last in zip(bounds[1:-1], bounds[2:])]
    run(bounds[0], bounds[1])  # this thread takes the first share instead of waiting idle
    for share in others:
        share.result()
