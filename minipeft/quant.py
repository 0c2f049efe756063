"""NF4: 4-bit NormalFloat quantisation (QLoRA, Dettmers et al., 2023, https://arxiv.org/abs/2305.14314).

A weight matrix is cut into blocks of `blocksize` consecutive values (in memory order). Each block is
scaled by its absolute maximum into [-1, 1] and every value is replaced by the index of the nearest of 16
code values c_0 < ... < c_15 (the NF4 table, built from quantiles of the standard normal):

    absmax_b = max_{i in b} |x_i|                                 (blockwise absmax, paper §2 / eq. 1)
    q_i      = argmin_j | x_i / absmax_b - c_j |                  (nearest code, 4 bits)
    x_i     ~= c_{q_i} * absmax_b                                 (dequantisation, eq. 1 inverted)

Two 4-bit indices share a byte, the first in the high nibble. The absmax values cost 32 bits per block
(0.5 bit per parameter at blocksize 64). Double quantisation (paper §3) stores them in 8 bits instead:
their mean is subtracted and they are quantised blockwise again (blocks of 256) with the 8-bit dynamic code,
which leaves 8/64 + 32/(64*256) = 0.127 bit per parameter:

    absmax_b ~= d_{k_b} * absmax2_{b // 256} + offset             (eq. 6: doubleDequant)

The format, the rounding and the byte layout are bitsandbytes' (`quantize_4bit(..., quant_type="nf4")`,
and `compress_statistics=True` for double quantisation), byte for byte: the tests compare them.

Pieces:

- `NF4_CODE`, `nf4_code_from_normal_quantiles()`   the 16 code values, and how they are derived
- `dynamic_8bit_code()`                              the 256-value map used for double quantisation
- `NF4State`                                         what dequantisation needs besides the packed bytes
- `quantize_nf4(x)` / `dequantize_nf4(packed, state)`
- `Linear4bit`                                       a frozen NF4 weight that dequantises in forward

Three implementations of the same arithmetic, chosen by `backend`: PyTorch operations here (any device;
CPU quantisation), a small C kernel for CPU dequantisation (`minipeft.quant_c`), and Triton kernels for CUDA
tensors (`minipeft.quant_triton`; `TRITON_INTERPRET=1` runs them on CPU tensors). The tests check that all
agree.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from minipeft import quant_c, quant_triton

# ---------------------------------------------------------------------------------------------- code tables

NF4_OFFSET = 0.9677083
"""Largest quantile used for NF4: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), as QLoRA's code rounds it.
The quantile function of a normal is infinite at 1, so the outermost code comes from this quantile."""


def nf4_code_from_normal_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1), scaled into [-1, 1], with an exact zero.

    QLoRA (§3, "4-bit NormalFloat"): q_i = 1/2 (Q(i / (2^k + 1)) + Q((i + 1) / (2^k + 1))) makes each code
    cover an equal share of a normal distribution. For an exact 0 the table is built asymmetrically:
    8 positive values at the quantiles linspace(offset, 0.5, 9)[:-1], 7 negative values at
    linspace(offset, 0.5, 8)[:-1], and 0; then divided by the largest, so that the ends are -1 and 1.
    The steps are bitsandbytes': quantile points in float32, the quantile function in float64, the table
    rounded to float32 and then normalised (other orders differ from its table in the last bit).
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # Q(p): inverse normal CDF
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


NF4_CODE: torch.Tensor = nf4_code_from_normal_quantiles()
"""The NF4 table, float32, sorted: NF4_CODE[q] is the value of 4-bit index q (index 7 is 0.0)."""

NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
"""The 15 decision boundaries between neighbouring codes: the nearest code to v is the number of
midpoints strictly below v (a value exactly on a midpoint takes the lower code)."""

ZERO_INDEX = 7  # NF4_CODE[7] == 0.0: pads an odd number of values to a whole byte


def dynamic_8bit_code() -> torch.Tensor:
    """bitsandbytes' signed "dynamic" 8-bit map (Dettmers, 2015, https://arxiv.org/abs/1511.04561): 256 values.

    A dynamic-type byte is: a sign bit, then e zero bits (a decimal exponent: the value is scaled by
    10^-e), then a 1 bit that ends the exponent, then 6 - e bits of linear fraction. So the map has
    2^i values of each sign between 10^(i-7) and 10^(i-6) for i = 0..6 (fine steps near 1, coarse ones
    near 0, a huge range), plus 0 and 1. The fraction bits pick the midpoints of 2^i equal bins of
    [0.1, 1]. Built in float32 exactly as bitsandbytes' `create_dynamic_map()` builds it.
    """
    magnitudes = []
    for i in range(7):
        bin_edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        midpoints = (bin_edges[:-1] + bin_edges[1:]) / 2.0
        magnitudes.append((10 ** (i - 6)) * midpoints)
    values = torch.cat([*magnitudes, *(-m for m in magnitudes), torch.tensor([0.0, 1.0])])
    return values.sort().values


DYNAMIC_CODE: torch.Tensor = dynamic_8bit_code()
NESTED_BLOCKSIZE = 256  # double quantisation: absmax values per 8-bit block (QLoRA §3 and bitsandbytes)

# ---------------------------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class NF4State:
    """Everything `dequantize_nf4` needs besides the packed bytes.

    absmax: float32, one per block of `blocksize` values (the last block may be partial). With double
        quantisation it holds instead the uint8 codes of (absmax - offset) in the dynamic 8-bit map, and
        `offset` and `nested_absmax` (float32, one per 256 blocks) complete it.
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
        return _dequantize_dynamic_8bit(self.absmax, self.nested_absmax, self.nested_blocksize) + self.offset

    def nbytes(self) -> int:
        """Bytes of the constants (absmax, and the nested state), as stored."""
        tensors = [self.absmax, self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> NF4State:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return NF4State(move(self.absmax), self.shape, self.dtype, self.blocksize, move(self.offset),
                        move(self.nested_absmax), self.nested_blocksize)


# ---------------------------------------------------------------------------------------------- public API

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Backend = Literal["auto", "torch", "c", "triton"]


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False, *,
                 backend: Backend = "auto") -> tuple[torch.Tensor, NF4State]:
    """Quantise `x` (any shape, float32/float16/bfloat16) to NF4: (packed bytes, state).

    packed: uint8 of shape ((x.numel() + 1) // 2, 1), two 4-bit indices per byte (first value in the high
    nibble; an odd count is padded with the index of 0.0), blocks of `blocksize` values in memory order.
    double_quant: also quantise the absmax values to 8 bits (QLoRA's double quantisation).
    backend: "auto" runs the Triton kernels for CUDA tensors and PyTorch operations otherwise ("torch" and
    "triton" choose one).
    Byte-identical to bitsandbytes' `quantize_4bit(x, blocksize=..., compress_statistics=double_quant,
    quant_type="nf4")` on the CPU. For CUDA tensors the packed bytes and absmax equal bitsandbytes' CUDA
    kernel's too; with double quantisation the offset is the CPU's mean (bitsandbytes takes it on the GPU,
    which can differ in its last bit).
    """
    _check_input(x, blocksize)
    flat = x.detach().contiguous().view(-1)
    if _choose_backend(flat, backend, blocksize, dequantize=False) == "triton":
        packed, absmax = _triton_quantize(flat, blocksize)
        _check_finite(absmax)
    else:
        packed, absmax = _torch_quantize(flat, blocksize)
    if not double_quant:
        return packed, NF4State(absmax, x.shape, x.dtype, blocksize)
    # The mean on the CPU, for CUDA tensors too: a float32 sum's last bit depends on its order, which differs
    # between devices (and thread counts), and bitsandbytes' CPU code is the reference we match.
    offset = absmax.cpu().mean().to(absmax.device)
    codes, nested_absmax = _quantize_dynamic_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return packed, NF4State(codes, x.shape, x.dtype, blocksize, offset, nested_absmax)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None, *,
                   backend: Backend = "auto") -> torch.Tensor:
    """The tensor `packed` and `state` describe, of shape `state.shape`, in `dtype` (default: state.dtype).

    Each value is NF4_CODE[q] * absmax computed in float32, then rounded to `dtype`.
    backend: "auto" runs the Triton kernel for CUDA tensors, and for CPU tensors the C kernel
    (nf4_dequantize.c, compiled on first use; blocksize >= 32) or else PyTorch operations. "torch", "c" and
    "triton" choose one; all give the same values.
    """
    dtype = state.dtype if dtype is None else dtype
    _check_state(packed, state, dtype)
    absmax = state.block_absmax().to(torch.float32).contiguous()  # the kernels read raw float32 memory
    flat = packed.contiguous().view(-1)
    implementation = {"triton": _triton_dequantize, "c": _c_dequantize, "torch": _torch_dequantize}
    dequantize = implementation[_choose_backend(flat, backend, state.blocksize, dequantize=True)]
    values = dequantize(flat, absmax, state.numel, state.blocksize, dtype)
    return values.view(state.shape)


