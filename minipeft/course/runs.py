"""Training runs kept in the course cache: a lesson that trains exactly what an earlier lesson
trained reads that run back instead of training it again (lesson 5's LoRA row is lesson 4's run;
a lesson comparing every method can read them all).

`train` takes what `training.train` takes and returns the same `TrainResult`. Whether two runs
are the same is read from the objects, never from a name a caller could forget to change; the
cache key holds everything a run depends on:

- the model: its class, its config, every parameter and buffer (name, dtype, shape, whether it
  trains, and its bytes: the pretrained weights and the adapter's starting values), every
  module's plain settings (LoRA's scaling, dropout's p, a 4-bit layer's compute dtype, train or
  eval mode), and its tokenizer's class and vocabulary size;
- torch's random number generator as training starts (dropout draws from it);
- the data: the training rows (and the evaluation rows, if any);
- the recipe: every keyword argument of `training.train` except `desc` and `progress`;
- the code and the machine: the source of every minipeft module, the versions of torch and
  transformers, and the device.

A run found in the cache puts its trained parameters into the model, leaves the model in
training mode and torch's random number generator where training left them, and returns the
figures that run measured on this machine: what follows in a lesson computes the same either
way. Clear the cache (`MINIPEFT_CACHE`, or ~/.cache/minipeft) to measure again.

`predict` does the same for a trained model's predictions on a data set (`evaluation.predict`),
keyed by the model's weights as they are, the rows, the code and the machine.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import minipeft
from minipeft import course
from minipeft.course import evaluation, training
from minipeft.course.evaluation import Predictions

UNKEYED = ("desc", "progress")       # how a run is reported, not what it computes


def _is_plain(value: Any) -> bool:
    """A setting that prints the same in every process: numbers, strings, dtypes, and lists or
    dicts of them (not objects, whose default repr holds a memory address)."""
    if isinstance(value, (bool, int, float, str, torch.dtype, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _model_digest(model: nn.Module, digest: Any) -> None:
    digest.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, module in model.named_modules():
        settings = {k: v for k, v in vars(module).items()
                    if not k.startswith("_") and _is_plain(v)}
        digest.update(f"{name}|{type(module).__name__}|{sorted(settings.items())}".encode())
    tensors = [(name, t, t.requires_grad) for name, t in model.named_parameters()]
    tensors += [(name, t, False) for name, t in model.named_buffers()]
    for name, tensor, trains in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{trains}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1)      # 0-d tensors too
        digest.update(raw.view(torch.uint8).numpy().tobytes())


def _code_digest(digest: Any) -> None:
    package = Path(minipeft.__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())


def run_key(model: nn.Module, tokenizer, train_data, eval_data=None, **recipe) -> str:
    """The cache key of training `model` on `train_data` with `recipe` (training.train's
    keywords)."""
    digest = hashlib.sha256()
    _model_digest(model, digest)
    digest.update(f"{type(tokenizer).__name__}|{len(tokenizer)}".encode())
    digest.update(torch.get_rng_state().numpy().tobytes())
    for rows in (train_data, eval_data):
        digest.update(json.dumps(None if rows is None else rows.to_dict(), sort_keys=True,
                                 default=str).encode())
    recipe = {k: v for k, v in recipe.items() if k not in UNKEYED}
    _setting_digest(digest, next(model.parameters()).device, recipe=recipe)
    return digest.hexdigest()[:20]


def _folder(key: str) -> Path:
    return course.cache_dir() / "runs" / key


def _setting_digest(digest: Any, device: torch.device, **settings: Any) -> None:
    """Settings, the machine and the code, into `digest`."""
    import transformers

    digest.update(json.dumps({**settings, "device": device.type, "torch": torch.__version__,
                              "transformers": transformers.__version__},
                             sort_keys=True, default=str).encode())
    _code_digest(digest)


def train(model: nn.Module, tokenizer, train_data, *, eval_data=None,
          **recipe) -> training.TrainResult:
    """`training.train(model, tokenizer, train_data, ...)`, or the identical run read back from the
    course cache (see the module's docstring). Trains `model` in place either way."""
    from safetensors.torch import load_file, save_file

    folder = _folder(run_key(model, tokenizer, train_data, eval_data, **recipe))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if (folder / "result.json").exists():
        saved = load_file(str(folder / "trained.safetensors"))
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved[name])
        torch.set_rng_state(saved["__rng_state__"])
        if "__cuda_rng_state__" in saved:
            torch.cuda.set_rng_state(saved["__cuda_rng_state__"])
        model.train()                                   # where training.train leaves it
        result = training.TrainResult(**json.loads((folder / "result.json").read_text()))
        result.val_accuracy = [tuple(point) for point in result.val_accuracy]
        final = f", final loss {result.losses[-1]:.3f}" if result.losses else ""
        print(f"{recipe.get('desc', 'training')}: {result.steps} steps{final} (measured in "
              f"{result.seconds:.1f} s by an identical earlier run, read back from the course "
              "cache)")
        return result
    result = training.train(model, tokenizer, train_data, eval_data=eval_data, **recipe)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().cpu().contiguous() for name, p in trainable.items()}
    state["__rng_state__"] = torch.get_rng_state()      # dropout drew from it while training
    if next(model.parameters()).device.type == "cuda":
        state["__cuda_rng_state__"] = torch.cuda.get_rng_state()
    save_file(state, str(folder / "trained.safetensors"))
    partial = folder / "result.json.partial"       # result.json appears whole, last
    partial.write_text(json.dumps(asdict(result)))
    os.replace(partial, folder / "result.json")
    return result


def predict(model: nn.Module, tokenizer, dataset, batch_size: int = 64) -> Predictions:
    """`evaluation.predict(model, tokenizer, dataset)`, or the same predictions read back from the
    course cache: keyed like a run, by the model (its weights as they are now), the tokenizer, the
    rows, the code and the machine. Lesson 8 reads what lessons 4 and 5 predicted."""
    from safetensors.torch import load_file, save_file

    was_training = model.training
    model.eval()                      # the key is the same whatever mode the model was left in
    digest = hashlib.sha256()
    _model_digest(model, digest)
    digest.update(f"{type(tokenizer).__name__}|{len(tokenizer)}".encode())
    digest.update(json.dumps(dataset.to_dict(), sort_keys=True, default=str).encode())
    _setting_digest(digest, next(model.parameters()).device, batch_size=batch_size)
    path = course.cache_dir() / "predictions" / f"{digest.hexdigest()[:20]}.safetensors"
    model.train(was_training)
    if path.exists():
        saved = load_file(str(path))
        return Predictions(saved["probabilities"], saved["labels"])
    predictions = evaluation.predict(model, tokenizer, dataset, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")       # renamed when whole: never half a file
    save_file({"probabilities": predictions.probabilities, "labels": predictions.labels},
              str(partial))
    os.replace(partial, path)
    return predictions
