"""minipeft.quant_c, the C kernel for CPU dequantisation: the same values as the PyTorch path, split
over threads, chosen by backend="auto" where it applies, and a clean fallback where it cannot be
built."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minipeft.quant import _choose_backend, dequantize_nf4, quantize_nf4
from nf4_inputs import DTYPES, needs_c_kernel, random


@needs_c_kernel
@pytest.mark.parametrize("blocksize", [32, 64, 128, 1024, 4096])
def test_c_kernel_same_as_torch_path_for_every_blocksize_and_dtype(blocksize):
    for shape in [(blocksize,), (3, blocksize + 5), (1000, 37)]:
        for dtype in DTYPES:
            x = random(shape, dtype, seed=blocksize)
            packed, state = quantize_nf4(x, blocksize)
            for out_dtype in DTYPES:
                assert torch.equal(dequantize_nf4(packed, state, out_dtype, backend="c"),
                                   dequantize_nf4(packed, state, out_dtype, backend="torch"))


@needs_c_kernel
def test_huge_pages_are_asked_for_unless_turned_off(monkeypatch):
    from minipeft import quant_c

    asked = []
    monkeypatch.setattr(quant_c.kernel(), "ask_for_huge_pages", lambda *args: asked.append(args))
    packed, state = quantize_nf4(random((256, 512), torch.float32, seed=0))
    with_them = dequantize_nf4(packed, state, backend="c")
    assert len(asked) == 1 and asked[0][1] == with_them.nbytes
    monkeypatch.setattr(quant_c, "HUGE_PAGES", False)
    assert torch.equal(dequantize_nf4(packed, state, backend="c"), with_them) and len(asked) == 1


def _gcc_major() -> int:
    from minipeft import quant_c

    version = subprocess.run([*quant_c.compiler(), "-dumpversion"], capture_output=True,
                             text=True).stdout
    return int(version.split(".")[0] or 0)


# Each instruction set takes its own code path (AVX-512: __builtin_shuffle; AVX2: intrinsics;
# x86-64: the generic loops): build the ones this CPU can run, whichever CI machine it is.
@needs_c_kernel
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_c_kernel_gives_the_same_values_built_for_each_x86_instruction_set(march, monkeypatch,
                                                                            tmp_path):
    from minipeft import quant_c

    needed = {"x86-64": "sse2", "x86-64-v3": "avx2", "x86-64-v4": "avx512bw"}[march]
    if needed not in quant_c._cpu_description().split():
        pytest.skip(f"needs an x86 CPU with {needed}")
    # GCC 11 names the x86-64-v levels; without F16C (plain x86-64) the file uses _Float16,
    # which GCC has on x86 from 12
    gcc = _gcc_major()
    if gcc < (12 if march == "x86-64" else 11):
        pytest.skip(f"building for -march={march} needs a newer GCC than {gcc}")
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(quant_c, "MARCH", march)
    quant_c.build.cache_clear()
    try:
        assert quant_c.kernel() is not None
        assert [path.name for path in tmp_path.iterdir()][0].endswith(".so")
        for blocksize in (32, 64, 256):
            x = random((7, 3 * blocksize + 5), torch.float32, seed=blocksize)
            packed, state = quantize_nf4(x, blocksize)
            for out_dtype in DTYPES:
                assert torch.equal(dequantize_nf4(packed, state, out_dtype, backend="c"),
                                   dequantize_nf4(packed, state, out_dtype, backend="torch"))
    finally:
        quant_c.build.cache_clear()     # the next test builds for this machine again


@needs_c_kernel
def test_c_kernel_splits_large_tensors_over_threads_unevenly():
    # three threads' worth, and a partial last block
    x = random(3 * 2**20 + 37, torch.bfloat16, seed=6)
    packed, state = quantize_nf4(x)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            ours = dequantize_nf4(packed, state, backend="c")
            assert torch.equal(ours, dequantize_nf4(packed, state, backend="torch"))
    finally:
        torch.set_num_threads(threads)


@needs_c_kernel
def test_auto_backend_dequantises_cpu_tensors_with_the_c_kernel_where_it_applies():
    flat = torch.zeros(64, dtype=torch.uint8)
    assert _choose_backend(flat, "auto", 64, dequantize=True) == "c"
    # blocks smaller than 16 bytes
    assert _choose_backend(flat, "auto", 16, dequantize=True) == "torch"
    assert _choose_backend(flat, "auto", 64, dequantize=False) == "torch"
    assert _choose_backend(flat.to("meta"), "auto", 64, dequantize=True) == "torch"


def test_c_backend_errors_name_what_it_does():
    x = random((4, 64))
    with pytest.raises(ValueError, match="only dequantises.*got quantisation"):
        quantize_nf4(x, backend="c")
    packed, state = quantize_nf4(x, 16)
    with pytest.raises(ValueError, match="blocksize >= 32, got blocksize 16"):
        dequantize_nf4(packed, state, backend="c")
    with pytest.raises(ValueError, match="got a tensor on meta"):
        dequantize_nf4(packed.to("meta"), state.to("meta"), backend="c")
    with pytest.raises(ValueError, match="backend must be"):
        dequantize_nf4(packed, state, backend="numba")


C_BUILD_CHECK = textwrap.dedent("""
    import warnings
    import torch
    from minipeft.quant import quantize_nf4, dequantize_nf4
    packed, state = quantize_nf4(torch.randn(3, 100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dequantize_nf4(packed, state)
    assert torch.equal(out, dequantize_nf4(packed, state, backend="torch"))
    print("warned:", [str(warning.message) for warning in caught])
    try:
        dequantize_nf4(packed, state, backend="c")
        print("built")
    except ValueError as error:
        print("error:", error)
""")


def run_c_build_check(env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", C_BUILD_CHECK], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_without_a_c_compiler_dequantisation_warns_and_uses_the_torch_path(tmp_path):
    out = run_c_build_check({**os.environ, "CC": str(tmp_path / "no-such-compiler"),
                             "MINIPEFT_CACHE": str(tmp_path / "cache")})
    assert "the CPU dequantisation kernel could not be built (FileNotFoundError" in out
    assert "It needs GCC 9 or newer (set CC to choose the compiler)" in out
    assert "error: backend='c': nf4_dequantize.c could not be built (FileNotFoundError" in out


@needs_c_kernel
def test_c_kernel_builds_with_a_compiler_command_and_no_home_directory(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("HOME", "XDG_CACHE_HOME")}
    out = run_c_build_check({**env, "CC": f"env {os.environ.get('CC', 'cc')}",
                             "MINIPEFT_CACHE": str(tmp_path)})
    assert "warned: []" in out and "built" in out
    assert len(list(tmp_path.glob("nf4_dequantize-*.so"))) == 1


FORK_CHECK = textwrap.dedent("""
    import os, signal, torch
    from minipeft.quant import quantize_nf4, dequantize_nf4
    torch.set_num_threads(2)
    packed, state = quantize_nf4(torch.randn(2**22))
    dequantize_nf4(packed, state, backend="c")  # the thread pool now exists in this process
    child = os.fork()
    if child == 0:
        signal.alarm(30)
        dequantize_nf4(packed, state, backend="c")
        os._exit(0)
    print("child exit status", os.waitpid(child, 0)[1])
""")


@needs_c_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_can_dequantise_with_threads():
    result = subprocess.run([sys.executable, "-c", FORK_CHECK], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "child exit status 0" in result.stdout
