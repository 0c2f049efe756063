"""Lesson 6's exercises: blockwise NF4 quantisation and dequantisation."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from minipeft.course.checks import (Case, Draw, Exercise, Inputs, Mistake, Outputs, Question,
                                    register)
from minipeft.quant import (DYNAMIC_CODE, NF4_CODE, NF4_MIDPOINTS, NF4State, dequantize_nf4,
                            quantize_nf4)

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


# --------------------------------------------------------------------------------------------------
# Double quantisation: the absmax constants themselves in 8 bits (QLoRA §3)
# --------------------------------------------------------------------------------------------------

NESTED_BLOCKSIZE = 256
DYNAMIC_MIDPOINTS = (DYNAMIC_CODE[1:] + DYNAMIC_CODE[:-1]) / 2


def _centred_and_scaled(absmax: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax - mean) / (its block's max |.|), the values that get an 8-bit code, and each one's
    block max."""
    centred = absmax - absmax.mean()
    n = centred.numel()
    blocks = F.pad(centred, (0, -n % blocksize)).view(-1, blocksize)
    block_max = blocks.abs().amax(1, keepdim=True).clamp(min=1e-30).expand_as(blocks)
    return (blocks / block_max).flatten()[:n], block_max.flatten()[:n]


def _clear_of_dynamic_boundaries(absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`absmax` with the values whose scaled value lies near a midpoint of the dynamic map, or near
    zero, moved a little: there bitsandbytes' rounding (through a 65,536-step table) and plain
    rounding to the nearest code can disagree, and the exercise asks for the plain one. The moves
    are tiny, so the mean (and with it every other value) barely shifts."""
    for _ in range(10):
        scaled, block_max = _centred_and_scaled(absmax, blocksize)
        tiny = scaled.abs() < 1e-3
        near = tiny | ((scaled[:, None] - DYNAMIC_MIDPOINTS).abs().amin(1) < 3e-5)
        if not near.any():
            return absmax
        step = torch.where(tiny, 3e-3, 1e-4) * torch.where(scaled < 0, -1.0, 1.0)
        absmax = torch.where(near, absmax + step * block_max, absmax)
    raise AssertionError("could not move the absmax values off the rounding boundaries")


def _double_quant_cases(draw: Draw, quantized: bool) -> list[Case]:
    """Per-block absmax values as NF4 leaves them for a layer (positive, around 2.5 standard
    deviations of its weights); with `quantized`, minipeft's double quantisation of them."""

    def case(name: str, n: int, outlier: bool = False) -> Case:
        absmax = (draw.tensor(n, scale=0.01) + 0.05).abs() + 1e-3
        if outlier:
            absmax[draw.integer(0, n - 1)] *= 20
        absmax = _clear_of_dynamic_boundaries(absmax, NESTED_BLOCKSIZE)
        if not quantized:
            return Case(name, {"absmax": absmax})
        codes, absmax2, offset = _reference_double_quantize(absmax)
        return Case(name, {"codes": codes, "absmax2": absmax2, "offset": offset})

    return [case("one block of 256", 256),
            case("several blocks, the last partial", 700),
            case("fewer values than a block", 100),
            case("a layer's worth (4,096 blocks)", 4096),
            case("an outlier block", 600, outlier=True)]


def _reference_double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """minipeft.quant's double quantisation of these absmax values, through its public API: a
    weight whose blocks of 64 have exactly these absmax values."""
    weight = F.pad(absmax[:, None], (0, 63))
    _, state = quantize_nf4(weight, blocksize=64, double_quant=True)
    return state.absmax, state.nested_absmax, state.offset.item()


def _run_double_quantize(double_quantize: Callable, inputs: Inputs) -> Outputs:
    result = double_quantize(inputs["absmax"])
    if not isinstance(result, tuple) or len(result) != 3:
        raise TypeError(f"expected a tuple (codes, absmax2, offset), got {type(result).__name__}")
    codes, absmax2, offset = result
    return {"codes": codes, "absmax2": absmax2, "offset": offset}


def _describe_dynamic_code(output: str, value: int) -> str:
    if output != "codes" or not 0 <= value < 256:
        return ""
    return f"{DYNAMIC_CODE[value].item():+.5g} times the block's absmax2"


def _double_quantize_with(absmax: torch.Tensor, *, centre: bool = True,
                          blocksize: int = NESTED_BLOCKSIZE, scale: bool = True,
                          linear: bool = False, offset_per_block: bool = False):
    """Double quantisation written with the usual slips as options."""
    n = absmax.numel()
    if offset_per_block:
        offset = torch.stack([block.mean() for block in absmax.split(blocksize)])
        centred = absmax - offset.repeat_interleave(blocksize)[:n]
    else:
        offset = absmax.mean() if centre else torch.tensor(0.0)
        centred = absmax - offset
    blocks = F.pad(centred, (0, -n % blocksize)).view(-1, blocksize)
    absmax2 = blocks.abs().amax(1)
    scaled = (blocks / absmax2[:, None] if scale else blocks).flatten()[:n]
    if linear:
        codes = ((scaled.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        codes = (scaled[:, None] - DYNAMIC_CODE).abs().argmin(1).to(torch.uint8)
    return codes, absmax2, offset if offset_per_block else offset.item()


register(Exercise(
    name="double_quantize",
    notebook="06_nf4",
    make_cases=lambda draw: _double_quant_cases(draw, quantized=False),
    run=_run_double_quantize,
    reference=_reference_double_quantize,
    mistakes=(
        Mistake("Subtract the mean of all the absmax values first: they are all positive, so "
                "without centring half of the signed 8-bit map is never used.",
                lambda absmax: _double_quantize_with(absmax, centre=False)),
        Mistake("One offset for the whole tensor: the mean of all the absmax values, not one mean "
                "per block.",
                lambda absmax: _double_quantize_with(absmax, offset_per_block=True)),
        Mistake("The centred values are quantised in blocks of 256, each with its own absmax2: "
                "one absmax2 for the whole tensor is a block size forgotten.",
                lambda absmax: _double_quantize_with(absmax, blocksize=absmax.numel())),
        Mistake("Divide each centred value by its block's absmax2 before looking up its code: the "
                "dynamic map spans [-1, 1].",
                lambda absmax: _double_quantize_with(absmax, scale=False)),
        Mistake("The 8-bit format is the dynamic map (DYNAMIC_CODE): the code is the index of its "
                "nearest value, not a linear round((v + 1) * 127.5).",
                lambda absmax: _double_quantize_with(absmax, linear=True)),
    ),
    hint="See lesson 6, section 6: centre on the mean, then blocks of 256, each scaled by its own "
         "max |.|, and the index of the nearest DYNAMIC_CODE value as uint8.",
    describe=_describe_dynamic_code,
))


def _run_double_dequantize(double_dequantize: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"absmax": double_dequantize(i["codes"], i["absmax2"], i["offset"])}


def _reference_double_dequantize(codes: torch.Tensor, absmax2: torch.Tensor,
                                 offset: float) -> torch.Tensor:
    """minipeft.quant's decoding of double-quantised constants (NF4State.block_absmax)."""
    n = codes.numel()
    state = NF4State(codes, torch.Size([n, 64]), torch.float32, 64, torch.tensor(offset),
                     absmax2)
    return state.block_absmax()


register(Exercise(
    name="double_dequantize",
    notebook="06_nf4",
    make_cases=lambda draw: _double_quant_cases(draw, quantized=True),
    run=_run_double_dequantize,
    reference=_reference_double_dequantize,
    mistakes=(
        Mistake("Add the offset back: absmax = DYNAMIC_CODE[code] * absmax2 + offset.",
                lambda c, a2, o: _reference_double_dequantize(c, a2, 0.0)),
        Mistake("Each absmax2 scales 256 consecutive codes: absmax2.repeat_interleave(256), not "
                "absmax2.repeat(...).",
                lambda c, a2, o: DYNAMIC_CODE[c.long()] * a2.repeat(NESTED_BLOCKSIZE)[:c.numel()]
                + o),
        Mistake("Look each code up in DYNAMIC_CODE: a code is an index into the map, not a value.",
                lambda c, a2, o: c.float() * a2.repeat_interleave(NESTED_BLOCKSIZE)[:c.numel()]
                + o),
        Mistake("Multiply by the block's absmax2: the map's values are in [-1, 1].",
                lambda c, a2, o: DYNAMIC_CODE[c.long()] + o),
    ),
    hint="absmax_b = DYNAMIC_CODE[code_b] * absmax2[b // 256] + offset, as float32, one value "
         "per code.",
))


# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="block_of_value_70",
    notebook="06_nf4",
    text="At blocksize 64, which block's absmax scales the value at index 70 (counting from 0)?",
    answer=1,
    why="Block b holds the values 64 b to 64 b + 63: 70 // 64 = 1.",
    wrong={0: "Block 0 holds indices 0 to 63; 70 is past it.",
           70: "That is the value's own index: its block is 70 // 64.",
           2: "Blocks are counted from 0: indices 64 to 127 are block 1."},
    otherwise="A value's block is its index // blocksize.",
))

register(Question(
    name="nf4_bits_per_weight",
    notebook="06_nf4",
    text="NF4 at blocksize 64 with one float32 absmax per block (no double quantisation): how "
         "many bits per weight in all?",
    answer=4.5,
    tolerance=1e-3,
    why="4 bits of code + 32 bits of absmax shared by 64 weights = 4 + 0.5 = 4.5.",
    wrong={4: "Add the absmax: 32 bits per block of 64 weights, 0.5 bit each.",
           4.127: "That is with double quantisation: here the absmax is a plain float32.",
           36: "The 32-bit absmax is shared by the 64 weights of its block: 0.5 bit each."},
    otherwise="4 bits per code, plus 32 bits of absmax per 64 weights.",
))

register(Question(
    name="double_quant_bits",
    notebook="06_nf4",
    text="With double quantisation at blocksize 64, how many bits per weight do the quantisation "
         "constants cost (to three decimals)?",
    answer=0.127,
    tolerance=0.01,
    why="8 bits per block of 64 (0.125), plus a float32 absmax2 per 256 blocks (32 / (64 x 256) "
        "= 0.002): 0.127.",
    wrong={0.5: "That is the plain float32 absmax (32 / 64): double quantisation stores it in 8 "
                "bits.",
           0.125: "Add the second level: one float32 absmax2 per 256 blocks, 32 / (64 x 256).",
           8: "8 bits per block is shared by its 64 weights: 8 / 64."},
    otherwise="8 bits per block of 64 weights, plus 32 bits per 256 blocks.",
))

register(Question(
    name="why_normal_quantiles",
    notebook="06_nf4",
    text="Why are NF4's 16 values placed at quantiles of a normal distribution?",
    options={"a": "Pretrained weights are roughly normal, so every code gets about the same "
                  "share of the weights and none is wasted on empty ranges.",
             "b": "Normal quantiles are faster to decode than evenly spaced values.",
             "c": "Evenly spaced 4-bit values cannot represent zero."},
    answer="a",
    why="Equal-probability bins make the most of 16 codes for normally distributed data: lesson 6 "
        "measured NF4's error below int4's and FP4's on the real BERT weights.",
    wrong={"b": "Decoding is a table lookup for any 16 values: the spacing does not change its "
                "speed.",
           "c": "Symmetric int4 has an exact zero: the reason is how weights are distributed."},
))
