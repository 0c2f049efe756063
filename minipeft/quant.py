"""NF4: 4-bit NormalFloat quantisation (QLoRA, Dettmers et al., 2023,
https://arxiv.org/abs/2305.14314).

A weight matrix is cut into blocks of `blocksize` consecutive values (in memory order). Each block
is scaled by its absolute maximum into [-1, 1] and every value is replaced by the index of the
nearest of 16 code values c_0 < ... < c_15 (the NF4 table, built from quantiles of the standard
normal):

    absmax_b = max_{i in b} |x_i|                         (blockwise absmax, paper §2 / eq. 1)
    q_i      = argmin_j | x_i / absmax_b - c_j |          (nearest code, 4 bits)
    x_i     ~= c_{q_i} * absmax_b                         (dequantisation, eq. 1 inverted)

Two 4-bit indices share a byte, the first in the high nibble. The absmax values cost 32 bits per
block (0.5 bit per parameter at blocksize 64). Double quantisation (paper §3) stores them in 8 bits
instead: their mean is subtracted and they are quantised blockwise again (blocks of 256) with the
8-bit dynamic code, which leaves 8/64 + 32/(64*256) = 0.127 bit per parameter:

    absmax_b ~= d_{k_b} * absmax2_{b // 256} + offset     (eq. 6: doubleDequant)

The format, the rounding and the byte layout are bitsandbytes'
(`quantize_4bit(..., quant_type="nf4")`, and `compress_statistics=True` for double quantisation),
byte for byte: the tests compare them.

Pieces:

- `NF4_CODE`, `nf4_code_from_normal_quantiles()`  the 16 code values, and how they are derived
- `dynamic_8bit_code()`                           the 256-value map used for double quantisation
- `NF4State`                                      what dequantisation needs besides the packed bytes
- `quantize_nf4(x)` / `dequantize_nf4(packed, state)`
- `Linear4bit`                                    a frozen NF4 weight that dequantises in forward

The readable reference path comes first in this file (`backend="reference"`): the equations above,
a few PyTorch operations each. Faster implementations of the same arithmetic, chosen by `backend`,
each tested equal to the reference: table lookups in PyTorch operations (`minipeft.quant_cpu`,
any device, the default for CPU quantisation), a small C kernel for CPU dequantisation
(`minipeft.quant_c`), and Triton kernels for CUDA tensors (`minipeft.quant_triton`;
`TRITON_INTERPRET=1` runs them on CPU tensors).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from minipeft import quant_c, quant_cpu, quant_triton

# -------------------------------------------------------------------------------- code tables

NF4_OFFSET = 0.9677083
"""Largest quantile used for NF4: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), as QLoRA's code
rounds it. The quantile function of a normal is infinite at 1, so the outermost code comes from
this quantile."""


def nf4_code_from_normal_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1), scaled into [-1, 1], with an exact zero.

    QLoRA (§3, "4-bit NormalFloat"): q_i = 1/2 (Q(i / (2^k + 1)) + Q((i + 1) / (2^k + 1))) makes
    each code cover an equal share of a normal distribution. For an exact 0 the table is built
    asymmetrically: 8 positive values at the quantiles linspace(offset, 0.5, 9)[:-1], 7 negative
    values at linspace(offset, 0.5, 8)[:-1], and 0; then divided by the largest, so that the ends
    are -1 and 1.
    The steps are bitsandbytes': quantile points in float32, the quantile function in float64, the
    table rounded to float32 and then normalised (other orders differ from its table in the last
    bit).
    """
    # Q(p): inverse normal CDF
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = (torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
              .float().sort().values)
    return values / values.max()


NF4_CODE: torch.Tensor = nf4_code_from_normal_quantiles()
"""The NF4 table, float32, sorted: NF4_CODE[q] is the value of 4-bit index q (index 7 is 0.0)."""

NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
"""The 15 decision boundaries between neighbouring codes: the nearest code to v is the number of
midpoints strictly below v (a value exactly on a midpoint takes the lower code)."""

