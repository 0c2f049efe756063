"""minipeft.offload: AdamW with its state in host memory gives plain AdamW's updates bit for bit,
counts what it moves (nothing on a CPU), survives a state_dict round trip, and refuses what it
cannot update."""
from __future__ import annotations

import pytest
import torch

from minipeft.lora import LoraConfig, add_lora
from minipeft.offload import OffloadedAdamW
from tests.tiny_models import tiny_llama, trained

IDS = torch.tensor([[5, 17, 42, 8, 3, 99], [7, 7, 1, 60, 4, 9]])


def adapted(device: str = "cpu") -> torch.nn.Module:
    model = add_lora(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    return trained(model, seed=3).to(device).train()


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    ids = IDS.to(next(model.parameters()).device)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_updates_are_plain_adamws_bit_for_bit():
    ours, reference = adapted(), adapted()
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    offloaded = OffloadedAdamW([p for p in ours.parameters() if p.requires_grad], **kwargs)
    train(ours, offloaded, 5)
    train(reference, torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad],
                                       foreach=False, **kwargs), 5)
    theirs = trainable(reference)
    for name, value in trainable(ours).items():
        assert torch.equal(value, theirs[name]), name
    assert offloaded.bytes_moved == 0 and offloaded.largest_device_state_bytes == 0
    assert all(s["exp_avg"].device.type == "cpu" for s in offloaded.state.values())


def test_a_saved_and_reloaded_optimizer_continues_the_same_run():
    uninterrupted, resumed = adapted(), adapted()
    first = OffloadedAdamW([p for p in uninterrupted.parameters() if p.requires_grad])
    train(uninterrupted, first, 4)
    params = [p for p in resumed.parameters() if p.requires_grad]
    before = OffloadedAdamW(params)
    train(resumed, before, 2)
    after = OffloadedAdamW(params)
    after.load_state_dict(before.state_dict())
    train(resumed, after, 2)
    expected = trainable(uninterrupted)
    for name, value in trainable(resumed).items():
        assert torch.equal(value, expected[name]), name


def test_a_state_saved_by_torchs_adamw_continues_bit_for_bit():
    uninterrupted, resumed = adapted(), adapted()
    train(uninterrupted, torch.optim.AdamW([p for p in uninterrupted.parameters()
                                            if p.requires_grad], foreach=False), 4)
    params = [p for p in resumed.parameters() if p.requires_grad]
    theirs = torch.optim.AdamW(params, foreach=False)
    train(resumed, theirs, 2)
    ours = OffloadedAdamW(params)
    ours.load_state_dict(theirs.state_dict())                 # step saved as a float tensor
    train(resumed, ours, 2)
    expected = trainable(uninterrupted)
    for name, value in trainable(resumed).items():
        assert torch.equal(value, expected[name]), name


def test_what_it_cannot_update_is_refused():
    with pytest.raises(ValueError, match="float32 parameters.*bfloat16"):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    optimizer = OffloadedAdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="float32 parameters.*float16"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2).half())]})
    with pytest.raises(ValueError, match="betas"):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(3))], lr=-1)


@pytest.mark.gpu
def test_on_a_gpu_the_state_stays_on_the_host_and_every_byte_moved_is_counted():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none on this machine")
    ours, reference = adapted("cuda"), adapted("cuda")
    params = [p for p in ours.parameters() if p.requires_grad]
    offloaded = OffloadedAdamW(params)
    train(ours, offloaded, 3)
    train(reference, torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad]),
          3)
    theirs = trainable(reference)
    for name, value in trainable(ours).items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6)
    numel = sum(p.numel() for p in params)
    assert offloaded.bytes_moved == 3 * 16 * numel               # 2 moments x 4 B, there and back
    assert offloaded.largest_device_state_bytes == 8 * max(p.numel() for p in params)
    assert all(s["exp_avg"].is_pinned() for s in offloaded.state.values())
    again = OffloadedAdamW(params)
    again.load_state_dict(offloaded.state_dict())          # torch's would put them on the GPU
    assert all(s["exp_avg"].device.type == "cpu" and s["exp_avg_sq"].is_pinned()
               for s in again.state.values())
