"""minipeft.qlora: a 4-bit base with LoRA, equal to bitsandbytes + peft on the same weights (CPU),
training only the adapters, merging without losing the update, and peft's adapter folders both
ways."""
from __future__ import annotations

import weakref

import peft
import pytest
import torch
from torch import nn

from bench.timing import bnb_4bit
from minipeft.adapter_io import export_peft, import_peft
from minipeft.lora import LoraConfig, LoraLinear, add_lora, merge_lora, unmerge_lora
from minipeft.qlora import compute_dtype_for, prepare_for_training, quantize_model
from minipeft.quant import Linear4bit, quantize_nf4
from tests.tiny_models import tiny_llama, trained

IDS = torch.tensor([[5, 17, 42, 8, 3, 99], [7, 7, 1, 60, 4, 9]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama() -> nn.Module:
    """The tiny Llama with rows of whole 64-value blocks: on AVX-512 CPUs bitsandbytes 0.50.2
    dequantises other rows wrongly (tests/test_quant.py), and several tests here compare with
    bitsandbytes."""
    return tiny_llama(hidden=64)


def test_the_compute_dtype_is_float32_on_cpu_and_a_bad_one_is_refused():
    assert compute_dtype_for("cpu") == torch.float32
    assert compute_dtype_for("cpu", torch.bfloat16) == torch.bfloat16
    for bad in (torch.int8, torch.float64, "bf16"):
        with pytest.raises(ValueError, match="float32, torch.bfloat16 or torch.float16"):
            compute_dtype_for("cpu", bad)


def test_a_gpu_without_bfloat16_computes_in_float32_and_refuses_bfloat16(monkeypatch):
    """A T4 (compute capability 7.5) as PyTorch describes it; no GPU needed."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert compute_dtype_for("cuda") == torch.float32
    assert compute_dtype_for("cuda", torch.float16) == torch.float16      # asked for: allowed
    with pytest.raises(ValueError, match="Tesla T4 cannot compute in bfloat16.*float32"):
        compute_dtype_for("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert compute_dtype_for("cuda") == torch.bfloat16                      # an A100


@pytest.mark.gpu
def test_the_compute_dtype_on_this_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none on this machine")
    if torch.cuda.get_device_capability() >= (8, 0):          # native bf16 (a T4 emulates it)
        assert compute_dtype_for("cuda") == torch.bfloat16
    else:
        assert compute_dtype_for("cuda") == torch.float32
        with pytest.raises(ValueError, match="cannot compute in bfloat16.*float32"):
            compute_dtype_for("cuda", torch.bfloat16)


def test_every_linear_but_the_head_becomes_4bit_with_the_same_bytes_as_bitsandbytes():
    ours, theirs = quantize_model(llama()), bnb_4bit(llama())
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == sorted(LINEARS)
    assert isinstance(ours.lm_head, nn.Linear) and isinstance(ours.model.embed_tokens, nn.Embedding)
    for name, layer in layers.items():
        reference = theirs.get_submodule(name).weight
        assert torch.equal(layer.weight_packed.flatten(), reference.data.flatten()), name
        assert layer.nested_absmax is not None                       # double quantisation
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits,
                                   rtol=0, atol=1e-5)


def test_quantizing_frees_each_full_precision_weight_before_the_next_layer(monkeypatch):
    """The peak is the model plus one layer: each full-precision weight is gone before the next
    layer is quantised (holding them all to the end would add every 4-bit code on top)."""
    model = llama()
    originals = [weakref.ref(m.weight) for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name != "lm_head"]
    alive_at_each_layer = []
    from_linear = Linear4bit.from_linear

    def counting(linear: nn.Linear, *args) -> Linear4bit:
        alive_at_each_layer.append(sum(ref() is not None for ref in originals))
        return from_linear(linear, *args)
    monkeypatch.setattr(Linear4bit, "from_linear", counting)
    quantize_model(model)
    assert alive_at_each_layer == list(range(len(originals), 0, -1))


def test_lora_on_the_4bit_base_equals_peft_on_bitsandbytes():
    config = LoraConfig(target_modules=list(LINEARS), r=4, alpha=8)
    reference = peft.get_peft_model(bnb_4bit(llama()), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(LINEARS)))
    trained(reference, seed=3)
    weights = {key.removeprefix("base_model.model.").replace(".default", ""): t
               for key, t in reference.state_dict().items() if "lora_" in key}
    ours = add_lora(quantize_model(llama()), config, weights=weights)
    assert isinstance(ours.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, reference(input_ids=IDS).logits,
                                   rtol=0, atol=1e-5)


def test_peft_qlora_folders_both_ways(tmp_path):
    config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    ours = add_lora(quantize_model(llama()), config)
    trained(ours, seed=3)
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bnb_4bit(llama()), tmp_path / "ours")
    back = import_peft(quantize_model(llama()), tmp_path / "ours")
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
        torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
        assert torch.equal(back(input_ids=IDS).logits, expected)


def test_an_adapter_that_peft_trained_on_bitsandbytes_base_gives_the_same_logits_here(tmp_path):
    """The QLoRA tutorials' way round: peft on bitsandbytes' 4-bit base, save_pretrained, and
    minipeft's own 4-bit base reads the folder."""
    theirs = peft.get_peft_model(bnb_4bit(llama()), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"]))
    trained(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = import_peft(quantize_model(llama()), tmp_path)
    assert isinstance(ours.model.layers[0].mlp.up_proj.base_layer, Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_only_the_adapters_train_and_checkpointing_gives_the_same_gradients(use_reentrant):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = add_lora(quantize_model(llama()), LoraConfig(target_modules=list(LINEARS)))
        trained(model, seed=3)
        model.train()
        if checkpointing:
            prepare_for_training(model, use_reentrant=use_reentrant)
            assert model.config.use_cache is False       # no cache warning on every step
        model(input_ids=IDS, labels=IDS).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert len(plain) == 2 * 2 * len(LINEARS) and all(g is not None for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_merging_keeps_the_update_that_requantising_would_round_away():
    model = add_lora(quantize_model(llama()), LoraConfig(target_modules=list(LINEARS), r=4))
    trained(model, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)                                   # a small, trained-looking update
        before = model(input_ids=IDS).logits
        layer: LoraLinear = model.model.layers[0].self_attn.q_proj
        four_bit = layer.base_layer
        merge_lora(model)
        assert type(layer.base_layer) is nn.Linear
        assert layer.base_layer.weight.dtype == torch.float32
        torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=0, atol=1e-5)
        # the same update re-quantised to NF4 instead: the codes do not move, the update is lost
        delta = layer.delta_weight("default")
        w0 = four_bit.dequantized_weight()
        packed, state = quantize_nf4(w0 + delta, 64, True)
        assert (packed == four_bit.weight_packed).float().mean() > 0.95
        requantised = Linear4bit(packed, state, None).dequantized_weight()
        assert (requantised - (w0 + delta)).norm() > 0.9 * delta.norm()
        unmerge_lora(model)
        assert layer.base_layer is four_bit
        torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=0, atol=0)


def test_a_model_without_matching_linear_layers_is_refused_untouched():
    model = llama()
    with pytest.raises(ValueError, match="matched no nn.Linear.*q_proj"):
        quantize_model(model, ["query"])
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_adapters_train_in_float32_over_a_bfloat16_base():
    model = add_lora(quantize_model(llama(), compute_dtype=torch.bfloat16),
                     LoraConfig(target_modules=["q_proj", "v_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model(input_ids=IDS, labels=IDS).loss.backward()          # a GradScaler needs fp32 grads
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32