ZERO_INDEX = 7  # NF4_CODE[7] == 0.0: pads an odd number of values to a whole byte


def dynamic_8bit_code() -> torch.Tensor:
    """bitsandbytes' signed "dynamic" 8-bit map (Dettmers, 2015, https://arxiv.org/abs/1511.04561):
    256 values.

    A dynamic-type byte is: a sign bit, then e zero bits (a decimal exponent: the value is scaled by
    10^-e), then a 1 bit that ends the exponent, then 6 - e bits of linear fraction. So the map has
    2^i values of each sign between 10^(i-7) and 10^(i-6) for i = 0..6 (fine steps near 1, coarse
    ones near 0, a huge range), plus 0 and 1. The fraction bits pick the midpoints of 2^i equal bins
    of [0.1, 1]. Built in float32 exactly as bitsandbytes' `create_dynamic_map()` builds it.
    """
    magnitudes = []
    for i in range(7):
        bin_edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        midpoints = (bin_edges[:-1] + bin_edges[1:]) / 2.0
        magnitudes.append((10 ** (i - 6)) * midpoints)
    values = torch.cat([*magnitudes, *(-m for m in magnitudes), torch.tensor([0.0, 1.0])])
    return values.sort().values


DYNAMIC_CODE: torch.Tensor = dynamic_8bit_code()
# double quantisation: absmax values per 8-bit block (QLoRA §3 and bitsandbytes)
NESTED_BLOCKSIZE = 256

# -------------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class NF4State:
    """Everything `dequantize_nf4` needs besides the packed bytes.

    absmax: float32, one per block of `blocksize` values (the last block may be partial). With
        double quantisation it holds instead the uint8 codes of (absmax - offset) in the dynamic
        8-bit map, and `offset` and `nested_absmax` (float32, one per 256 blocks) complete it.
    shape, dtype: of the tensor that was quantised (dtype is the default output dtype).
    """
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (decoded first, with double quantisation)."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_dynamic_8bit(self.absmax, self.nested_absmax,
                                        self.nested_blocksize).add_(self.offset)

    def nbytes(self) -> int:
        """Bytes of the constants (absmax, and the nested state), as stored."""
        tensors = [self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> NF4State:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return NF4State(move(self.absmax), self.shape, self.dtype, self.blocksize,
                        move(self.offset), move(self.nested_absmax), self.nested_blocksize)


# -------------------------------------------------------------------------------- the reference

@functools.cache
def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One of this module's constant tables, copied to `device` once (a copy per call would cost a
    GPU kernel a host transfer). Keyed by the tensor object: for module constants only."""
    return table.to(device)


def _nearest_code(scaled: torch.Tensor) -> torch.Tensor:
    """NF4 index of each value of `scaled` (already divided by its absmax): the number of midpoints
    strictly below the value, which is the nearest code (ties to the lower one)."""
    midpoints = _on_device(NF4_MIDPOINTS, scaled.device)
    return torch.bucketize(scaled.clamp(-1, 1), midpoints, out_int32=True).to(torch.uint8)


def _reference_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 index of every value of `flat` (1-D), and the float32 absmax of every block.

    Two details are bitsandbytes' CPU code's, kept so that the bytes are identical: whole blocks
    multiply by 1 / absmax, a last partial block divides by its absmax, which is stored clamped.
    """
    n = flat.numel()
    num_full = n // blocksize
    blocks = flat[:num_full * blocksize].float().view(num_full, blocksize)
    absmax = blocks.abs().amax(dim=1)                                  # absmax_b = max |x_i|
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)]  # v = x / absmax_b
    if num_full * blocksize < n:
        tail = flat[num_full * blocksize:].float()
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled.append(tail / tail_absmax)
    return _nearest_code(torch.cat(scaled)), absmax                    # q = argmin_j |v - c_j|


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble; an odd count padded with 0.0's."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_INDEX)])
    return torch.bitwise_left_shift(codes[0::2], 4).bitwise_or_(codes[1::2]).view(-1, 1)


