import contextlib
import gc
import io
import mmap
import sys
import time

import pytest
import torch
from torch import nn

from minipeft import memory
from minipeft.memory import (ParamCount, count_parameters, format_bytes, peak_memory,
                             peak_tensor_memory, rss_bytes,
                             training_state_bytes)


def small_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    model[0].weight.requires_grad_(False)
    return model


def test_count_parameters_frozen_and_shared():
    model = small_model()
    assert count_parameters(model) == ParamCount(trainable=20 + 100 + 5, total=220 + 105)
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert count_parameters(tied).total == 16


def test_param_count_prints_like_peft():
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    vocab_size=100))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peft_model.print_trainable_parameters()
    assert printed.getvalue().strip() == str(count_parameters(peft_model))


def test_training_state_is_16_bytes_per_param_for_fp32_adam():
    model = nn.Linear(100, 100)
    state = training_state_bytes(model)
    assert state.total == 16 * 10_100
    model.weight.requires_grad_(False)
    assert training_state_bytes(model).total == 4 * 10_100 + 12 * 100


def test_training_state_matches_a_real_adam_step():
    model = nn.Linear(64, 32)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 64)).sum().backward()
    optimizer.step()
    real_state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                     for t in s.values() if t.dim() > 0)
    assert training_state_bytes(model).optimizer == real_state


def touched_block(mib: int) -> mmap.mmap:
    """`mib` MiB of fresh memory, written so that its pages are resident; freed with the object.
    Mapped on its own rather than taken from the C allocator, which may hand out a free block the
    process already holds (resident, so the resident set would not grow): CI once saw that."""
    block = mmap.mmap(-1, mib * 2**20)
    torch.frombuffer(block, dtype=torch.uint8).fill_(1)
    return block


def test_peak_memory_sees_a_temporary_allocation():
    with peak_memory("cpu") as measured:
        touched_block(64)             # freed at once: a peak of milliseconds, which the mark sees
    assert measured.increase_bytes >= 60 * 2**20
    assert rss_bytes() > 0


LINUX = pytest.mark.skipif(sys.platform != "linux", reason="the kernel's mark is Linux's")


@LINUX
def test_a_block_inside_another_keeps_the_outer_peak():
    with peak_memory("cpu") as outer:
        touched_block(64)
        with peak_memory("cpu") as inner:           # resets the kernel's mark
            pass
    assert inner.increase_bytes < 16 * 2**20
    assert outer.increase_bytes >= 60 * 2**20


@LINUX
def test_the_peak_inside_an_inner_block_counts_for_both():
    with peak_memory("cpu") as outer:               # the two start with the same figures
        with peak_memory("cpu") as inner:
            touched_block(64)
    assert inner.increase_bytes >= 60 * 2**20 and outer.increase_bytes >= 60 * 2**20


def test_a_block_that_raises_still_ends():
    with pytest.raises(KeyError), peak_memory("cpu"):
        raise KeyError("inside the block")
    assert not memory._open_cpu_blocks


def test_where_the_mark_cannot_be_reset_the_resident_set_is_sampled(monkeypatch):
    monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    with peak_memory("cpu") as measured:
        block = touched_block(64)
        time.sleep(0.2)                             # forty sampling periods
        del block
    assert measured.increase_bytes >= 60 * 2**20


def test_peak_tensor_memory_counts_the_tensors_alive_at_once():
    kept = torch.ones(1000)                              # from before the block: not counted
    gc.collect()                             # no earlier garbage freed inside the block
    with peak_tensor_memory() as measured:
        first = torch.ones(2**20)                        # 4 MiB
        second = torch.ones(2**19)                       # 2 MiB: 6 MiB at once
        del first, second
        third = torch.ones(2**20)                        # 4 MiB, after they went
        del third
    assert measured.increase_bytes == 6 * 2**20
    assert kept.sum() == 1000


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
