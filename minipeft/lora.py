"""LoRA: Low-Rank Adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

A pretrained weight W0 (out x in) stays frozen; the update is learned as a product of two thin
matrices B (out x r) and A (r x in) with r << min(in, out):

    h = W0 x + (alpha / r) B A x        (paper, eq. 3 with the alpha / r scaling of §4.1)

rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead, so that larger ranks keep learning.
A starts random and B starts at zero, so B A = 0 and a fresh adapter leaves the model unchanged.
After training, W = W0 + (alpha / r) B A can be merged into the base weight: no extra cost at
inference.

The pieces:

- `LoraConfig`     what to adapt and how (validated when built)
- `LoraLinear`     an nn.Linear (or a 4-bit `quant.Linear4bit`: QLoRA, see minipeft.qlora) plus
                   any number of named (A, B) pairs, one of them active
- `add_lora`       wrap the targeted Linear layers of any model in place, freeze everything else
- `merge_lora` / `unmerge_lora`, `set_active_adapter`, `disable_lora`

Module names and state-dict keys follow peft's (`<path>.base_layer`,
`<path>.lora_A.<adapter>.weight`, `<path>.modules_to_save.<adapter>.weight`), so the two can be
compared side by side. The model surgery every method shares (matching names, replacing modules,
`modules_to_save`, collecting an adapter's weights) is in `minipeft.inject`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

import torch
from torch import nn

from minipeft.inject import (ALL_LINEAR, CONFIGS_ATTR, ModulesToSave, check_adapter_name,
                             check_not_merged, check_weights, disable_adapters, finish_adding,
                             last_names, matches, replace_module, saved_shapes,
                             set_active_adapter, unwrapped_saved)
from minipeft.quant import Linear4bit

@dataclass
class LoraConfig:
    """What LoRA adapts and how. Defaults are peft's (r=8, lora_alpha=8, lora_dropout=0).

    target_modules: a str is a regex that must match a module's full name (`re.fullmatch`); a list
        matches modules whose full name equals an entry or ends with "." + entry ("query" matches
        "bert.encoder.layer.0.attention.self.query"). Matched modules must be nn.Linear.
        "all-linear" (as in peft, QLoRA's choice) names every linear layer but the output head:
        add_lora replaces it by the list of their full names, which adapter files record.
    modules_to_save: modules trained in full next to LoRA (e.g. ["classifier"], a freshly
        initialised head), matched like a target_modules list. Each adapter gets its own trainable
        copy.
    """
    target_modules: str | list[str]
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1 (the rank of B A), "
                             f"got r={self.r!r}. Typical values are 4 to 64.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not self.alpha > 0:
            raise ValueError(f"LoraConfig: alpha must be a number > 0 (the update is scaled by "
                             f"alpha / r), got alpha={self.alpha!r}. A common choice is alpha = r "
                             "or 2 * r.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got "
                             f"dropout={self.dropout!r}.")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig: use_rslora must be True or False, got "
                             f"{self.use_rslora!r}.")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"LoraConfig: target_modules={self.target_modules!r} is not a "
                                 f"valid regex ({e}). Pass a list of names instead, e.g. "
                                 "['query', 'value'].") from None
        else:
            self.target_modules = _name_list("target_modules", self.target_modules)
            if not self.target_modules:
                raise ValueError("LoraConfig: target_modules is empty. Name the Linear layers to "
                                 "adapt, e.g. target_modules=['query', 'value'] (BERT) or "
                                 "['q_proj', 'v_proj'] (Llama).")
        self.modules_to_save = _name_list("modules_to_save", self.modules_to_save or [])

    @property
    def scaling(self) -> float:
        """s in h = W0 x + s B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _name_list(what: str, names: object) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"LoraConfig: {what} must be a list of non-empty module names, "
                         f"got {names!r}.")
    return list(names)