def _reference_quantize(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes and float32 absmax of `flat`: the definition, in a few PyTorch operations."""
    codes, absmax = _reference_codes(flat, blocksize)
    return _pack(codes), absmax


def _reference_dequantize(flat: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """c_q * absmax_b for the first n values of the packed bytes `flat`, in float32, then
    `dtype`.
    """
    codes = torch.stack([flat >> 4, flat & 15], dim=1).view(-1)[:n].long()   # high nibble first
    code = _on_device(NF4_CODE, flat.device)
    return (code[codes] * absmax.repeat_interleave(blocksize)[:n]).to(dtype)  # x = c_q * absmax_b


# -------------------------------------------------------------------------------- public API

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Backend = Literal["auto", "reference", "torch", "c", "triton"]


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False, *,
                 backend: Backend = "auto") -> tuple[torch.Tensor, NF4State]:
    """Quantise `x` (any shape, float32/float16/bfloat16) to NF4: (packed bytes, state).

    packed: uint8 of shape ((x.numel() + 1) // 2, 1), two 4-bit indices per byte (first value in the
    high nibble; an odd count is padded with the index of 0.0), blocks of `blocksize` values in
    memory order.
    double_quant: also quantise the absmax values to 8 bits (QLoRA's double quantisation).
    backend: "auto" runs the Triton kernels for CUDA tensors and the table lookups of
    minipeft.quant_cpu otherwise; "reference", "torch" and "triton" choose one.
    Byte-identical to bitsandbytes' `quantize_4bit(x, blocksize=...,
    compress_statistics=double_quant, quant_type="nf4")` on the CPU. For CUDA tensors the packed
    bytes and absmax equal bitsandbytes' CUDA kernel's too; with double quantisation the offset is
    the CPU's mean (bitsandbytes takes it on the GPU, which can differ in its last bit).
    """
    _check_input(x, blocksize)
    flat = x.detach().contiguous().view(-1)
    implementation = {"triton": _triton_quantize, "torch": _torch_quantize,
                      "reference": _reference_quantize}
    packed, absmax = implementation[_choose_backend(flat, backend, blocksize, dequantize=False)](
        flat, blocksize)
    _check_finite(absmax)
    if not double_quant:
        return packed, NF4State(absmax, x.shape, x.dtype, blocksize)
    # The mean on the CPU, for CUDA tensors too: a float32 sum's last bit depends on its order,
    # which differs between devices (and thread counts), and bitsandbytes' CPU code is the
    # reference we match.
    offset = absmax.cpu().mean().to(absmax.device)
    codes, nested_absmax = _quantize_dynamic_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return packed, NF4State(codes, x.shape, x.dtype, blocksize, offset, nested_absmax)


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Bytes `quantize_nf4` stores for `numel` values, counted without quantising: packed codes
    (two per byte), and one fp32 absmax per block, or with double quantisation an 8-bit code per
    block plus an fp32 absmax per NESTED_BLOCKSIZE blocks and one fp32 offset."""
    blocks = -(-numel // blocksize)
    constants = (blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 if double_quant
                 else 4 * blocks)
    return (numel + 1) // 2 + constants


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None, *,
                   backend: Backend = "auto") -> torch.Tensor:
    """The tensor `packed` and `state` describe, of shape `state.shape`, in `dtype` (default:
    state.dtype).

    Each value is NF4_CODE[q] * absmax computed in float32, then rounded to `dtype`.
    backend: "auto" runs the Triton kernel for CUDA tensors, and for CPU tensors the C kernel
    (nf4_dequantize.c, compiled on first use; blocksize >= 32) or else PyTorch operations.
    "reference", "torch", "c" and "triton" choose one; all give the same values.
    """
    dtype = state.dtype if dtype is None else dtype
    _check_state(packed, state, dtype)
    # the kernels read raw float32 memory
    absmax = state.block_absmax().to(torch.float32).contiguous()
    flat = packed.contiguous().view(-1)
    implementation = {
        "reference": _reference_dequantize, "triton": _triton_dequantize,
        "c": functools.partial(_dequantize_by_blocks, quant_c.dequantize_whole_blocks),
        "torch": functools.partial(_dequantize_by_blocks, quant_cpu.dequantize_whole_blocks)}
    dequantize = implementation[_choose_backend(flat, backend, state.blocksize, dequantize=True)]
    values = dequantize(flat, absmax, state.numel, state.blocksize, dtype)
    return values.view(state.shape)


def _check_input(x: torch.Tensor, blocksize: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quantize_nf4: x must be a float32, float16 or bfloat16 tensor, got "
                         f"{got}. Convert it first, e.g. x.float().")
    _check_blocksize(blocksize, "quantize_nf4: blocksize")
    if x.numel() == 0:
        raise ValueError("quantize_nf4: x is empty; there is nothing to quantise.")


def _check_blocksize(blocksize: int, what: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 2 <= blocksize <= 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"{what} must be a power of two from 2 to 4096, got {blocksize!r}. "
                         "QLoRA uses 64.")


def _check_finite(absmax: torch.Tensor) -> None:
    # the absmax of a block is NaN or inf iff the block holds one
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("quantize_nf4: the input contains NaN or inf values, which have no 4-bit "
                         "code. Find where they come from (e.g. torch.isfinite(x).all()) and "
                         "remove them first.")


def _check_state(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> None:
    _check_blocksize(state.blocksize, "dequantize_nf4: state.blocksize")
    problems = []
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        problems.append(f"packed must be a uint8 tensor, got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    elif packed.numel() != (state.numel + 1) // 2:
        problems.append(f"packed has {packed.numel()} bytes but state.shape {tuple(state.shape)} "
                        f"needs {(state.numel + 1) // 2}")
    if state.absmax.numel() != state.num_blocks:
        problems.append(f"state.absmax has {state.absmax.numel()} values but {state.numel} values "
                        f"in blocks of {state.blocksize} need {state.num_blocks}")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8 or state.offset is None:
            problems.append("a double-quantised state needs uint8 absmax codes and an offset")
        elif state.nested_absmax.numel() != -(-state.num_blocks // state.nested_blocksize):
            problems.append(f"state.nested_absmax has {state.nested_absmax.numel()} values, "
                            f"expected {-(-state.num_blocks // state.nested_blocksize)}")
    elif state.absmax.dtype != torch.float32:
        problems.append(f"state.absmax must be float32, got {state.absmax.dtype}")
    if isinstance(packed, torch.Tensor) and packed.device != state.absmax.device:
        problems.append(f"packed is on {packed.device} but state.absmax on {state.absmax.device}")
    if dtype not in FLOAT_DTYPES:
        problems.append(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if problems:
        raise ValueError("dequantize_nf4: the state does not match the packed tensor: "
                         + "; ".join(problems)
                         + ". Pass the (packed, state) pair that quantize_nf4 returned together "
                           "(state.to(device) moves a state).")


# -------------------------------------------------------------------------------- fast paths

def _torch_quantize(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole blocks by the cell table (minipeft.quant_cpu), a last partial block as the
    reference.
    """
    n = flat.numel()
    num_full = n // blocksize
    full_end = num_full * blocksize
    blocks = flat[:full_end].view(num_full, blocksize)
    absmax = quant_cpu.block_absmax(blocks)
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    if full_end < n:
        codes[full_end:], tail_absmax = _reference_codes(flat[full_end:], blocksize)
        absmax = torch.cat([absmax, tail_absmax])
    _check_finite(absmax)  # before the table lookup, which needs finite values
    midpoints = _on_device(NF4_MIDPOINTS, flat.device)
    quant_cpu.quantize_whole_blocks(blocks, absmax[:num_full], midpoints, codes[:full_end])
    return _pack(codes), absmax


def _dequantize_by_blocks(whole_blocks: Callable, flat: torch.Tensor, absmax: torch.Tensor, n: int,
                          blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks by a fast path (`quant_cpu` or `quant_c`'s `dequantize_whole_blocks`), a last
    partial block by the reference (blocksize is even, so that block starts on a byte)."""
    out = torch.empty(n, dtype=dtype, device=flat.device)
    num_full = n // blocksize
    whole_blocks(flat, absmax, NF4_CODE, num_full, blocksize, out)
    if num_full * blocksize < n:
        out[num_full * blocksize:] = _reference_dequantize(
            flat[num_full * blocksize // 2:], absmax[num_full:], n - num_full * blocksize,
            blocksize, dtype)
    return out


def _triton_quantize(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_triton.quantize(flat, blocksize, _on_device(NF4_MIDPOINTS, flat.device))


def _triton_dequantize(flat: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                       dtype: torch.dtype) -> torch.Tensor:
    return quant_triton.dequantize(flat, absmax, n, blocksize, dtype,
                                   _on_device(NF4_CODE, flat.device))


# -------------------------------------------------------------------------------- double quant

_DYNAMIC_LUT_SIZE = 65536


@functools.cache
def _dynamic_lookup_table() -> torch.Tensor:
    """bitsandbytes' CPU rounding to the dynamic map: [-1, 1] cut into 65536 steps, each step's code
    the first whose upper midpoint is >= the step value (near 0 the map is finer than the steps, so
    tiny values land on +-2.1e-5, not on the finer codes: we reproduce it to stay
    byte-identical)."""
    step = torch.arange(_DYNAMIC_LUT_SIZE, dtype=torch.float32)
    step_value = (2.0 * step) / (_DYNAMIC_LUT_SIZE - 1) - 1.0
    midpoints = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    return torch.bucketize(step_value, midpoints, out_int32=True).to(torch.uint8)


def _quantize_dynamic_8bit(values: torch.Tensor,
                           blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes and float32 absmax of `values` (1-D float32), blocks of `blocksize`, dynamic
    map.
    """
    n = values.numel()
    num_blocks = -(-n // blocksize)
    padded = F.pad(values, (0, num_blocks * blocksize - n)).view(num_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    # all-zero blocks are set to code 0 below
    reciprocal = 1.0 / torch.where(absmax == 0, 1.0, absmax)
    scaled = (padded * reciprocal[:, None]).clamp(-1, 1)
    # float32, as the C code rounds
    step = (((scaled + 1.0) * 0.5) * (_DYNAMIC_LUT_SIZE - 1) + 0.5).int()
    codes = _on_device(_dynamic_lookup_table(), values.device)[step]
    codes = torch.where(absmax[:, None] == 0, 0, codes).to(torch.uint8)  # an all-zero block: code 0
    return codes.view(-1)[:n], absmax


def _dequantize_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                             blocksize: int) -> torch.Tensor:
    # runs before every 4-bit layer's dequantisation: one lookup, then each block scaled in place
    # (a broadcast, not a per-value copy of the scales)
    values = _on_device(DYNAMIC_CODE, codes.device).index_select(0, codes.int())
    whole = values.numel() // blocksize * blocksize
    values[:whole].view(-1, blocksize).mul_(absmax[:whole // blocksize, None])
    values[whole:].mul_(absmax[whole // blocksize:])        # a last partial block, if any
    return values


# -------------------------------------------------------------------------------- backends

def _choose_backend(flat: torch.Tensor, backend: Backend, blocksize: int, dequantize: bool) -> str:
    """The implementation to run, "torch", "c" or "triton": `backend`, after checking that it can
    run here.
    """
    if backend not in ("auto", "reference", "torch", "c", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference', 'torch', 'c' or 'triton', got "
                         f"{backend!r}.")
    on_cpu = flat.device.type == "cpu"
    c_fits = dequantize and on_cpu and blocksize >= quant_c.MIN_BLOCKSIZE
    if backend == "auto":
        if flat.is_cuda and quant_triton.kernels() is not None:
            return "triton"
        return "c" if c_fits and quant_c.kernel() is not None else "torch"
    if backend == "c" and not c_fits:
        if not dequantize:
            got = "quantisation"
        elif not on_cpu:
            got = f"a tensor on {flat.device}"
        else:
            got = f"blocksize {blocksize}"
        raise ValueError(f"backend='c' only dequantises CPU tensors with blocksize >= "
                         f"{quant_c.MIN_BLOCKSIZE}, got {got}; use 'auto' or 'torch'.")
    if backend == "c" and quant_c.kernel() is None:
        raise ValueError(f"backend='c': nf4_dequantize.c could not be built "
                         f"({quant_c.build()[1]}); it needs GCC 9 or newer (set CC) and a writable "
                         "cache folder (MINIPEFT_CACHE). Use 'auto' or 'torch'.")
    if backend == "triton":
        if quant_triton.kernels() is None:
            raise ValueError("backend='triton' needs the triton package (pip install triton, "
                             "Linux only).")
        if not flat.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors; to run the kernels on CPU "
                             "tensors, set TRITON_INTERPRET=1 before the first quantisation "
                             "(Triton's interpreter).")
    return backend


# -------------------------------------------------------------------------------- Linear4bit

class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantised on the fly. Backward dequantises W again instead of keeping
    it: only the 4-bit weight stays in memory between forward and backward. W gets no gradient."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, compute_dtype):
        ctx.packed, ctx.state, ctx.compute_dtype = packed, state, compute_dtype
        weight = dequantize_nf4(packed, state, dtype=compute_dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight = dequantize_nf4(ctx.packed, ctx.state, dtype=ctx.compute_dtype)
        grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None  # dL/dx = dL/dy W
        grad_bias = (grad_output.sum(dim=tuple(range(grad_output.dim() - 1)))
                     if ctx.needs_input_grad[3] else None)
        return grad_input, None, None, grad_bias, None


class Linear4bit(nn.Module):
    """A Linear layer whose weight is stored in NF4 (frozen) and dequantised to `compute_dtype` in
    forward.

    Buffers: `weight_packed` (uint8) and the state tensors (`absmax`, and with double quantisation
    `absmax_offset`, `nested_absmax`), so `.to(device)` and `state_dict()` carry them. The bias
    stays in full precision. Gradients flow to the input (and to the bias if it requires grad),
    never to the weight.
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit: the weight must be 2-D (out_features, in_features), "
                             f"got shape {tuple(state.shape)}.")
        _check_state(packed, state, compute_dtype)
        self.out_features, self.in_features = state.shape
        self.blocksize, self.weight_dtype, self.compute_dtype = (state.blocksize, state.dtype,
                                                                 compute_dtype)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax_offset", state.offset)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.bias = (None if bias is None
                     else nn.Parameter(bias.detach().clone(), requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantise `linear.weight` to NF4; compute_dtype defaults to the weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Linear4bit.from_linear expects an nn.Linear, got "
                             f"{type(linear).__name__}.")
        packed, state = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype or linear.weight.dtype)

    @property
    def state(self) -> NF4State:
        return NF4State(self.absmax, torch.Size((self.out_features, self.in_features)),
                        self.weight_dtype, self.blocksize, self.absmax_offset, self.nested_absmax)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nf4(self.weight_packed, self.state, dtype=self.compute_dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The same layer as a frozen nn.Linear in the compute dtype, its weight dequantised."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.compute_dtype, device=self.weight_packed.device)
        linear.weight.copy_(self.dequantized_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _DequantizedLinear.apply(x.to(self.compute_dtype), self.weight_packed, self.state, bias,
                                     self.compute_dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        double = ", double_quant=True" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}{double}, "
                f"compute_dtype={self.compute_dtype}")
