import os

import pytest
import torch

from minipeft import course


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("MINIPEFT_PROFILE", "full")
    assert course.detect_profile() == "full"
    monkeypatch.setenv("MINIPEFT_PROFILE", "offline")
    assert course.detect_profile() == "offline"
    monkeypatch.setenv("MINIPEFT_PROFILE", "cloud")
    with pytest.raises(ValueError, match="offline.*full"):
        course.detect_profile()


def test_auto_profile_is_offline_without_hub(monkeypatch):
    monkeypatch.delenv("MINIPEFT_PROFILE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not course.hub_reachable()
    assert course.detect_profile() == "offline"


def test_setup_prints_banner_and_fixes_seeds(capsys):
    settings = course.setup(lesson=1, seed=3)
    out = capsys.readouterr().out
    assert "lesson 1" in out and "profile: offline" in out and "MiniLM" in out
    assert settings.offline and os.environ["HF_HUB_OFFLINE"] == "1"
    first = torch.rand(3)
    course.setup(lesson=1, seed=3)
    assert torch.equal(first, torch.rand(3))


def test_offline_model_is_local_and_pretrained(bert):
    model, tokenizer = bert
    assert os.path.isdir(course.model_source("bert", "offline"))
    assert course.model_source("bert", "full") == "bert-base-uncased"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tokenizer("Hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_random_init_differs_from_pretrained_and_is_seeded(bert):
    pretrained, _ = bert
    course.seed_everything(0)
    random_a, _ = course.load_model("bert", pretrained=False, profile="offline")
    course.seed_everything(0)
    random_b, _ = course.load_model("bert", pretrained=False, profile="offline")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    weights = [dict(m.named_parameters())[name] for m in (pretrained, random_a, random_b)]
    assert not torch.allclose(weights[0], weights[1])
    assert torch.equal(weights[1], weights[2])


def test_unknown_names_list_the_choices():
    with pytest.raises(KeyError, match="bert"):
        course.load_model("gpt-5")
    with pytest.raises(KeyError, match="sentiment"):
        course.load_data("imagenet")


def test_offline_data(monkeypatch):
    data = course.load_data("sentiment", profile="offline")
    assert set(data) == {"train", "validation", "test"}
    assert data["train"].column_names == ["text", "label"]
