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
from typing import Any, Callable

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
    if config is not None:          # less `architectures`, which save_pretrained rewrites
        fields = json.loads(config.to_json_string(use_diff=False))
        fields.pop("architectures", None)       # (the class is keyed above)
        digest.update(json.dumps(fields, sort_keys=True).encode())
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


def _key(model: nn.Module, tokenizer, rows: list, **settings: Any) -> str:
    """The cache key of what `model` (as it is now) computes on `rows` (data sets, or None) with
    `settings`: the tokenizer, the code and the machine included."""
    import transformers

    digest = hashlib.sha256()
    _model_digest(model, digest)
    digest.update(f"{type(tokenizer).__name__}|{len(tokenizer)}".encode())
    for dataset in rows:
        digest.update(json.dumps(None if dataset is None else dataset.to_dict(), sort_keys=True,
                                 default=str).encode())
    digest.update(json.dumps({**settings, "device": next(model.parameters()).device.type,
                              "torch": torch.__version__,
                              "transformers": transformers.__version__},
                             sort_keys=True, default=str).encode())
    _code_digest(digest)
    return digest.hexdigest()[:20]


def run_key(model: nn.Module, tokenizer, train_data, eval_data=None, **recipe) -> str:
    """The cache key of training `model` on `train_data` with `recipe` (training.train's
    keywords), from torch's random number generator's state as training would start."""
    rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    recipe = {k: v for k, v in recipe.items() if k not in UNKEYED}
    return _key(model, tokenizer, [train_data, eval_data], recipe=recipe, rng=rng)


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(a file beside path)`, then rename it to `path`: a reader never finds half a file."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def train(model: nn.Module, tokenizer, train_data, *, eval_data=None,
          **recipe) -> training.TrainResult:
    """`training.train(model, tokenizer, train_data, ...)`, or the identical run read back from the
    course cache (see the module's docstring). Trains `model` in place either way."""
    from safetensors.torch import load_file, save_file

    folder = course.cache_dir() / "runs" / run_key(model, tokenizer, train_data, eval_data,
                                                   **recipe)
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
    write_whole(folder / "trained.safetensors", lambda f: save_file(state, str(f)))
    write_whole(folder / "result.json",            # last: its presence marks a complete run
                lambda f: f.write_text(json.dumps(asdict(result))))
    return result


def predict(model: nn.Module, tokenizer, dataset, batch_size: int = 64) -> Predictions:
    """`evaluation.predict(model, tokenizer, dataset)`, or the same predictions read back from the
    course cache: keyed like a run, by the model (its weights as they are now), the tokenizer, the
    rows, the code and the machine. Lesson 8 reads what lessons 4 and 5 predicted."""
    from safetensors.torch import load_file, save_file

    was_training = model.training
    model.eval()                      # the key is the same whatever mode the model was left in
    key = _key(model, tokenizer, [dataset], batch_size=batch_size)
    model.train(was_training)
    path = course.cache_dir() / "predictions" / f"{key}.safetensors"
    if path.exists():
        saved = load_file(str(path))
        return Predictions(saved["probabilities"], saved["labels"])
    predictions = evaluation.predict(model, tokenizer, dataset, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda f: save_file({"probabilities": predictions.probabilities,
                                           "labels": predictions.labels}, str(f)))
    return predictions
