"""minipeft.adapter_io: minipeft's own adapter files, and peft's files in both directions."""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minipeft.adapter_io import export_peft, import_peft, load_adapter, save_adapter
from minipeft.inject import adapter_state_dict
from minipeft.lora import LoraConfig, add_lora, set_active_adapter
from tiny_models import tiny_bert, tiny_llama, trained

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


IDS = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(0))
BERT_CONFIG = LoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                         modules_to_save=["classifier"])
LLAMA_CONFIG = LoraConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj", "down_proj"],
                          use_rslora=True)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def snapshot(model: nn.Module) -> tuple:
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {n: p.detach().clone() for n, p in model.state_dict().items()},
            copy.copy(getattr(model, "minipeft_configs", None)))


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])


# ---------------------------------------------------------------- minipeft's own format

@pytest.mark.parametrize("make, config", [(tiny_bert, BERT_CONFIG), (tiny_llama, LLAMA_CONFIG)])
def test_save_load_round_trip_gives_identical_logits(tmp_path, make, config):
    ours = trained(add_lora(make(), config))
    save_adapter(ours, tmp_path)
    loaded = load_adapter(make(), tmp_path)
    assert torch.equal(logits(loaded), logits(ours))
    assert loaded.minipeft_configs == {"default": config}


def test_saved_file_holds_only_the_adapter(tmp_path):
    ours = trained(add_lora(tiny_bert(), BERT_CONFIG))
    save_adapter(ours, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    expected = adapter_state_dict(ours)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert any(k.endswith("lora_A.weight") for k in saved) and "classifier.weight" in saved
    assert not any("base_layer" in k or "embeddings" in k for k in saved)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["format"] == "minipeft-adapter" and meta["method"] == "lora"
    assert meta["base_model_class"] == "BertForSequenceClassification"


def test_load_under_another_name_next_to_an_existing_adapter(tmp_path):
    first = trained(add_lora(tiny_bert(), BERT_CONFIG), seed=1)
    second = trained(add_lora(tiny_bert(), BERT_CONFIG), seed=2)
    save_adapter(second, tmp_path)
    both = load_adapter(copy.deepcopy(first), tmp_path, adapter_name="second")
    assert torch.equal(logits(both), logits(second))


# ---------------------------------------------------------------- peft's format, both directions

@pytest.mark.parametrize("make, config", [(tiny_bert, BERT_CONFIG), (tiny_llama, LLAMA_CONFIG)])
def test_peft_loads_an_exported_minipeft_adapter(tmp_path, make, config):
    ours = trained(add_lora(make(), config))
    export_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert (logits(theirs) - logits(ours)).abs().max() < 1e-5
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == \
        {"base_model.model." + k for k in adapter_state_dict(ours)}


@pytest.mark.parametrize("make, config", [(tiny_bert, BERT_CONFIG), (tiny_llama, LLAMA_CONFIG)])
def test_minipeft_imports_a_peft_saved_adapter(tmp_path, make, config):
    theirs = peft.get_peft_model(make(), peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules,
        modules_to_save=config.modules_to_save or None, use_rslora=config.use_rslora))
    trained(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = import_peft(make(), tmp_path)
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5
    imported = ours.minipeft_configs["default"]
    # peft keeps a set: order is lost
    assert sorted(imported.target_modules) == sorted(config.target_modules)
    assert (imported.r, imported.alpha, imported.use_rslora, imported.modules_to_save) == \
        (config.r, config.alpha, config.use_rslora, config.modules_to_save)


def test_peft_seq_cls_task_type_adapter_imports(tmp_path):
    """peft lists both "classifier" and "score" as heads for SEQ_CLS; BERT has only the first."""
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                              lora_alpha=8,
                                                              target_modules=["query", "value"]))
    trained(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = import_peft(tiny_bert(), tmp_path)
    assert ours.minipeft_configs["default"].modules_to_save == ["classifier"]
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5


def test_round_trip_through_peft_and_back(tmp_path):
    ours = trained(add_lora(tiny_bert(), BERT_CONFIG))
    export_peft(ours, tmp_path / "exported")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "exported")
    theirs.save_pretrained(tmp_path / "resaved")
    back = import_peft(tiny_bert(), tmp_path / "resaved")
    assert torch.equal(logits(back), logits(ours))


# ------------------------------------------------------- mismatches: clear errors, model untouched

