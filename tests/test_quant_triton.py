"""minipeft.quant_triton, the Triton kernels: byte for byte the PyTorch path's results, through
Triton's interpreter on CPU tensors here, and on a GPU (tests marked gpu) where there is one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from minipeft.quant import NF4State, dequantize_nf4, quantize_nf4
from nf4_inputs import DTYPES, bnb_quantize, random

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnb_f

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


TRITON_CHECK = textwrap.dedent("""
    import torch
    from minipeft.quant import quantize_nf4, dequantize_nf4
    g = torch.Generator().manual_seed(0)
    checked = 0
    for shape in [(7,), (3, 33), (2, 96), (5, 64), (1000,)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for blocksize in (2, 8, 32, 64, 256):
                x = (2 * torch.randn(shape, generator=g)).to(dtype)
                packed, state = quantize_nf4(x, blocksize, backend="triton")
                ref_packed, ref_state = quantize_nf4(x, blocksize, backend="torch")
                assert torch.equal(packed, ref_packed), (shape, dtype, blocksize)
                assert torch.equal(state.absmax, ref_state.absmax), (shape, dtype, blocksize)
                for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
                    out = dequantize_nf4(packed, state, out_dtype, backend="triton")
                    ref = dequantize_nf4(packed, state, out_dtype, backend="torch")
                    assert torch.equal(out, ref), (shape, dtype, blocksize, out_dtype)
                checked += 1
    print("checked", checked)
""")


def test_triton_kernels_in_the_interpreter_match_the_cpu_path_byte_for_byte():
    pytest.importorskip("triton")
    # must be set before triton is imported: a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked 75" in result.stdout


def test_triton_backend_on_cpu_tensors_without_the_interpreter_is_a_clear_error():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        quantize_nf4(torch.randn(64), backend="triton")


# -------------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_the_cpu_path(dtype):
    for shape, blocksize in [((4096, 4096), 64), ((1000, 37), 64), ((3, 5, 129), 128),
                             ((14336, 512), 256)]:
        for double_quant in (False, True):
            x = random(shape, dtype, seed=7)
            x.view(-1)[:3 * blocksize] = 0  # all-zero blocks
            x.view(-1)[-5:] = 0  # and zeros in the last, partial block
            packed, state = quantize_nf4(x.cuda(), blocksize, double_quant)
            ref_packed, ref_state = quantize_nf4(x, blocksize, double_quant)
            assert torch.equal(packed.cpu(), ref_packed)
            assert torch.equal(state.absmax.cpu(), ref_state.absmax)
            if double_quant:
                assert torch.equal(state.nested_absmax.cpu(), ref_state.nested_absmax)
            for out_dtype in DTYPES:
                assert torch.equal(dequantize_nf4(packed, state, out_dtype).cpu(),
                                   dequantize_nf4(ref_packed, ref_state, out_dtype))


@pytest.mark.gpu
def test_cuda_dequantize_same_as_bitsandbytes_cuda():
    x = random((4096, 4096), torch.bfloat16, seed=8).cuda()
    ref_packed, ref_state = bnb_quantize(x)
    ours = dequantize_nf4(ref_packed, NF4State(ref_state.absmax, x.shape, x.dtype, 64))
    assert torch.equal(ours, bnb_f.dequantize_4bit(ref_packed, ref_state))
