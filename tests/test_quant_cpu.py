"""minipeft.quant_cpu: the table-lookup fast path computes the same bytes and values as the
reference path of minipeft.quant (the definition, in a few PyTorch operations)."""
from __future__ import annotations

import pytest
import torch

from minipeft import quant_cpu
from minipeft.quant import NF4_MIDPOINTS, dequantize_nf4, quantize_nf4
from nf4_inputs import DTYPES, random

SHAPES = [(64,), (3, 64), (7, 96), (1000,), (257, 33)]  # whole blocks, and a last partial block


def awkward(shape, dtype, seed) -> torch.Tensor:
    """Random values plus the cases a table lookup could get wrong: a zero block, values on and
    just above the midpoints between codes, and a block with a tiny absmax (the search route)."""
    x = random(shape, dtype, seed, scale=3.0).view(-1)
    x[:64] = 0
    if x.numel() >= 128:  # block 1 (at blocksize 64): absmax 1, so v = x exactly
        x[64:128] = (random((64,), torch.float32, seed) * 0.1).to(dtype)
        x[64] = 1.0
        x[65:80] = NF4_MIDPOINTS.to(dtype)
        x[80:95] = torch.nextafter(NF4_MIDPOINTS, torch.tensor(2.0)).to(dtype)
    if x.numel() >= 192:
        x[128:192] = (random((64,), torch.float32, seed + 1) * 1e-33).to(dtype)
    return x.view(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [2, 64, 256])
def test_quantise_equals_the_reference(shape, dtype, blocksize):
    x = awkward(shape, dtype, seed=sum(shape))
    packed, state = quantize_nf4(x, blocksize, backend="torch")
    ref_packed, ref_state = quantize_nf4(x, blocksize, backend="reference")
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [2, 64, 256])
def test_dequantise_equals_the_reference(shape, dtype, blocksize):
    packed, state = quantize_nf4(awkward(shape, torch.float32, seed=1), blocksize)
    ours = dequantize_nf4(packed, state, dtype, backend="torch")
    assert torch.equal(ours, dequantize_nf4(packed, state, dtype, backend="reference"))


def test_every_cell_of_the_table_is_one_code_or_marked_for_search():
    table = quant_cpu.cell_table(NF4_MIDPOINTS, torch.device("cpu"))
    assert table.numel() == 2 * quant_cpu.CELLS_PER_UNIT + 1
    marked = table == quant_cpu.NEEDS_SEARCH
    assert 0 < marked.sum() <= 2 * NF4_MIDPOINTS.numel()  # at most two cells per midpoint
    assert torch.equal(table[~marked].unique(), torch.arange(16, dtype=torch.uint8))