class LoraLinear(nn.Module):
    """An nn.Linear (`base_layer`, frozen) plus named LoRA adapters, of which at most one is active.

    h = W0 x + s B A x, with A = lora_A[name].weight (r x in), B = lora_B[name].weight (out x r).
    The base may be a 4-bit `Linear4bit` (QLoRA): W0 x is then computed from its NF4 weight.
    """

    def __init__(self, base_layer: nn.Linear | Linear4bit) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None  # None: no adapter applies (disabled, or not in
                                                # this layer)
        self.merged = False                     # True: base_layer.weight holds W0 + s B A of the
                                                # active adapter
        self.four_bit: Linear4bit | None = None  # a 4-bit base, kept aside while merged

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype W0 x is computed in: the weight's, or a 4-bit layer's compute dtype."""
        base = self.base_layer
        return base.compute_dtype if isinstance(base, Linear4bit) else base.weight.dtype

    def add_adapter(self, name: str, config: LoraConfig, dtype: torch.dtype) -> None:
        """Create adapter `name`: A like nn.Linear's default init, B = 0, so B A = 0."""
        base = self.base_layer
        device = (base.weight_packed if isinstance(base, Linear4bit) else base.weight).device
        A = nn.Linear(self.base_layer.in_features, config.r, bias=False, device=device)
        B = nn.Linear(config.r, self.base_layer.out_features, bias=False, device=device)
        # nn.Linear's constructor already drew this init; drawing it again (as peft and loralib do)
        # keeps the random stream the same as peft's, so one seed gives the same A in both.
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)
        self.lora_A[name] = A.to(dtype)
        self.lora_B[name] = B.to(dtype)
        # Identity rather than Dropout(0): one module call less per forward.
        self.lora_dropout[name] = (nn.Dropout(config.dropout) if config.dropout > 0
                                   else nn.Identity())
        self.scaling[name] = config.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # W0 x + b; once merged, W0 already holds W0 + s B A
        name = self.active_adapter
        if self.merged or name not in self.lora_A:
            return result
        A, B = self.lora_A[name], self.lora_B[name]
        # fp16/bf16 base with fp32 adapter: the LoRA branch runs in the adapter's dtype, the sum in
        # the wider one.
        lora = B(A(self.lora_dropout[name](x.to(A.weight.dtype))))
        scaling = self.scaling[name]
        return (result + scaling * lora).to(result.dtype)  # h = W0 x + s B A x

    def delta_weight(self, name: str) -> torch.Tensor:
        """s B A for adapter `name`, in the base's dtype."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        # Multiply in at least fp32: fp16/bf16 matmuls lose precision (and are slow on CPU).
        wide = torch.promote_types(A.dtype, torch.float32)
        delta = (B.to(wide) @ A.to(wide)) * self.scaling[name]  # ΔW = s B A
        return delta.to(self.base_dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W = W0 + s B A. A 4-bit base is merged into a copy in its compute dtype (W0 dequantised):
        re-quantising W0 + s B A to NF4 would round most of s B A away, since a trained update is
        usually far smaller than one NF4 step. The 4-bit layer is kept for `unmerge`."""
        if self.active_adapter in self.lora_A:
            if isinstance(self.base_layer, Linear4bit):
                self.four_bit = self.base_layer
                self.base_layer = self.four_bit.to_linear()
            self.base_layer.weight += self.delta_weight(self.active_adapter)  # W = W0 + s B A
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.four_bit is not None:                    # the 4-bit W0, exactly as it was
            self.base_layer, self.four_bit = self.four_bit, None
        elif self.active_adapter in self.lora_A:
            self.base_layer.weight -= self.delta_weight(self.active_adapter)  # W0 = W - s B A
        self.merged = False

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s weights, keyed as in peft's files (`lora_A.weight`, `lora_B.weight`)."""
        if name not in self.lora_A:
            return {}
        return {"lora_A.weight": self.lora_A[name].weight,
                "lora_B.weight": self.lora_B[name].weight}

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name
        for adapters in (self.lora_A, self.lora_B):
            for key, module in adapters.items():
                module.requires_grad_(key == name)


_ADAPTER_LAYERS = (LoraLinear, ModulesToSave)
LINEAR = (nn.Linear, Linear4bit, LoraLinear)   # what LoRA can wrap (or has wrapped)


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default", *,
             weights: Mapping[str, torch.Tensor] | None = None,
             autocast_adapter_dtype: bool = True) -> nn.Module:
    """Add LoRA adapter `adapter_name` to `model` in place, make it the active one, and return
    `model`.

    Targeted nn.Linear layers become `LoraLinear`s (a layer already wrapped gets one more adapter),
    modules in `config.modules_to_save` get a trainable copy, and every other parameter is frozen;
    only the active adapter trains. `weights` (keys as `adapter_state_dict` gives them) replace the
    fresh init.
    With `autocast_adapter_dtype` (peft's default), adapters of fp16/bf16 layers are kept in fp32:
    small, and optimizer steps of ~1e-4 relative size would round away in fp16; otherwise they take
    the layer's dtype.
    Everything is checked before the model is touched: a ValueError leaves it as it was.
    """
    configs = getattr(model, CONFIGS_ATTR, {})
    check_adapter_name(adapter_name, configs)
    check_not_merged(model, "add an adapter")
    config = _with_all_linear_named(model, config)
    targets, to_save = _find_modules(model, config)
    if weights is not None:
        expected = {f"{path}.{key}": shape for path, m in targets
                    for key, shape in (("lora_A.weight", (config.r, _unwrapped(m).in_features)),
                                       ("lora_B.weight", (_unwrapped(m).out_features, config.r)))}
        check_weights(weights, expected | saved_shapes(to_save))

    # Everything is validated; nothing below can fail on user input.
    for path, module in targets:
        layer = (module if isinstance(module, LoraLinear)
                 else replace_module(model, path, LoraLinear(module)))
        dtype = layer.base_dtype
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        layer.add_adapter(adapter_name, config, dtype)
    return finish_adding(model, adapter_name, config, to_save, weights)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights, W = W0 + s B A; forward then skips the LoRA
    branch.
    """
    layers = _lora_layers(model)
    check_not_merged(model, "merge")
    if layers[0].active_adapter is None:
        raise ValueError("merge_lora: adapters are disabled here (inside disable_lora); merge "
                         "outside that block.")
    for layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: W0 = W - s B A (exact up to floating-point rounding)."""
    layers = _lora_layers(model)
    if not layers[0].merged:
        raise ValueError("unmerge_lora: the model is not merged, so there is nothing to unmerge. "
                         "Call merge_lora(model) first.")
    for layer in layers:
        layer.unmerge()
    return model


