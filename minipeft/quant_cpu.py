"""NF4 in PyTorch operations, fast on the CPU: one table lookup per value instead of a search.

`minipeft.quant` defines NF4 and computes it the readable way (`torch.bucketize` against the 15
midpoints between codes, `NF4_CODE[q] * absmax` back). This file computes the same numbers faster,
on whole blocks; `minipeft.quant` handles a last partial block and the packing, and the tests
check that both paths give the same bytes and values.

Quantisation: the scaled value v in [-1, 1] is mapped to a cell floor(H * (v + 1)) of width 1/H.
A cell whose whole range (widened by a margin that covers the rounding of the cell arithmetic)
lies between two midpoints has one index, stored in a table; the few cells that contain a
midpoint are marked, and their values rounded by the search.

Dequantisation: a 256-entry table maps a byte to its pair of code values (one int64 holding two
float32s), then one multiply by the block's absmax.
"""
from __future__ import annotations

import functools

import torch

CELLS_PER_UNIT = 2**12        # H: 8193 cells for [-1, 1], an 8 KiB table (stays in the L1 cache)
CELL_MARGIN = 1 / 16          # in cells; the cell arithmetic is off by less than 0.002 cells
NEEDS_SEARCH = 16             # table entry of a cell that contains a midpoint
CHUNK = 2**20                 # values per step: temporaries are allocated once and stay small
TINY_ABSMAX = 2.0**-100       # below this, H / absmax could overflow: such blocks take the search


@functools.cache
def cell_table(midpoints: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 per cell: the NF4 index of every value in the cell, or NEEDS_SEARCH. Built on the CPU,
    then copied to `device` once (cached by the tensor object: pass module constants only)."""
    midpoints = midpoints.cpu()
    cell = torch.arange(2 * CELLS_PER_UNIT + 1, dtype=torch.float64)
    lowest = (cell - CELL_MARGIN) / CELLS_PER_UNIT - 1
    highest = (cell + 1 + CELL_MARGIN) / CELLS_PER_UNIT - 1
    first, last = (torch.bucketize(lowest, midpoints.double()),
                   torch.bucketize(highest, midpoints.double()))
    return torch.where(first == last, first, NEEDS_SEARCH).to(torch.uint8).to(device)


def block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| of each row of `blocks` (num_blocks, blocksize), float32; NaN where a row has one."""
    smallest, largest = torch.aminmax(blocks, dim=1)  # one pass over the data, NaN propagates
    return torch.maximum(largest, -smallest).float()


def quantize_whole_blocks(blocks: torch.Tensor, absmax: torch.Tensor, midpoints: torch.Tensor,
                          codes: torch.Tensor) -> None:
    """Writes the NF4 index of every value of `blocks` (num_blocks, blocksize; finite) into `codes`
    (uint8, flat), given each block's `absmax`.

    bitsandbytes' rounding: v = x * (1 / absmax) in float32; the index is the number of midpoints
    strictly below v.
    """
    num_blocks, blocksize = blocks.shape
    device = blocks.device
    reciprocal = 1.0 / absmax.clamp(min=1e-38)
    cell_scale = torch.where(absmax >= TINY_ABSMAX, reciprocal * CELLS_PER_UNIT, 0.0)

    table = cell_table(midpoints, device)
    rows = max(1, CHUNK // blocksize)
    cell_offset = torch.tensor(float(CELLS_PER_UNIT), device=device)
    cells_f = torch.empty(rows * blocksize, device=device)
    cells = torch.empty(rows * blocksize, dtype=torch.int32, device=device)
    for x_rows, scale_rows, code_rows in zip(blocks.split(rows), cell_scale[:, None].split(rows),
                                             codes.split(rows * blocksize)):
        k = code_rows.numel()
        # H * v + H = H * (v + 1), then truncated: the cell of v
        torch.addcmul(cell_offset, x_rows, scale_rows, out=cells_f[:k].view(x_rows.shape))
        cells[:k].copy_(cells_f[:k])
        torch.index_select(table, 0, cells[:k], out=code_rows)

    search = torch.nonzero(codes == NEEDS_SEARCH).view(-1)
    tiny_blocks = torch.nonzero(absmax < TINY_ABSMAX).view(-1)
    if tiny_blocks.numel():
        in_block = torch.arange(blocksize, device=device)
        search = torch.cat([search, (tiny_blocks[:, None] * blocksize + in_block).view(-1)])
    scaled = blocks.view(-1)[search].float() * reciprocal[search // blocksize]
    codes[search] = torch.bucketize(scaled.clamp(-1, 1), midpoints, out_int32=True).to(torch.uint8)


@functools.cache
def pair_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """256 entries: byte -> (code[high nibble], code[low nibble]), each pair stored as one int64.
    `code` is a CPU constant; the table is built once per device (cached by the tensor object)."""
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)
    return pairs.contiguous().view(torch.int64).view(256).to(device)


def dequantize_whole_blocks(flat: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            num_blocks: int, blocksize: int, out: torch.Tensor) -> None:
    """Writes code[q] * absmax (computed in float32, rounded to out's dtype) for the first
    `num_blocks` whole blocks of the packed bytes `flat` into `out`. `code`: the 16 values, on the
    CPU (a module constant)."""
    device = flat.device
    table = pair_table(code, device)
    end = num_blocks * blocksize
    rows = max(1, CHUNK // blocksize)
    byte_index = torch.empty(rows * blocksize // 2, dtype=torch.int32, device=device)
    # float32: c_q * absmax is computed there
    products = torch.empty(rows * blocksize, device=device)
    for byte_rows, scale_rows, out_rows in zip(flat[:end // 2].split(rows * blocksize // 2),
                                               absmax[:num_blocks, None].split(rows),
                                               out[:end].split(rows * blocksize)):
        k = out_rows.numel()
        target = out_rows if out.dtype == torch.float32 else products[:k]
        byte_index[:k // 2].copy_(byte_rows)
        torch.index_select(table, 0, byte_index[:k // 2], out=target.view(torch.int64))
        target.view(-1, blocksize).mul_(scale_rows)  # x = c_q * absmax
        if target is not out_rows:
            out_rows.copy_(target)
