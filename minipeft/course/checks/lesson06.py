"""Lesson 6's exercises: blockwise NF4 quantisation and dequantisation."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from minipeft.course.checks import Case, Draw, Exercise, Inputs, Mistake, Outputs, register
from minipeft.quant import NF4_CODE, NF4_MIDPOINTS, NF4State, dequantize_nf4, quantize_nf4

def _clear_of_boundaries(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`x` with the values that fall within 1e-4 of a rounding boundary (x / absmax near a midpoint
    between two NF4 codes) moved off it: there, the order of float operations, not the method, picks
    the code."""

    flat = x.flatten()
    for _ in range(10):
        padded = F.pad(flat.float(), (0, -flat.numel() % blocksize)).view(-1, blocksize)
        scaled = ((padded / padded.abs().amax(1, keepdim=True).clamp(min=1e-30))
                  .flatten()[:flat.numel()])
        near = (scaled[:, None] - NF4_MIDPOINTS).abs().amin(1) < 1e-4
        if not near.any():
            return flat.view(x.shape)
        # never the block's absmax (|x / absmax| = 1 is no midpoint)
        flat = torch.where(near, flat * 0.97, flat)
    raise AssertionError("could not move the inputs off the rounding boundaries")


ZERO_BLOCK_HINT = ("A block of zeros has absmax 0, and x / 0 is NaN. Guard the division (e.g. "
                   "absmax.clamp(min=1e-12)) so that zeros get the code of 0.0, index 7.")


def _nf4_cases(draw: Draw, quantized: bool) -> list[Case]:
    """Quantisation cases (inputs x, blocksize); with `quantized`, dequantisation cases made from
    them by minipeft.quant (inputs packed, absmax, n, blocksize)."""

    def case(name: str, shape: tuple[int, ...], blocksize: int, dtype: torch.dtype = torch.float32,
             zero_block: bool = False, hint: str = "") -> Case:
        x = draw.tensor(*shape, dtype=dtype, scale=draw.integer(1, 100) / 10)
        if zero_block:
            x.view(-1)[:blocksize] = 0
        x = _clear_of_boundaries(x, blocksize)
        if not quantized:
            return Case(name, {"x": x, "blocksize": blocksize}, hint)
        packed, state = quantize_nf4(x.float(), blocksize)
        return Case(name, {"packed": packed.view(-1), "absmax": state.absmax, "n": x.numel(),
                           "blocksize": blocksize}, hint)

    return [case("one block", (64,), 64),
            case("several blocks of a matrix", (8, 24), 32),
            case("odd length with a last partial block", (75,), 16),
            (case("large blocks", (5, 60), 128) if quantized
             else case("bf16 input", (6, 16), 32, dtype=torch.bfloat16)),
            case("a block of zeros", (3, 64), 64, zero_block=True, hint=ZERO_BLOCK_HINT)]


def _nibbles_swapped(packed: torch.Tensor) -> torch.Tensor:
    return (packed << 4) | (packed >> 4)


def _run_quantize(quantize: Callable, inputs: Inputs) -> Outputs:
    result = quantize(inputs["x"], inputs["blocksize"])
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"expected a tuple (packed, absmax), got {type(result).__name__}")
    packed, absmax = result
    # any shape, in memory order
    flat = packed.reshape(-1) if isinstance(packed, torch.Tensor) else packed
    return {"packed": flat, "absmax": absmax}


def _reference_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:

    packed, state = quantize_nf4(x, blocksize)
    return packed.view(-1), state.absmax