# Switching and disabling work the same for every method (minipeft.inject); peft calls the
# context manager `disable_adapter`, the lessons `disable_lora`.
disable_lora = disable_adapters
__all__ = ["LoraConfig", "LoraLinear", "add_lora", "merge_lora", "unmerge_lora",
           "set_active_adapter", "disable_lora"]


def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter. "
                         "Call add_lora(model, config) first.")
    return layers


def _named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the insides of adapter layers (their `base_layer`,
    `lora_A.default`, ...).
    """
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, _ADAPTER_LAYERS):
            inside.append(name + ".")
        yield name, module


def _with_all_linear_named(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """`config` with target_modules="all-linear" replaced by the full names of every linear
    layer but the output head, as peft records them."""
    if config.target_modules != ALL_LINEAR:
        return config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = sorted(name for name, m in _named_base_modules(model)
                   if isinstance(m, LINEAR) and _unwrapped(m) is not head)
    if not names:
        raise ValueError(f"target_modules='all-linear': {type(model).__name__} has no linear "
                         "layer besides its output head.")
    return replace(config, target_modules=names)


def _find_modules(model: nn.Module, config: LoraConfig) -> tuple[list[tuple[str, nn.Module]],
                                                                 list[tuple[str, nn.Module]]]:
    """The (path, module) pairs to wrap with LoRA and to save; raises if the config does not fit
    the model.
    """
    modules = list(_named_base_modules(model))
    to_save: list[tuple[str, nn.Module]] = []
    for name, module in modules:
        if matches(name, config.modules_to_save) \
                and not any(name.startswith(p + ".") for p, _ in to_save):
            if isinstance(module, LoraLinear):
                raise ValueError(f"modules_to_save matched {name!r}, which already has LoRA "
                                 f"adapters {sorted(module.lora_A)}. A module is either adapted "
                                 "by LoRA or saved whole, not both; remove it from one of the "
                                 "two lists.")
            to_save.append((name, module))
    if config.modules_to_save and not to_save:
        raise ValueError(f"modules_to_save={config.modules_to_save} matched no module of "
                         f"{type(model).__name__}. Its modules' names end in: "
                         f"{last_names(modules)}.")

    # Like peft, a module being saved whole is never also a LoRA target.
    saved = tuple(p for p, _ in to_save)
    targets = [(name, module) for name, module in modules
               if matches(name, config.target_modules)
               and not any(name == p or name.startswith(p + ".") for p in saved)]
    linear_names = last_names((n, m) for n, m in modules if isinstance(m, LINEAR))
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of "
                         f"{type(model).__name__}{' outside modules_to_save' if saved else ''}. "
                         f"Its nn.Linear layers' names end in: {linear_names}. Use some of those "
                         "(a list entry matches the end of a name after a '.'), or a regex string "
                         "that matches whole names.")
    for name, module in targets:
        if not isinstance(module, LINEAR):
            raise ValueError(f"target_modules={config.target_modules!r} matched {name!r}, a "
                             f"{type(module).__name__}, but LoRA here wraps nn.Linear (and 4-bit "
                             "Linear4bit) layers only. "
                             "Narrow target_modules to Linear layers; this model's end in: "
                             f"{linear_names}.")
    return targets, to_save


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model's own module inside an adapter layer."""
    return module.base_layer if isinstance(module, LoraLinear) else unwrapped_saved(module)
