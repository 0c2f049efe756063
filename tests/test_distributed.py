"""minipeft.distributed in one process (a process group of one): the DDP hook averages and counts
what it all-reduces, NF4 codes become shardable parameters without changing the forward pass,
FSDP2 over a LoRA + NF4 model computes what the model computes, and the adapter comes back whole
for saving. Two processes, and their equality with one, are tested in
tests/course/test_distributed_train.py."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from minipeft.adapter_io import load_adapter, save_adapter
from minipeft.distributed import (data_parallel, gather_trainable, init_process_group,
                                  local_model_bytes, make_4bit_shardable, shard_model)
from minipeft.lora import LoraConfig, add_lora
from minipeft.qlora import quantize_model
from minipeft.quant import Linear4bit
from tests.tiny_models import tiny_llama, trained

IDS = torch.tensor([[5, 17, 42, 8, 3, 99], [7, 7, 1, 60, 4, 9]])
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def qlora_model() -> nn.Module:
    model = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    return trained(add_lora(model, LoraConfig(target_modules=TARGETS, r=4)), seed=3)


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_hook_averages_as_ddp_does_and_counts_each_steps_bytes(group_of_one):
    plain, wrapped = qlora_model(), qlora_model()
    ddp, counter = data_parallel(wrapped)
    for _ in range(3):
        for model in (plain, ddp):
            model.zero_grad(set_to_none=True)
            model(input_ids=IDS, labels=IDS).loss.backward()
    trainable = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    assert counter.steps == 3 and counter.bytes_per_step == 4 * trainable     # float32 LoRA only
    ours, theirs = trainable_grads(plain), trainable_grads(wrapped)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_nf4_codes_become_frozen_parameters_and_the_output_stays(group_of_one):
    model = qlora_model()
    before, keys = model(input_ids=IDS).logits, set(model.state_dict())
    bytes_before = local_model_bytes(model)
    make_4bit_shardable(make_4bit_shardable(model))                 # a second call changes nothing
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    assert {n for n, _ in layer.named_parameters()} == {"weight_packed", "absmax"}
    assert not any(p.requires_grad for p in layer.parameters())
    assert set(model.state_dict()) == keys and local_model_bytes(model) == bytes_before
    assert torch.equal(model(input_ids=IDS).logits, before)


def test_fsdp_over_lora_and_nf4_computes_what_the_model_computes(group_of_one, tmp_path):
    reference, model = qlora_model(), qlora_model()
    expected = reference(input_ids=IDS, labels=IDS)
    expected.loss.backward()
    shard_model(model)
    got = model(input_ids=IDS, labels=IDS)
    got.loss.backward()
    assert torch.allclose(got.logits, expected.logits, atol=1e-6)
    grads = trainable_grads(model)
    assert all(torch.allclose(grads[n].full_tensor(), g, atol=1e-6)
               for n, g in trainable_grads(reference).items())

    gather_trainable(model)                             # whole adapters, ready to save
    assert not any(hasattr(p, "full_tensor") for p in model.parameters() if p.requires_grad)
    save_adapter(model, tmp_path)
    fresh = load_adapter(quantize_model(tiny_llama(), compute_dtype=torch.float32), tmp_path)
    assert torch.allclose(fresh(input_ids=IDS).logits, expected.logits, atol=1e-6)


def test_what_cannot_be_sharded_or_joined_says_why(monkeypatch):
    with pytest.raises(ValueError, match="no transformer blocks found in Sequential"):
        shard_model(nn.Sequential(nn.Linear(4, 4)))
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        init_process_group()
