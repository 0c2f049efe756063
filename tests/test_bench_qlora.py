"""bench/qlora.py's GPU run (--gpu), exercised on the CPU with the CUDA calls stood in for and a
tiny Llama: GPU time is scarce, so its code path is checked here first (its figures are not)."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from minipeft import planner
from minipeft import qlora as minipeft_qlora

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000,
        "max_position_embeddings": 128, "tie_word_embeddings": False}


def test_the_gpu_run_goes_through_on_stand_ins(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import qlora as bench_qlora

    allocated = itertools.count(10**6, 10**5)          # grows with every reading
    for name, value in {"memory_allocated": lambda *a: next(allocated),
                        "max_memory_allocated": lambda *a: 10**9,
                        "max_memory_reserved": lambda *a: 2 * 10**9,
                        "memory_reserved": lambda *a: 2 * 10**9,
                        "mem_get_info": lambda *a: (10**9, 4 * 10**9),
                        "reset_peak_memory_stats": lambda *a: None,
                        "synchronize": lambda *a: None, "empty_cache": lambda *a: None,
                        "get_device_name": lambda *a: "stand-in GPU"}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(planner, "load_config", lambda name: TINY)
    monkeypatch.setattr(minipeft_qlora, "compute_dtype_for", lambda *a: torch.float32)
    random_model, batch_of = bench_qlora.random_model, bench_qlora.batch_of
    monkeypatch.setattr(bench_qlora, "random_model", lambda c, d: random_model(c, "cpu").float())
    monkeypatch.setattr(bench_qlora, "batch_of", lambda b, s, v, d: batch_of(b, s, v, "cpu"))
    monkeypatch.setattr(bench_qlora, "GPU_SHAPES", [(1, 16), (2, 32)])
    bench_qlora.gpu_bench("llama-2-7b")
    out = capsys.readouterr().out
    assert "stand-in GPU" in out and "4-bit codes: 0 of 40,960 bytes differ" in out
    assert out.count(" x 16 ") == 1 and out.count(" x 32 ") == 1 and "CUDA context" in out
