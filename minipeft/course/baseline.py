"""Lesson 1's full fine-tuning, the baseline later lessons compare against.

Lesson 1 trains the course "bert" in full and keeps the result (`remember`); lessons 2 and 3 ask
for it (`full_finetuning`) instead of training it again. What they get is lesson 1's run: loaded
from the course cache when lesson 1 has run on this machine, or trained on the spot with lesson
1's code, recipe and seeds when not (a minute on 2 CPU cores). Either way the numbers are the ones
this machine produces: the cache key holds everything the run depends on (profile, seed, recipe,
library versions, device, and the source of the course's data and training loop), so a change to
any of them means training again, not reading a stale result.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from minipeft import course
from minipeft.course import data as course_data
from minipeft.course import training

RECIPE = dict(epochs=1, batch_size=32, lr=5e-5, eval_every=20)   # lesson 1, section 6


def train_size(settings: course.Settings) -> int:
    """Lesson 1's training sentences: 1,280 offline (40 steps of 32), 20,000 of SST-2 in the full
    profile."""
    return 1280 if settings.offline else 20000


@dataclass
class Baseline:
    model: nn.Module
    tokenizer: object
    result: training.TrainResult
    test_accuracy: float
    from_cache: bool


def _folder(settings: course.Settings) -> Path:
    import transformers

    key = json.dumps({
        "profile": settings.profile, "seed": settings.seed, "recipe": RECIPE,
        "train_size": train_size(settings), "device": settings.device.type,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "code": [inspect.getsource(m) for m in (course_data, training)],
    }, sort_keys=True)
    return course.cache_dir() / "full-finetuning" / hashlib.sha256(key.encode()).hexdigest()[:16]


def remember(model: nn.Module, result: training.TrainResult, test_accuracy: float,
             settings: course.Settings | None = None) -> None:
    """Keep lesson 1's trained model and its figures in the course cache."""
    from safetensors.torch import save_model

    from minipeft.course.runs import write_whole

    folder = _folder(settings or course.settings())
    folder.mkdir(parents=True, exist_ok=True)
    write_whole(folder / "model.safetensors", lambda f: save_model(model, str(f)))
    write_whole(folder / "result.json", lambda f: f.write_text(json.dumps(   # last: complete
        {"result": asdict(result), "test_accuracy": test_accuracy})))


def full_finetuning(settings: course.Settings | None = None) -> Baseline:
    """Lesson 1's fine-tuned model and figures: from the cache, or trained now (and kept)."""
    from safetensors.torch import load_model

    settings = settings or course.settings()
    folder = _folder(settings)
    course.seed_everything(settings.seed)           # as in lesson 1: the same new classifier head
    model, tokenizer = course.load_model("bert", num_labels=2)
    model = model.to(settings.device)
    if (folder / "result.json").exists():
        load_model(model, str(folder / "model.safetensors"), device=str(settings.device))
        saved = json.loads((folder / "result.json").read_text())
        result = training.TrainResult(**saved["result"])
        result.val_accuracy = [tuple(point) for point in result.val_accuracy]
        baseline = Baseline(model, tokenizer, result, saved["test_accuracy"], from_cache=True)
    else:
        data = course.load_data("sentiment")
        course.seed_everything(settings.seed)
        result = training.train(model, tokenizer,
                                data["train"].select(range(train_size(settings))),
                                eval_data=data["validation"], desc="full fine-tuning", **RECIPE)
        test_accuracy = training.evaluate(model, tokenizer, data["test"])
        remember(model, result, test_accuracy, settings)
        baseline = Baseline(model, tokenizer, result, test_accuracy, from_cache=False)
    course.seed_everything(settings.seed)   # what runs next draws the same numbers either way
    return baseline
