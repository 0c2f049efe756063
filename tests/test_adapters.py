"""minipeft.adapters: bottleneck adapters, tested against the formulas of AdapterHub's `adapters`
library (which does not install beside transformers 5), on transformers' own BERT and Llama modules.

    Houlsby:  out = LN(h + A(h) + r)            Pfeiffer:  out = LN(h + A(LN(h + r)) + r)
    pre-norm (Llama): h + A(h) at o_proj and down_proj, A(z) = W_up f(W_down z + b_down) + b_up
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

from minipeft.adapter_io import load_adapter, save_adapter
from minipeft.adapters import (AdapterConfig, Bottleneck, PostNormAdapters, PreNormAdapters,
                               add_adapters, bottleneck_parameters)
from minipeft.inject import adapter_state_dict, disable_adapters, set_active_adapter
from minipeft.memory import count_parameters
from tests.tiny_models import tiny_bert, tiny_llama

IDS = torch.tensor([[5, 17, 42, 8, 3, 99], [7, 7, 1, 60, 2, 0]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-zero adapter weights everywhere (a fresh identity adapter would hide the formula)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".down." in name or ".up." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def A(adapter: Bottleneck, z: torch.Tensor, f) -> torch.Tensor:
    """The adapter by hand: W_up f(W_down z + b_down) + b_up."""
    down, up = adapter.down, adapter.up
    return f(z @ down.weight.T + down.bias) @ up.weight.T + up.bias


def sublayer_inputs(hidden: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, hidden, generator=generator),
            torch.randn(2, 5, hidden, generator=generator))


# ---------------------------------------------------------------- the formulas, on BERT's modules

def test_houlsby_is_LN_of_h_plus_A_of_h_plus_r_after_attention_and_feed_forward():
    model = add_adapters(tiny_bert(), AdapterConfig(kind="houlsby"))
    randomise(model)
    layer = model.bert.encoder.layer[0]
    for host, x_width in ((layer.attention.output, 32), (layer.output, 64)):
        assert isinstance(host, PostNormAdapters)
        assert isinstance(host.base_layer, (BertSelfOutput, BertOutput))
        generator = torch.Generator().manual_seed(0)
        x, r = (torch.randn(2, 5, x_width, generator=generator),
                torch.randn(2, 5, 32, generator=generator))
        base = host.base_layer.eval()
        h = x @ base.dense.weight.T + base.dense.bias
        expected = base.LayerNorm(h + A(host.adapters["default"], h, F.silu) + r)
        torch.testing.assert_close(host(x, r), expected, rtol=0, atol=1e-6)


def test_pfeiffer_applies_the_blocks_own_LayerNorm_twice_after_feed_forward_only():
    model = add_adapters(tiny_bert(), AdapterConfig(kind="pfeiffer"))
    randomise(model)
    layer = model.bert.encoder.layer[1]
    assert type(layer.attention.output) is BertSelfOutput     # no adapter after attention
    host = layer.output
    x, r = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    base = host.base_layer
    h = x @ base.dense.weight.T + base.dense.bias
    LN = base.LayerNorm
    expected = LN(h + A(host.adapters["default"], LN(h + r), F.relu) + r)
    torch.testing.assert_close(host(x, r), expected, rtol=0, atol=1e-6)


def test_pre_norm_rule_on_llama_is_h_plus_A_of_h_before_the_residual_add():
    model = add_adapters(tiny_llama(), AdapterConfig(kind="houlsby"))
    randomise(model)
    block = model.model.layers[0]
    for host in (block.self_attn.o_proj, block.mlp.down_proj):
        assert isinstance(host, PreNormAdapters)
        x = torch.randn(3, host.base_layer.in_features)
        h = host.base_layer(x)
        torch.testing.assert_close(host(x), h + A(host.adapters["default"], h, F.silu),
                                   rtol=0, atol=1e-6)
    pfeiffer = add_adapters(tiny_llama(), AdapterConfig(kind="pfeiffer"))
    assert isinstance(pfeiffer.model.layers[0].mlp.down_proj, PreNormAdapters)
    assert isinstance(pfeiffer.model.layers[0].self_attn.o_proj, nn.Linear)


# ---------------------------------------------------------------- init, what trains, how many

@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_identity_init_leaves_the_model_exactly_as_it_was(make, kind):
    before = logits(make())
    after = logits(add_adapters(make(), AdapterConfig(kind=kind)))
    assert torch.equal(before, after)


def test_houlsby_init_is_near_identity_and_bert_init_is_not_identity():
    before = logits(tiny_bert())
    torch.manual_seed(0)
    near = logits(add_adapters(tiny_bert(), AdapterConfig(kind="houlsby", init="houlsby")))
    torch.manual_seed(0)
    bert = logits(add_adapters(tiny_bert(), AdapterConfig(kind="houlsby", init="bert")))
    assert not torch.equal(near, before) and not torch.equal(bert, before)
    assert (near - before).abs().max() < (bert - before).abs().max()
    weights = [p for n, p in add_adapters(tiny_bert(), AdapterConfig(init="houlsby")
                                          ).named_parameters()
               if n.endswith("weight") and ".up." in n]
    assert all(w.abs().max() <= 2e-2 for w in weights)   # cut at 2 standard deviations


@pytest.mark.parametrize("kind, sites", [("houlsby", 2), ("pfeiffer", 1)])
def test_only_the_adapters_and_the_saved_head_train(kind, sites):
    model = add_adapters(tiny_bert(), AdapterConfig(kind=kind, reduction_factor=4,
                                                    modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".down." in n or ".up." in n or n.startswith("classifier.modules_to_save")
               for n in trainable)
    per_adapter = bottleneck_parameters(32, 4)
    assert per_adapter == 2 * 32 * 8 + 8 + 32
    head = 32 * 2 + 2
    assert count_parameters(model).trainable == 2 * sites * per_adapter + head   # 2 layers


def test_a_training_step_changes_only_adapter_weights():
    model = add_adapters(tiny_bert(), AdapterConfig(kind="houlsby",
                                                    modules_to_save=["classifier"]))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    ups = [p for n, p in model.named_parameters() if n.endswith("up.weight")]
    assert any(p.abs().sum() > 0 for p in ups)   # W_up left zero, so the adapter learns


# ---------------------------------------------------------------- several adapters, saving

def test_named_adapters_switch_and_disable():
    model = add_adapters(tiny_bert(), AdapterConfig(kind="houlsby"), "a")
    add_adapters(model, AdapterConfig(kind="pfeiffer", reduction_factor=8), "b")
    randomise(model)
    base = logits(tiny_bert())
    with_b = logits(model)
    set_active_adapter(model, "a")
    with_a = logits(model)
    assert not torch.allclose(with_a, with_b)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-6)
    assert torch.equal(logits(model), with_a)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)


def test_save_and_load_give_the_same_model(tmp_path):
    config = AdapterConfig(kind="houlsby", reduction_factor=8, modules_to_save=["classifier"])
    model = add_adapters(tiny_bert(), config)
    randomise(model)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_bert(), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))
    assert set(adapter_state_dict(loaded)) == set(adapter_state_dict(model))
    assert any(k.endswith("output.down.weight") for k in adapter_state_dict(model))
    with pytest.raises(ValueError, match="trained on a BertForSequenceClassification"):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_loading_weights_of_another_size_changes_nothing(tmp_path):
    model = add_adapters(tiny_bert(), AdapterConfig(kind="houlsby", reduction_factor=8))
    save_adapter(model, tmp_path / "adapter")
    wider = tiny_bert(hidden=48)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_adapter(wider, tmp_path / "adapter")
    assert not any(isinstance(m, PostNormAdapters) for m in wider.modules())


def test_a_16_bit_model_gets_float32_adapters():
    model = add_adapters(tiny_llama().to(torch.bfloat16), AdapterConfig(kind="houlsby"))
    host = model.model.layers[0].mlp.down_proj
    assert host.adapters["default"].up.weight.dtype == torch.float32
    assert host(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, problem", [
    ({"kind": "parallel"}, "kind must be 'houlsby' or 'pfeiffer'"),
    ({"reduction_factor": 0}, "reduction_factor must be an integer >= 1"),
    ({"reduction_factor": 2.5}, "reduction_factor must be an integer >= 1"),
    ({"non_linearity": "sigmoidish"}, "is not one of"),
    ({"init": "zeros"}, "init must be"),
    ({"modules_to_save": "classifier"}, "must be a list"),
])
def test_bad_configs_are_refused_with_the_fix(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        AdapterConfig(**kwargs)


def test_defaults_follow_the_adapters_library():
    assert AdapterConfig(kind="houlsby").non_linearity == "swish"
    assert AdapterConfig(kind="pfeiffer").non_linearity == "relu"
    assert AdapterConfig().reduction_factor == 16


def test_a_model_without_transformer_blocks_is_refused_and_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no transformer block minipeft recognises"):
        add_adapters(model, AdapterConfig())
    assert all(p.requires_grad for p in model.parameters())


def test_a_reduction_factor_wider_than_the_model_is_refused_before_any_change():
    model = tiny_bert()
    with pytest.raises(ValueError, match="leaves no bottleneck for hidden size 32"):
        add_adapters(model, AdapterConfig(reduction_factor=64))
    with pytest.raises(ValueError, match="matched no module"):
        add_adapters(model, AdapterConfig(modules_to_save=["head"]))
    assert not any(isinstance(m, PostNormAdapters) for m in model.modules())
