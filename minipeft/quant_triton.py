"""NF4 on CUDA tensors: Triton kernels for quantisation and dequantisation, chosen by
minipeft.quant.

The same arithmetic as the PyTorch path in minipeft.quant, byte for byte (the tests compare them, on
CPU tensors through Triton's interpreter, TRITON_INTERPRET=1, and on a GPU where there is one).
Dequantisation runs in every forward pass of a QLoRA model and is memory-bound: its tile shape was
chosen by timing it on an H100 (bench/nf4.py --gpu). triton is imported on first use only: it is
optional, and Linux only.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def kernels():
    """The two Triton kernels, compiled on first use; None where triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def quantize_kernel(x_ptr, midpoints_ptr, packed_ptr, absmax_ptr, n, num_full_blocks,
                        BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
        # One program quantises ROWS blocks: a (ROWS, BLOCKSIZE) tile.
        block = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        element = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        # padding scales to 0 -> 7
        x = tl.load(x_ptr + element, mask=element < n, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        # 1e-38 is below float32's smallest normal number: as a bare literal Triton would make it
        # float64
        safe_absmax = tl.maximum(absmax, tl.full((ROWS,), 1e-38, tl.float32))
        whole = (block < num_full_blocks)[:, None]
        # bitsandbytes' rounding: x * (1 / absmax) in whole blocks, x / absmax in the last partial
        # one (div_rn: IEEE division; a plain "/" compiles to an approximate division on GPUs)
        reciprocal = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), safe_absmax)
        scaled = tl.where(whole, x * reciprocal[:, None], tl.math.div_rn(x, safe_absmax[:, None]))
        code = tl.zeros((ROWS, BLOCKSIZE), dtype=tl.int32)
        for j in tl.static_range(15):  # nearest code = number of midpoints strictly below
            code += (scaled > tl.load(midpoints_ptr + j)).to(tl.int32)
        first, second = tl.split(tl.reshape(code, (ROWS, BLOCKSIZE // 2, 2)))
        byte = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + byte, ((first << 4) | second).to(tl.uint8), mask=byte < (n + 1) // 2)
        tl.store(absmax_ptr + block, tl.where(block < num_full_blocks, absmax, safe_absmax),
                 mask=block * BLOCKSIZE < n)

    @triton.jit
    def dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n,
                          BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, ROW_BYTES: tl.constexpr):
        # One program expands a (ROWS, ROW_BYTES) tile of packed bytes into 2 * ROWS * ROW_BYTES
        # values. A row lies inside one block (one scale per row), and its 2 * ROW_BYTES values are
        # stored contiguously.
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        byte = row[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]
        packed = tl.load(packed_ptr + byte, mask=byte < (n + 1) // 2, other=0).to(tl.int32)
        first_value = 2 * ROW_BYTES * row
        scale = tl.load(absmax_ptr + first_value // BLOCKSIZE, mask=first_value < n,
                        other=0.0)[:, None]
        first = tl.load(code_ptr + (packed >> 4)) * scale     # x = c_q * absmax, in float32
        second = tl.load(code_ptr + (packed & 15)) * scale
        values = tl.reshape(tl.join(first, second), (2 * ROWS * ROW_BYTES,))
        element = tl.program_id(0) * 2 * ROWS * ROW_BYTES + tl.arange(0, 2 * ROWS * ROW_BYTES)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # Round to nearest even by hand: the GPU would, but Triton's interpreter truncates to
            # bfloat16.
            bits = values.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            values = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < n)

    return quantize_kernel, dequantize_kernel


QUANTIZE_VALUES = 2048  # values per Triton program
# Packed bytes per dequantisation program, and per row of its tile: the fastest of the shapes and
# warp counts we tried on an H100 (4096 x 14336 to bfloat16; flat tiles, and rows of 4 or 16 bytes,
# were slower).
DEQUANTIZE_BYTES = 2048
DEQUANTIZE_ROW_BYTES = 8


def quantize(flat: torch.Tensor, blocksize: int,
             midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes and float32 absmax of `flat` (contiguous, on the GPU); midpoints: NF4's, on its
    device.
    """
    quantize_kernel, _ = kernels()
    n = flat.numel()
    num_blocks = -(-n // blocksize)
    rows = max(1, QUANTIZE_VALUES // blocksize)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=flat.device)
    quantize_kernel[(-(-num_blocks // rows),)](flat, midpoints, packed, absmax, n, n // blocksize,
                                                BLOCKSIZE=blocksize, ROWS=rows)
    return packed, absmax


def dequantize(flat: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int, dtype: torch.dtype,
               code: torch.Tensor) -> torch.Tensor:
    """code[q] * absmax for the n values packed in `flat`, in `dtype`; code: the NF4 table, on
    flat's device.
    """
    _, dequantize_kernel = kernels()
    out = torch.empty(n, dtype=dtype, device=flat.device)
    row_bytes = min(DEQUANTIZE_ROW_BYTES, blocksize // 2)  # a row must not straddle two blocks
    rows = DEQUANTIZE_BYTES // row_bytes
    dequantize_kernel[(-(-flat.numel() // DEQUANTIZE_BYTES),)](flat, absmax, code, out, n,
                                                                BLOCKSIZE=blocksize, ROWS=rows,
                                                                ROW_BYTES=row_bytes, num_warps=4)
    return out