def test_an_adapter_saved_from_another_base_of_the_same_shapes_is_named_in_a_warning(tmp_path):
    """Keys and shapes match (a base and its chat version), so only the names can tell."""
    base = trained(add_lora(tiny_bert(), BERT_CONFIG))
    export_peft(base, tmp_path, base_model_name_or_path="org/bert-base")
    chat = tiny_bert()
    chat.name_or_path = "org/bert-chat"
    with pytest.warns(UserWarning, match="saved from base model 'org/bert-base'.*'org/bert-chat'"):
        import_peft(chat, tmp_path)
    same = tiny_bert()
    same.name_or_path = "/home/me/models/BERT-base/"      # a local folder of the same model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_peft(same, tmp_path)


def test_adapter_for_another_model_size_is_refused(tmp_path):
    save_adapter(trained(add_lora(tiny_bert(hidden=32), BERT_CONFIG)), tmp_path)
    other = tiny_bert(hidden=64)
    before = snapshot(other)
    with pytest.raises(ValueError, match="wrong shape.*base model"):
        load_adapter(other, tmp_path)
    assert_unchanged(other, before)


def test_adapter_for_another_architecture_is_refused(tmp_path):
    save_adapter(trained(add_lora(tiny_bert(), BERT_CONFIG)), tmp_path)
    llama = tiny_llama()
    before = snapshot(llama)
    with pytest.raises(ValueError, match="trained on a BertForSequenceClassification"):
        load_adapter(llama, tmp_path)
    assert_unchanged(llama, before)


def test_weights_file_with_missing_or_extra_keys_is_refused(tmp_path):
    save_adapter(trained(add_lora(tiny_bert(), BERT_CONFIG)), tmp_path)
    weights = load_file(tmp_path / "adapter.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, tmp_path / "adapter.safetensors")
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"missing: {dropped}.*unexpected: bert.pooler.dense"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_peft_adapter_with_other_rank_is_refused(tmp_path):
    ours = trained(add_lora(tiny_bert(), BERT_CONFIG))
    export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"wrong shape: .*lora_A.weight is \(4, 32\) in the "
                                         r"weights but \(8, 32\)"):
        import_peft(model, tmp_path)
    assert_unchanged(model, before)


def test_pickled_adapters_are_never_loaded(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match="pickle.*safe_serialization=True"):
        import_peft(tiny_bert(), tmp_path)


def test_unsupported_peft_options_are_refused(tmp_path):
    export_peft(trained(add_lora(tiny_bert(), BERT_CONFIG)), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(tiny_bert(), tmp_path)


def test_a_peft_method_minipeft_does_not_read_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'.*reads those"):
        import_peft(tiny_bert(), tmp_path)


def test_wrong_folder_kinds_say_which_function_to_use(tmp_path):
    export_peft(trained(add_lora(tiny_bert(), BERT_CONFIG)), tmp_path)
    with pytest.raises(ValueError, match="peft adapter.*import_peft"):
        load_adapter(tiny_bert(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_bert(), tmp_path / "nowhere")


def test_corrupt_files_are_reported(tmp_path):
    save_adapter(trained(add_lora(tiny_bert(), BERT_CONFIG)), tmp_path)
    (tmp_path / "adapter.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(tiny_bert(), tmp_path)
    (tmp_path / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON adapter config"):
        load_adapter(tiny_bert(), tmp_path)


def test_invalid_config_in_file_is_reported(tmp_path):
    save_adapter(trained(add_lora(tiny_bert(), BERT_CONFIG)), tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["config"]["r"] = 0
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not hold a valid LoraConfig.*r must be an integer >= 1"):
        load_adapter(tiny_bert(), tmp_path)


def test_saving_an_unknown_adapter_names_the_ones_there(tmp_path):
    model = add_lora(tiny_bert(), BERT_CONFIG)
    with pytest.raises(ValueError, match=r"no adapter named 'other' \(it has \['default'\]\)"):
        save_adapter(model, tmp_path, adapter_name="other")
    assert not Path(tmp_path / "adapter.json").exists()


def test_export_one_of_two_adapters(tmp_path):
    ours = trained(add_lora(tiny_bert(), BERT_CONFIG), seed=1)
    trained(add_lora(ours, BERT_CONFIG, adapter_name="other"), seed=2)
    set_active_adapter(ours, "default")
    export_peft(ours, tmp_path, adapter_name="default")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert (logits(theirs) - logits(ours)).abs().max() < 1e-5