def _check_input(x: torch.Tensor, blocksize: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quantize_nf4: x must be a float32, float16 or bfloat16 tensor, got {got}. "
                         "Convert it first, e.g. x.float().")
    _check_blocksize(blocksize, "quantize_nf4: blocksize")
    if x.numel() == 0:
        raise ValueError("quantize_nf4: x is empty; there is nothing to quantise.")


def _check_blocksize(blocksize: int, what: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 2 <= blocksize <= 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"{what} must be a power of two from 2 to 4096, got {blocksize!r}. QLoRA uses 64.")


def _check_finite(absmax: torch.Tensor) -> None:
    if not bool(torch.isfinite(absmax).all()):  # the absmax of a block is NaN or inf iff the block holds one
        raise ValueError("quantize_nf4: the input contains NaN or inf values, which have no 4-bit code. "
                         "Find where they come from (e.g. torch.isfinite(x).all()) and remove them first.")


def _check_state(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> None:
    _check_blocksize(state.blocksize, "dequantize_nf4: state.blocksize")
    problems = []
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        problems.append(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    elif packed.numel() != (state.numel + 1) // 2:
        problems.append(f"packed has {packed.numel()} bytes but state.shape {tuple(state.shape)} needs "
                        f"{(state.numel + 1) // 2}")
    if state.absmax.numel() != state.num_blocks:
        problems.append(f"state.absmax has {state.absmax.numel()} values but {state.numel} values in blocks "
                        f"of {state.blocksize} need {state.num_blocks}")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8 or state.offset is None:
            problems.append("a double-quantised state needs uint8 absmax codes and an offset")
        elif state.nested_absmax.numel() != -(-state.num_blocks // state.nested_blocksize):
            problems.append(f"state.nested_absmax has {state.nested_absmax.numel()} values, expected "
                            f"{-(-state.num_blocks // state.nested_blocksize)}")
    elif state.absmax.dtype != torch.float32:
        problems.append(f"state.absmax must be float32, got {state.absmax.dtype}")
    if isinstance(packed, torch.Tensor) and packed.device != state.absmax.device:
        problems.append(f"packed is on {packed.device} but state.absmax on {state.absmax.device}")
    if dtype not in FLOAT_DTYPES:
        problems.append(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if problems:
        raise ValueError("dequantize_nf4: the state does not match the packed tensor: " + "; ".join(problems)
                         + ". Pass the (packed, state) pair that quantize_nf4 returned together "
                           "(state.to(device) moves a state).")


# ---------------------------------------------------------------------------------------------- CPU path

@functools.cache
def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One of this module's constant tables, copied to `device` once (a copy per call would cost a GPU kernel
    a host transfer). Keyed by the tensor object: for module constants only, never for user tensors."""
    return table.to(device)


def _nearest_code(scaled: torch.Tensor) -> torch.Tensor:
    """NF4 index of each value of `scaled` (already divided by its absmax): the definition of the rounding.

    The number of midpoints strictly below the value: nearest code, ties to the lower one.
    """
    midpoints = _on_device(NF4_MIDPOINTS, scaled.device)
    return torch.bucketize(scaled.clamp(-1, 1), midpoints, out_int32=True).to(torch.uint8)


# The fast path finds the index with one table lookup instead of a search. The scaled value v in [-1, 1]
# is mapped to a cell floor(H * (v + 1)) of width 1/H; a cell whose whole range (widened by a margin that
# covers the rounding of the cell arithmetic) lies between two midpoints has one index, stored in the
# table. The few cells that contain a midpoint are marked and their values rounded by `_nearest_code`.
_CELLS_PER_UNIT = 2**12        # H: 8193 cells for [-1, 1], an 8 KiB table (stays in the L1 cache)
_CELL_MARGIN = 1 / 16          # in cells; the cell arithmetic is off by less than 0.002 cells
_NEEDS_SEARCH = 16             # table entry of a cell that contains a midpoint
_CHUNK = 2**20                 # values per step: temporaries are allocated once and stay small
_TINY_ABSMAX = 2.0**-100       # below this, H / absmax could overflow: such blocks take the exact route


def _cell_table() -> torch.Tensor:
    cell = torch.arange(2 * _CELLS_PER_UNIT + 1, dtype=torch.float64)
    lowest = (cell - _CELL_MARGIN) / _CELLS_PER_UNIT - 1
    highest = (cell + 1 + _CELL_MARGIN) / _CELLS_PER_UNIT - 1
    midpoints = NF4_MIDPOINTS.double()
    first, last = torch.bucketize(lowest, midpoints), torch.bucketize(highest, midpoints)
    return torch.where(first == last, first, _NEEDS_SEARCH).to(torch.uint8)


_CELL_TABLE = _cell_table()


def _torch_quantize(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes and float32 absmax of `flat`, in PyTorch operations (fast on CPU, runs on any device).

    bitsandbytes' rounding, exactly: v = x * (1 / absmax) (in float32) for whole blocks, v = x / absmax for
    a last partial block (whose stored absmax is clamped to at least 1e-38, unlike the others), and the
    index is the number of midpoints strictly below v.
    """
    n, device = flat.numel(), flat.device
    num_full = n // blocksize
    full_end = num_full * blocksize
    blocks = flat[:full_end].view(num_full, blocksize)
    smallest, largest = torch.aminmax(blocks, dim=1)  # one pass over the data, NaN propagates
    absmax = torch.maximum(largest, -smallest).float()
    if full_end < n:  # the last, partial block
        absmax = torch.cat([absmax, flat[full_end:].abs().max().float().clamp(min=1e-38)[None]])
    _check_finite(absmax)
    reciprocal = 1.0 / absmax[:num_full].clamp(min=1e-38)
    cell_scale = torch.where(absmax[:num_full] >= _TINY_ABSMAX, reciprocal * _CELLS_PER_UNIT, 0.0)

    codes = torch.empty(n + n % 2, dtype=torch.uint8, device=device)
    table = _CELL_TABLE.to(device)
    rows = max(1, _CHUNK // blocksize)
    cell_offset = torch.tensor(float(_CELLS_PER_UNIT), device=device)
    cells_f = torch.empty(rows * blocksize, device=device)
    cells = torch.empty(rows * blocksize, dtype=torch.int32, device=device)
    for x_rows, scale_rows, code_rows in zip(blocks.split(rows), cell_scale[:, None].split(rows),
                                             codes[:full_end].split(rows * blocksize)):
        k = code_rows.numel()
        # H * v + H = H * (v + 1), then truncated: the cell of v
        torch.addcmul(cell_offset, x_rows, scale_rows, out=cells_f[:k].view(x_rows.shape))
        cells[:k].copy_(cells_f[:k])
        torch.index_select(table, 0, cells[:k], out=code_rows)

    search = torch.nonzero(codes[:full_end] == _NEEDS_SEARCH).view(-1)
    tiny_blocks = torch.nonzero(absmax[:num_full] < _TINY_ABSMAX).view(-1)
    if tiny_blocks.numel():
        in_block = torch.arange(blocksize, device=device)
        search = torch.cat([search, (tiny_blocks[:, None] * blocksize + in_block).view(-1)])
    codes[search] = _nearest_code(flat[search].float() * reciprocal[search // blocksize])

    if full_end < n:
        codes[full_end:n] = _nearest_code(flat[full_end:].float() / absmax[num_full])
    if n % 2:
        codes[n] = ZERO_INDEX
    packed = torch.bitwise_left_shift(codes[0::2], 4).bitwise_or_(codes[1::2])
    return packed.view(-1, 1), absmax


def _pair_table() -> torch.Tensor:
    """256 entries: byte -> (NF4_CODE[high nibble], NF4_CODE[low nibble]), each pair stored as one int64."""
    byte = torch.arange(256)
    pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1)
    return pairs.contiguous().view(torch.int64).view(256)


_PAIR_TABLE = _pair_table()


def _torch_dequantize(flat: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """code[q] * absmax in float32, rounded to `dtype`: a byte -> value-pair lookup, then one multiply."""
    device = flat.device
    out = torch.empty(n + n % 2, dtype=dtype, device=device)
    table = _on_device(_PAIR_TABLE, device)
    num_full = n // blocksize
    full_end = num_full * blocksize
    rows = max(1, _CHUNK // blocksize)
    byte_index = torch.empty(rows * blocksize // 2, dtype=torch.int32, device=device)
    products = torch.empty(rows * blocksize, device=device)  # float32: x = c_q * absmax is computed there
    for byte_rows, scale_rows, out_rows in zip(flat[:full_end // 2].split(rows * blocksize // 2),
                                               absmax[:num_full, None].split(rows),
                                               out[:full_end].split(rows * blocksize)):
        k = out_rows.numel()
        target = out_rows if dtype == torch.float32 else products[:k]
        byte_index[:k // 2].copy_(byte_rows)
        torch.index_select(table, 0, byte_index[:k // 2], out=target.view(torch.int64))
        target.view(-1, blocksize).mul_(scale_rows)  # x = c_q * absmax
        if target is not out_rows:
            out_rows.copy_(target)
    _dequantize_last_partial_block(flat, absmax, n, blocksize, out)
    return out[:n]


def _c_dequantize(flat: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks by the C kernel (minipeft.quant_c), the last partial block as in the PyTorch path."""
    out = torch.empty(n, dtype=dtype)
    quant_c.dequantize_whole_blocks(flat, absmax, NF4_CODE, n // blocksize, blocksize, out)
    _dequantize_last_partial_block(flat, absmax, n, blocksize, out)
    return out


def _triton_quantize(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_triton.quantize(flat, blocksize, _on_device(NF4_MIDPOINTS, flat.device))


def _triton_dequantize(flat: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                       dtype: torch.dtype) -> torch.Tensor:
    return quant_triton.dequantize(flat, absmax, n, blocksize, dtype, _on_device(NF4_CODE, flat.device))


def _dequantize_last_partial_block(flat: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
                                   out: torch.Tensor) -> None:
    """Writes out[full_end:n], the values after the last whole block (nothing if n is whole blocks)."""
    num_full = n // blocksize
    full_end = num_full * blocksize
    if full_end < n:
        tail = flat[full_end // 2:]
        nibbles = torch.stack([tail >> 4, tail & 15], dim=1).view(-1)[:n - full_end].long()
        out[full_end:n] = (_on_device(NF4_CODE, flat.device)[nibbles] * absmax[num_full]).to(out.dtype)


# ---------------------------------------------------------------------------------------------- double quant

_DYNAMIC_LUT_SIZE = 65536


@functools.cache
def _dynamic_lookup_table() -> torch.Tensor:
    """bitsandbytes' CPU rounding to the dynamic map: [-1, 1] cut into 65536 steps, each step's code the
    first whose upper midpoint is >= the step value (near 0 the map is finer than the steps, so tiny
    values land on +-2.1e-5, not on the finer codes: we reproduce it to stay byte-identical)."""
    step = torch.arange(_DYNAMIC_LUT_SIZE, dtype=torch.float32)
    step_value = (2.0 * step) / (_DYNAMIC_LUT_SIZE - 1) - 1.0
    midpoints = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    return torch.bucketize(step_value, midpoints, out_int32=True).to(torch.uint8)


def _quantize_dynamic_8bit(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes and float32 absmax of `values` (1-D float32), blocks of `blocksize`, dynamic map."""
    n = values.numel()
    num_blocks = -(-n // blocksize)
    padded = F.pad(values, (0, num_blocks * blocksize - n)).view(num_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    reciprocal = 1.0 / torch.where(absmax == 0, 1.0, absmax)  # all-zero blocks are set to code 0 below
    scaled = (padded * reciprocal[:, None]).clamp(-1, 1)
    step = (((scaled + 1.0) * 0.5) * (_DYNAMIC_LUT_SIZE - 1) + 0.5).int()  # float32, as the C code rounds
    codes = _on_device(_dynamic_lookup_table(), values.device)[step]
    codes = torch.where(absmax[:, None] == 0, 0, codes).to(torch.uint8)  # an all-zero block: code 0
    return codes.view(-1)[:n], absmax


def _dequantize_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = codes.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return _on_device(DYNAMIC_CODE, codes.device)[codes.long()] * scale


# ---------------------------------------------------------------------------------------------- backends

def _choose_backend(flat: torch.Tensor, backend: Backend, blocksize: int, dequantize: bool) -> str:
    """The implementation to run, "torch", "c" or "triton": `backend`, after checking that it can run here."""
    if backend not in ("auto", "torch", "c", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch', 'c' or 'triton', got {backend!r}.")
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
        raise ValueError(f"backend='c' only dequantises CPU tensors with blocksize >= {quant_c.MIN_BLOCKSIZE}, got "
                         f"{got}; use 'auto' or 'torch'.")
    if backend == "c" and quant_c.kernel() is None:
        raise ValueError(f"backend='c': nf4_dequantize.c could not be built ({quant_c.build()[1]}); it needs "
                         "GCC 9 or newer (set CC) and a writable cache folder (MINIPEFT_CACHE). Use 'auto' or "
                         "'torch'.")
    if backend == "triton":
        if quant_triton.kernels() is None:
            raise ValueError("backend='triton' needs the triton package (pip install triton, Linux only).")
        if not flat.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors; to run the kernels on CPU tensors, set "
                             "TRITON_INTERPRET=1 before the first quantisation (Triton's interpreter).")
    return backend


# ---------------------------------------------------------------------------------------------- Linear4bit

class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantised on the fly. Backward dequantises W again instead of keeping it:
    only the 4-bit weight stays in memory between forward and backward. W gets no gradient."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, compute_dtype):
        ctx.packed, ctx.state, ctx.compute_dtype = packed, state, compute_dtype
        weight = dequantize_nf4(packed, state, dtype=compute_dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight = dequantize_nf4(ctx.packed, ctx.state, dtype=ctx.compute_dtype)
        grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None  # dL/dx = dL/dy W
        grad_bias = grad_output.sum(dim=tuple(range(grad_output.dim() - 1))) if ctx.needs_input_grad[3] else None
        return grad_input, None, None, grad_bias, None


class Linear4bit(nn.Module):
    """A Linear layer whose weight is stored in NF4 (frozen) and dequantised to `compute_dtype` in forward.

    Buffers: `weight_packed` (uint8) and the state tensors (`absmax`, and with double quantisation
    `absmax_offset`, `nested_absmax`), so `.to(device)` and `state_dict()` carry them. The bias stays in
    full precision. Gradients flow to the input (and to the bias if it requires grad), never to the weight.
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit: the weight must be 2-D (out_features, in_features), got shape "
                             f"{tuple(state.shape)}.")
        _check_state(packed, state, compute_dtype)
        self.out_features, self.in_features = state.shape
        self.blocksize, self.weight_dtype, self.compute_dtype = state.blocksize, state.dtype, compute_dtype
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax_offset", state.offset)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantise `linear.weight` to NF4; compute_dtype defaults to the weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Linear4bit.from_linear expects an nn.Linear, got {type(linear).__name__}.")
        packed, state = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype or linear.weight.dtype)

    @property
    def state(self) -> NF4State:
        return NF4State(self.absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                        self.blocksize, self.absmax_offset, self.nested_absmax)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nf4(self.weight_packed, self.state, dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _DequantizedLinear.apply(x.to(self.compute_dtype), self.weight_packed, self.state, bias,
                                     self.compute_dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        double = ", double_quant=True" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}{double}, compute_dtype={self.compute_dtype}")
