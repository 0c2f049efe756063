"""minipeft.prompts: prompt tuning and prefix tuning, equal to peft's for the same virtual tokens
or prefixes (BERT sequence classification with segment ids and padding; a Llama causal LM with
grouped-query attention and labels); generate() equal to a greedy decode written by hand."""
from __future__ import annotations

import peft
import pytest
import torch

from minipeft.adapter_io import load_adapter, save_adapter
from minipeft.inject import disable_adapters
from minipeft.prompts import (PrefixTuningConfig, PromptTuningConfig, add_prefix_tuning,
                              add_prompt_tuning, fold_prefix_projection)
from tests.tiny_models import tiny_bert, tiny_llama, trained

IDS = torch.tensor([[5, 17, 42, 8, 3, 99], [7, 7, 1, 60, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
TYPES = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def with_peft_prompt(make, task_type: str, n: int = 5):
    """(peft's model, ours) with the same base weights and the same (random) virtual tokens."""
    reference = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task_type,
                                                                    num_virtual_tokens=n))
    prompt = reference.prompt_encoder["default"].embedding.weight.detach().clone()
    ours = add_prompt_tuning(make(), PromptTuningConfig(num_virtual_tokens=n),
                             weights={"prompt_encoder.prompt_embeddings": prompt})
    return reference.eval(), ours.eval()


def test_bert_classification_equals_peft_with_segments_padding_and_labels():
    reference, ours = with_peft_prompt(tiny_bert, "SEQ_CLS")
    batch = dict(input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES,
                 labels=torch.tensor([0, 1]))
    with torch.no_grad():
        theirs, mine = reference(**batch), ours(**batch)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(mine.loss, theirs.loss, rtol=0, atol=1e-6)


def test_llama_causal_lm_equals_peft_and_is_not_scored_on_the_prompt():
    reference, ours = with_peft_prompt(tiny_llama, "CAUSAL_LM", n=4)
    batch = dict(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100))
    with torch.no_grad():
        theirs, mine = reference(**batch), ours(**batch)
    assert mine.logits.shape == (2, 4 + 6, 100)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(mine.loss, theirs.loss, rtol=0, atol=1e-6)


def test_disabled_it_is_the_base_model_and_only_the_prompt_trains():
    base = tiny_bert()
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
    model = add_prompt_tuning(tiny_bert(), PromptTuningConfig(num_virtual_tokens=3,
                                                              modules_to_save=["classifier"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.prompts.default",
                         "classifier.modules_to_save.default.weight",
                         "classifier.modules_to_save.default.bias"}
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(input_ids=IDS).logits, expected)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=IDS).logits, expected)


def test_save_and_load_give_the_same_outputs(tmp_path):
    model = add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=4))
    save_adapter(model, tmp_path / "prompt")
    loaded = load_adapter(tiny_llama(), tmp_path / "prompt")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_text_init_starts_from_the_texts_token_embeddings():
    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [11, 12, 13]}

    model = add_prompt_tuning(tiny_bert(), PromptTuningConfig(num_virtual_tokens=7, init="text",
                                                              init_text="good or bad?"),
                              tokenizer=Tokenizer())
    rows = model.get_input_embeddings().weight[[11, 12, 13, 11, 12, 13, 11]]
    assert torch.equal(model.prompt_encoder.prompts["default"].detach(), rows.detach())


@pytest.mark.parametrize("kwargs, problem", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be an integer >= 1"),
    ({"init": "text"}, "needs init_text"),
    ({"init": "zeros"}, "init must be"),
])
def test_bad_configs_are_refused(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        PromptTuningConfig(**kwargs)


def test_what_is_not_supported_says_so():
    model = add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="keyword arguments only"):
        model(IDS)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        add_prompt_tuning(tiny_bert(), PromptTuningConfig(init="text", init_text="hi"))


@pytest.mark.parametrize("add", ["prompt", "prefix"])
def test_given_positions_count_the_virtual_tokens_as_the_default_ones_do(add):
    model = (add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
             if add == "prompt"
             else add_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2)))
    with torch.no_grad():
        numbered = model(input_ids=IDS, position_ids=torch.arange(6).expand(2, -1)).logits
        torch.testing.assert_close(numbered, model(input_ids=IDS).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- generate()

def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by hand: the whole sequence through the model for every new token."""
    for _ in range(new_tokens):
        with torch.no_grad():
            next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids


@pytest.mark.parametrize("add, config", [
    (add_prompt_tuning, PromptTuningConfig(num_virtual_tokens=3)),
    (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=3)),
    (add_prefix_tuning, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)),
])
def test_generate_equals_a_greedy_decode_by_hand_token_for_token(add, config):
    model = add(tiny_llama(), config).eval()
    model.generation_config.eos_token_id = None           # all 8 tokens, as the loop makes
    trained(model, seed=3, scale=1.0)
    left_padded = torch.tensor([[5, 17, 42, 8, 3, 99], [0, 0, 7, 7, 1, 60]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        generated = model.generate(input_ids=left_padded, attention_mask=mask, max_new_tokens=8,
                                   do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:1], greedy(model, left_padded[:1], 8))
    assert torch.equal(generated[1:, 2:], greedy(model, left_padded[1:, 2:], 8))


# ---------------------------------------------------------------- prefix tuning

def with_peft_prefix(make, task_type: str, projection: bool, n: int = 3):
    """(peft's model, ours) with the same base weights and the same prefixes (or MLP)."""
    reference = peft.get_peft_model(make(), peft.PrefixTuningConfig(
        task_type=task_type, num_virtual_tokens=n, prefix_projection=projection))
    trained(reference.prompt_encoder, seed=3, scale=1.0)   # the prefixes (or MLP), not the head
    encoder = reference.prompt_encoder["default"]
    ours = add_prefix_tuning(make(), PrefixTuningConfig(num_virtual_tokens=n,
                                                        prefix_projection=projection))
    with torch.no_grad():
        if projection:
            ours.prefix_encoder.projections["default"].load_state_dict(encoder.state_dict())
        else:
            ours.prefix_encoder.prefixes["default"].copy_(encoder.embedding.weight)
    return reference.eval(), ours.eval()


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("make, task_type, extra", [
    (tiny_bert, "SEQ_CLS", dict(token_type_ids=TYPES, labels=torch.tensor([0, 1]))),
    (tiny_llama, "CAUSAL_LM", dict(labels=IDS.masked_fill(MASK == 0, -100))),
])
def test_prefix_tuning_equals_peft(make, task_type, extra, projection):
    reference, ours = with_peft_prefix(make, task_type, projection)
    for mask in (None, MASK):
        batch = dict(input_ids=IDS, attention_mask=mask, **extra)
        with torch.no_grad():
            theirs, mine = reference(**batch), ours(**batch)
        assert mine.logits.shape == theirs.logits.shape     # the prefix adds no output positions
        torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.loss, theirs.loss, rtol=0, atol=1e-6)


def test_prefixes_have_the_key_value_heads_of_grouped_query_attention():
    model = add_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=5))
    layers, kv_heads, head_dim = 2, 2, 32 // 4        # 4 query heads share 2 key/value heads
    assert model.prefix_encoder.prefixes["default"].shape == (5, layers * 2 * kv_heads * head_dim)


