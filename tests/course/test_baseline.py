"""minipeft.course.baseline: lesson 1's run, trained once and then read from the course cache with
the same weights and figures, and the same random numbers afterwards."""
import torch

from minipeft import course
from minipeft.course import baseline


def test_trained_once_then_read_back_the_same(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(baseline, "RECIPE", dict(epochs=1, batch_size=16, lr=5e-5, eval_every=2))
    monkeypatch.setattr(baseline, "train_size", lambda settings: 32)
    load_data = course.load_data               # 16 validation and test sentences: quick to score
    monkeypatch.setattr(course, "load_data", lambda name: {
        split: rows.select(range(32 if split == "train" else 16))
        for split, rows in load_data(name).items()})
    settings = course.setup(lesson=3)
    trained = baseline.full_finetuning(settings)
    after_training = torch.rand(3)
    cached = baseline.full_finetuning(settings)
    assert (trained.from_cache, cached.from_cache) == (False, True)
    assert torch.equal(torch.rand(3), after_training), "the same random numbers come next"
    assert cached.result == trained.result and cached.test_accuracy == trained.test_accuracy
    assert trained.result.steps == 2 and len(trained.result.val_accuracy) == 2   # steps 0 and 2
    for (name, a), b in zip(trained.model.state_dict().items(), cached.model.state_dict().values()):
        assert torch.equal(a, b), name
    pretrained, _ = course.load_model("bert", num_labels=2)
    assert not torch.equal(pretrained.bert.pooler.dense.weight,
                           cached.model.bert.pooler.dense.weight)


def test_another_seed_is_another_run(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    first, other = course.setup(lesson=3, seed=0), course.setup(lesson=3, seed=1)
    assert baseline._folder(first) != baseline._folder(other)
    assert baseline._folder(first).parent == tmp_path / "full-finetuning"
