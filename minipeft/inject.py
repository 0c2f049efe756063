"""What every minipeft method does to a model, whatever it adds: find the modules a config names,
put a wrapper in their place, keep a trainable copy of whole modules (`modules_to_save`), check
loaded weights against the model, and collect an adapter's weights.

A method (LoRA today) defines its layers and its `add_<method>` function; this module holds the
model surgery they all share, so that each method file reads as the method alone.

- `matches`                   peft's rule for `target_modules` and `modules_to_save` names
- `replace_module`            put a wrapper where a module was
- `ModulesToSave`             a frozen module plus one trainable copy per adapter (a new head)
- `adapter_state_dict`        one adapter's weights, keyed as in peft's files
- `saved_shapes`, `finish_adding`   what every `add_<method>` checks and does once its own layers
                              are in: modules_to_save, the config, freezing, activating, weights
- `set_active_adapter`, `disable_adapters`   switch adapters, or run the base model, for any method
- `check_adapter_name`, `check_weights`, `last_names`   validation, and the names errors suggest

A model's adapter configs live in `model.minipeft_configs` (adapter name -> config); every layer a
method adds has `adapter_state_dict(name)`, `set_active(name)` and `active_adapter`. That is all
`minipeft.adapter_io` and the switching below need.
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

CONFIGS_ATTR = "minipeft_configs"  # model attribute: adapter name -> config, for every method
ALL_LINEAR = "all-linear"  # peft's target_modules shorthand: every linear layer but the head


def matches(name: str, patterns: str | list[str]) -> bool:
    """peft's rule: a str is a regex that must match all of `name`; a list entry matches `name` or a
    `.name` tail.
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` where the module at `path` (e.g. "bert.encoder.layer.0.attention.self.query")
    was; returns `new`."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)
    return new


class ModulesToSave(nn.Module):
    """A frozen module plus one trainable copy per adapter; the active adapter's copy runs.

    A copy rather than training the original in place, so that every adapter keeps its own head and
    disabling adapters gives back the untouched base model.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def forward(self, *args, **kwargs):
        module = self.modules_to_save[self.active_adapter] \
            if self.active_adapter in self.modules_to_save else self.original_module
        return module(*args, **kwargs)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s copy, keyed like the original module (peft saves
        `classifier.weight`).
        """
        return self.modules_to_save[name].state_dict() if name in self.modules_to_save else {}

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key == name)


def unwrapped_saved(module: nn.Module) -> nn.Module:
    """The model's own module inside a ModulesToSave (or the module itself)."""
    return module.original_module if isinstance(module, ModulesToSave) else module


def saved_shapes(to_save: list[tuple[str, nn.Module]]) -> dict[str, tuple[int, ...]]:
    """The keys and shapes an adapter's weights must have for its modules_to_save."""
    return {f"{path}.{key}": tuple(t.shape) for path, m in to_save
            for key, t in unwrapped_saved(m).state_dict().items()}


def finish_adding(model: nn.Module, adapter_name: str, config: object,
                  to_save: list[tuple[str, nn.Module]],
                  weights: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """The end of every `add_<method>`, once the method's own layers are in: trainable copies of
    `to_save`, the config recorded, everything frozen, `adapter_name` made active (so that only it
    trains), and `weights` (already checked) copied in."""
    for path, module in to_save:
        wrapper = (module if isinstance(module, ModulesToSave)
                   else replace_module(model, path, ModulesToSave(module)))
        wrapper.add_adapter(adapter_name)
    setattr(model, CONFIGS_ATTR, getattr(model, CONFIGS_ATTR, {}) | {adapter_name: config})
    model.requires_grad_(False)
    for layer in adapter_layers(model):
        layer.set_active(adapter_name)
    if weights is not None:
        with torch.no_grad():
            for key, tensor in adapter_state_dict(model, adapter_name).items():
                tensor.copy_(weights[key])
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The weights of adapter `adapter_name` only, keyed `<module path>.<key>` as in peft's saved
    files.

    Works for any minipeft method: it collects `adapter_state_dict(name)` from every layer that has
    one. The tensors are the live parameters, not copies.
    """
    return {f"{path}.{key}": tensor
            for path, module in model.named_modules() if hasattr(module, "adapter_state_dict")
            for key, tensor in module.adapter_state_dict(adapter_name).items()}


def check_adapter_name(name: str, configs: Mapping[str, object]) -> None:
    """Refuse a name that cannot be an adapter's, or that the model's adapters already use."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter_name={name!r} is not usable: it becomes a key of nn.ModuleDict, "
                         "so it must be a non-empty string without '.' that is not a ModuleDict "
                         "method name. Try 'default' or a task name like 'sst2'.")
    if name in configs:
        raise ValueError(f"This model already has an adapter named {name!r} (adapters: "
                         f"{sorted(configs)}). Pass another adapter_name, or start again from a "
                         "fresh base model.")


def check_weights(weights: Mapping[str, torch.Tensor],
                  expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse loaded `weights` unless they have exactly the `expected` keys and shapes."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} is {tuple(weights[k].shape)} in the weights but {expected[k]} here"
             for k in sorted(set(expected) & set(weights))
             if tuple(weights[k].shape) != tuple(expected[k])]
    problems = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError("The adapter weights do not fit this model (" + "; ".join(problems)
                         + "). Load an adapter into the base model (architecture and size) it was "
                         "trained on, with the same config.")


def last_names(named_modules: Iterable[tuple[str, object]]) -> str:
    """'a, b, c': the distinct last parts of the names (which are what a target_modules list
    matches).
    """
    last = {name.rsplit(".", 1)[-1] for name, _ in named_modules}
    return ", ".join(sorted(n for n in last if n and not n.isdigit()))


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """Every layer a minipeft method added to `model` (those with `set_active`); raises if none."""
    layers = [m for m in model.modules() if hasattr(m, "set_active")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no minipeft adapter. Add one first, e.g. "
                         "add_lora(model, config) or add_adapters(model, config).")
    return layers


def check_not_merged(model: nn.Module, action: str) -> None:
    """Refuse `action` while a (LoRA) adapter is merged into the base weights."""
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError(f"Cannot {action} while an adapter is merged into the base weights. "
                         "Call unmerge_lora(model) first.")


def set_active_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the adapter that runs and trains; the others stay in the model,
    frozen.
    """
    configs = getattr(model, CONFIGS_ATTR, {})
    if adapter_name not in configs:
        raise ValueError(f"set_active_adapter: no adapter named {adapter_name!r}; this model has "
                         f"{sorted(configs)}. Add it first (add_lora, add_adapters, ... with "
                         f"adapter_name={adapter_name!r}).")
    check_not_merged(model, "switch adapters")
    for layer in adapter_layers(model):
        layer.set_active(adapter_name)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapters(model):` runs the base model: no adapter of any method, the original
    modules_to_save. requires_grad is left alone: only what forward computes changes."""
    layers = adapter_layers(model)
    check_not_merged(model, "disable adapters")
    previous = [layer.active_adapter for layer in layers]
    for layer in layers:
        layer.active_adapter = None
    try:
        yield model
    finally:
        for layer, name in zip(layers, previous):
            layer.active_adapter = name