def _quantize_with_one_absmax(x, blocksize):

    n = x.numel()
    packed, state = quantize_nf4(x, blocksize=min(4096, 2 ** math.ceil(math.log2(max(n, 2)))))
    return packed.view(-1), state.absmax.expand(-(-n // blocksize))


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit indices, two per byte (the first in the high nibble), an odd count padded with index
    7.
    """
    codes = F.pad(codes.flatten(), (0, codes.numel() % 2), value=7).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 rows of `blocksize` (the last zero-padded), and each row's absmax."""
    flat = x.float().flatten()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    return blocks, blocks.abs().amax(1)


def _quantize_rounding_down(x, blocksize):

    blocks, absmax = _blocks(x, blocksize)
    scaled = blocks / absmax.clamp(min=1e-12)[:, None]
    codes = (torch.searchsorted(NF4_CODE, scaled.contiguous(), right=True) - 1).clamp(0, 15)
    return _pack(codes.flatten()[:x.numel()]), absmax


def _quantize_dividing_by_zero(x, blocksize):

    blocks, absmax = _blocks(x, blocksize)
    scaled = blocks / absmax[:, None]  # NaN in a block of zeros
    return _pack((scaled.flatten()[:x.numel(), None] - NF4_CODE).abs().argmin(1)), absmax


def _quantize_without_scaling(x, blocksize):

    _, absmax = _blocks(x, blocksize)
    return _pack(torch.bucketize(x.float().flatten().clamp(-1, 1), NF4_MIDPOINTS)), absmax


def _describe_packed_byte(output: str, value: int) -> str:
    """A packed NF4 byte as its two codes, and what they decode to (times the block's absmax)."""
    if output != "packed":
        return ""
    high, low = value >> 4, value & 15
    return (f"0x{value:02X}: codes {high} and {low}, i.e. {NF4_CODE[high].item():+.4f} and "
            f"{NF4_CODE[low].item():+.4f} times the absmax")


register(Exercise(
    name="quantize_nf4_blockwise",
    notebook="06_nf4",
    make_cases=lambda draw: _nf4_cases(draw, quantized=False),
    run=_run_quantize,
    reference=_reference_quantize,
    mistakes=(
        Mistake("The nibbles are the wrong way round: the first value of each pair goes in the "
                "high nibble, (q[0::2] << 4) | q[1::2].",
                lambda x, bs: (lambda p, a: (_nibbles_swapped(p), a))(*_reference_quantize(x, bs))),
        Mistake("absmax is per block: each block of blocksize values is scaled by its own max |x|, "
                "not by the whole tensor's.", _quantize_with_one_absmax),
        Mistake("The last block may be partial: quantise it too, with its own absmax. (Pad with "
                "zeros to a whole block; zeros take index 7.)",
                lambda x, bs: _reference_quantize(x.flatten()[:x.numel() // bs * bs], bs)),
        Mistake("Round to the nearest code (argmin |v - NF4_CODE|, or compare with the midpoints "
                "between codes), not to the code below.", _quantize_rounding_down),
        Mistake(ZERO_BLOCK_HINT, _quantize_dividing_by_zero),
        Mistake("absmax is stored in float32, whatever x's dtype: compute it from x.float().",
                lambda x, bs: (lambda p, a: (p, a.to(x.dtype)))(*_reference_quantize(x, bs))),
        Mistake("Divide each value by its block's absmax before looking up the code: the codes "
                "span [-1, 1].",
                _quantize_without_scaling),
    ),
    error_hints=(
        (r"shape '\[.*\]' is invalid for input of size",
         "x.numel() need not be a multiple of blocksize: pad the last block with zeros before "
         "view(-1, blocksize)."),
    ),
    hint="Per block: absmax = max |x| (float32); v = x / absmax; q = index of the nearest NF4_CODE "
         "value; then two indices per byte, the first in the high nibble, an odd count padded with "
         "index 7.",
    describe=_describe_packed_byte,
))


def _run_dequantize(dequantize: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"x": dequantize(i["packed"], i["absmax"], i["n"], i["blocksize"])}


def _reference_dequantize(packed: torch.Tensor, absmax: torch.Tensor, n: int,
                          blocksize: int) -> torch.Tensor:

    return dequantize_nf4(packed.view(-1, 1),
                          NF4State(absmax, torch.Size([n]), torch.float32, blocksize))


def _unpacked_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).flatten().long()


def _dequantize_repeating_absmax(packed, absmax, n, blocksize):

    return NF4_CODE[_unpacked_codes(packed)[:n]] * absmax.repeat(blocksize)[:n]


def _dequantize_keeping_padding(packed, absmax, n, blocksize):

    codes = _unpacked_codes(packed)
    return NF4_CODE[codes] * absmax.repeat_interleave(blocksize)[:codes.numel()]


register(Exercise(
    name="dequantize_nf4_blockwise",
    notebook="06_nf4",
    make_cases=lambda draw: _nf4_cases(draw, quantized=True),
    run=_run_dequantize,
    reference=_reference_dequantize,
    mistakes=(
        Mistake("The nibbles are the wrong way round: the high nibble (byte >> 4) holds the first "
                "value, the low nibble (byte & 15) the second.",
                lambda p, a, n, bs: _reference_dequantize(_nibbles_swapped(p), a, n, bs)),
        Mistake("Each code value is multiplied by its block's absmax: "
                "x = NF4_CODE[q] * absmax[block].",
                lambda p, a, n, bs: _reference_dequantize(p, torch.ones_like(a), n, bs)),
        Mistake("Each absmax scales blocksize consecutive values: "
                "absmax.repeat_interleave(blocksize), not absmax.repeat(...).",
                _dequantize_repeating_absmax),
        Mistake("Return exactly n values: an odd n leaves one padding nibble to drop.",
                _dequantize_keeping_padding),
        Mistake("The last block may be partial: dequantise it too, with its own absmax.",
                lambda p, a, n, bs: _reference_dequantize(
                    p[:n // bs * bs // 2], a[:n // bs], n // bs * bs, bs)),
    ),
    hint="Unpack two indices per byte (byte >> 4 first, then byte & 15), look them up in NF4_CODE, "
         "multiply by the absmax of their block (value i is in block i // blocksize), and keep the "
         "first n values.",
))