def test_prefix_disabled_is_the_base_model_and_only_the_prefix_trains():
    base = tiny_llama()
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
    model = add_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3,
                                                               prefix_projection=True))
    assert all(name.startswith("prefix_encoder.projections.default.")
               for name, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad(), disable_adapters(model):
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=IDS).logits, expected)


def test_folding_the_projection_keeps_the_outputs_and_only_the_prefixes():
    model = add_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3,
                                                               prefix_projection=True))
    trained(model, seed=3, scale=1.0)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    fold_prefix_projection(model)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == \
        ["prefix_encoder.prefixes.default"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="prefix_projection=True"):
        fold_prefix_projection(model)


def test_prefix_save_and_load_give_the_same_outputs(tmp_path):
    model = add_prefix_tuning(tiny_bert(), PrefixTuningConfig(num_virtual_tokens=4,
                                                              prefix_projection=True,
                                                              modules_to_save=["classifier"]))
    trained(model, seed=3, scale=1.0)
    save_adapter(model, tmp_path / "prefix")
    loaded = load_adapter(tiny_bert(), tmp_path / "prefix")
    assert not loaded.prefix_encoder.projections          # saved: the prefixes, not the MLP
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits,
                                   rtol=0, atol=1e-6)


def test_bad_prefix_configs_and_models_are_refused():
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixTuningConfig(encoder_hidden_size=0)
    with pytest.raises(ValueError, match="leaves no room for input.*64 positions"):
        add_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=64))
    with pytest.raises(ValueError, match="no self-attention layer"):
        linear = torch.nn.Linear(4, 4)
        linear.config = tiny_bert().config
        add_prefix_tuning(linear, PrefixTuningConfig(num_virtual_tokens=2))
    model = add_prefix_tuning(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2)).train()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="checkpointing.*activation_checkpointing_disable"):
        model(input_ids=IDS)
    model.activation_checkpointing_disable()
    with pytest.raises(ValueError, match="keyword arguments only"):
        model(IDS)


# ---------------------------------------------------------------- peft's adapter folders

PEFT_CONFIGS = {"prompt": lambda task_type: peft.PromptTuningConfig(task_type=task_type,
                                                                   num_virtual_tokens=4),
                "prefix": lambda task_type: peft.PrefixTuningConfig(task_type=task_type,
                                                                   num_virtual_tokens=4),
                "prefix-mlp": lambda task_type: peft.PrefixTuningConfig(
                    task_type=task_type, num_virtual_tokens=4, prefix_projection=True)}
OUR_CONFIGS = {"prompt": (add_prompt_tuning, PromptTuningConfig),
               "prefix": (add_prefix_tuning, PrefixTuningConfig)}


@pytest.mark.parametrize("method", PEFT_CONFIGS)
@pytest.mark.parametrize("make, task_type", [(tiny_bert, "SEQ_CLS"), (tiny_llama, "CAUSAL_LM")])
def test_a_peft_prompt_or_prefix_folder_imports_with_the_same_outputs(tmp_path, make, task_type,
                                                                      method):
    from minipeft.adapter_io import import_peft
    reference = peft.get_peft_model(make(), PEFT_CONFIGS[method](task_type))
    trained(reference, seed=3, scale=1.0)
    reference.save_pretrained(tmp_path)
    ours = import_peft(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   reference.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", OUR_CONFIGS)
@pytest.mark.parametrize("make, head", [(tiny_bert, ["classifier"]), (tiny_llama, [])])
def test_an_exported_prompt_or_prefix_loads_into_peft_with_the_same_outputs(tmp_path, make, head,
                                                                            method):
    from minipeft.adapter_io import export_peft
    add, config = OUR_CONFIGS[method]
    ours = add(make(), config(num_virtual_tokens=3, modules_to_save=head))
    trained(ours, seed=3, scale=1.0)
    export_peft(ours, tmp_path)
    reference = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   ours.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   rtol=0, atol=1e-5)
