"""minipeft.course.runs: a run trained once is read back when everything it depends on is the
same (trained weights, figures and the random numbers that follow), and trained again when
anything is not: the recipe, the adapter's starting values, the data."""
import pytest
import torch

from minipeft import course
from minipeft.course import runs
from minipeft.lora import LoraConfig, add_lora

RECIPE = dict(batch_size=8, lr=4e-3, desc="tiny LoRA run")


def lora_bert(seed: int = 0):
    course.seed_everything(seed)
    model, tokenizer = course.load_model("bert", num_labels=2)
    return add_lora(model, LoraConfig(target_modules=["query", "value"], r=2,
                                      modules_to_save=["classifier"])), tokenizer


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_an_identical_run_is_read_back_and_any_difference_trains_again(monkeypatch, tmp_path,
                                                                       capsys):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    data = course.load_data("sentiment")["train"].select(range(16))
    model, tokenizer = lora_bert()
    trained = runs.train(model, tokenizer, data, **RECIPE)
    after = torch.rand(3)

    again, _ = lora_bert()
    cached = runs.train(again, tokenizer, data, **{**RECIPE, "desc": "another name"})
    assert "read back from the course cache" in capsys.readouterr().out
    assert cached == trained and trained.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(trainable(model).values(),
                                                 trainable(again).values()))
    assert torch.equal(torch.rand(3), after), "the same random numbers come next"

    fresh, _ = lora_bert()
    key = runs.run_key(fresh, tokenizer, data, **RECIPE)
    assert runs.run_key(fresh, tokenizer, data, **{**RECIPE, "lr": 1e-3}) != key
    assert runs.run_key(fresh, tokenizer, data.select(range(8)), **RECIPE) != key
    assert runs.run_key(lora_bert(seed=1)[0], tokenizer, data, **RECIPE) != key   # other init
    torch.manual_seed(5)                          # dropout would draw other masks
    assert runs.run_key(fresh, tokenizer, data, **RECIPE) != key
    same, doubled = lora_bert()[0], lora_bert()[0]
    for module in doubled.modules():              # B = 0: the same tensors, another scaling
        if isinstance(getattr(module, "scaling", None), dict):      # LoRA layers
            module.scaling = {name: 2 * s for name, s in module.scaling.items()}
    keys = []
    for model in (fresh, same, doubled):
        torch.manual_seed(0)                      # the same generator state for all three
        keys.append(runs.run_key(model, tokenizer, data, **RECIPE))
    assert keys[0] == keys[1] != keys[2]


def test_predictions_are_read_back_for_the_same_weights_only_saved_or_not(monkeypatch, tmp_path):
    from minipeft.course import evaluation

    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    rows = course.load_data("sentiment")["test"].select(range(12))
    model, tokenizer = lora_bert()
    model.train()
    first = runs.predict(model, tokenizer, rows)
    assert model.training, "the model's mode is restored"
    assert len(list((tmp_path / "predictions").iterdir())) == 1
    monkeypatch.setattr(evaluation, "predict", lambda *a, **k: 1 / 0)   # a hit computes nothing
    model.save_pretrained(tmp_path / "saved")       # rewrites config.architectures, no weight
    again = runs.predict(model.eval(), tokenizer, rows)
    assert torch.equal(first.probabilities, again.probabilities)
    assert torch.equal(first.labels, again.labels)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(ZeroDivisionError):         # other weights: predicted again
        runs.predict(model, tokenizer, rows)
