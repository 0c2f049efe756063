"""What the NF4 tests share (tests/test_quant*.py): dtypes, seeded inputs, bitsandbytes'
quantiser."""
import warnings

import pytest
import torch

from minipeft import quant_c

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnb_f

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_c_kernel = pytest.mark.skipif(quant_c.kernel() is None,
                                    reason="the C kernel cannot be built here (no GCC 9+)")


def random(shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def bnb_quantize(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    return bnb_f.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant,
                               quant_type="nf4")
