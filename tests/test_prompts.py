"""minipeft.prompts: prompt tuning, equal to peft's for the same virtual tokens (BERT sequence
classification with segment ids and padding; a Llama causal LM with labels)."""
from __future__ import annotations

import peft
import pytest
import torch

from minipeft.adapter_io import load_adapter, save_adapter
from minipeft.inject import disable_adapters
from minipeft.prompts import PromptTuningConfig, add_prompt_tuning
from tests.tiny_models import tiny_bert, tiny_llama

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
    batch = dict(input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES, labels=torch.tensor([0, 1]))
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
    assert trainable == {"prompt_encoder.prompts.default", "classifier.modules_to_save.default.weight",
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
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=IDS, position_ids=torch.arange(6).expand(2, -1))
    with pytest.raises(NotImplementedError, match="generate"):
        model.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        add_prompt_tuning(tiny_bert(), PromptTuningConfig(init="text", init_text="hi"))


# ---------------------------------------------------------------- peft's adapter folders

def scramble(model: torch.nn.Module, seed: int = 3) -> None:
    """Trained-looking values in everything that trains (prompt, head copy)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("make, task_type", [(tiny_bert, "SEQ_CLS"), (tiny_llama, "CAUSAL_LM")])
def test_a_peft_prompt_tuning_folder_imports_with_the_same_outputs(tmp_path, make, task_type):
    from minipeft.adapter_io import import_peft
    reference = peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task_type,
                                                                    num_virtual_tokens=4))
    scramble(reference)
    reference.save_pretrained(tmp_path)
    ours = import_peft(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   reference.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("make, head", [(tiny_bert, ["classifier"]), (tiny_llama, [])])
def test_an_exported_prompt_loads_into_peft_with_the_same_outputs(tmp_path, make, head):
    from minipeft.adapter_io import export_peft
    ours = add_prompt_tuning(make(), PromptTuningConfig(num_virtual_tokens=3, modules_to_save=head))
    scramble(ours)
    export_peft(ours, tmp_path)
    reference = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   ours.eval()(input_ids=IDS, attention_mask=MASK).logits,
                                   rtol=0, atol=1e-5)
