"""Saving and loading adapters: only the adapter's weights (safetensors) and its config (JSON).

An adapter is tiny next to its base model (LoRA r=8 on MiniLM: ~70 K numbers against 22 M), so it is
saved on its own and loaded into a fresh copy of the base model. A minipeft adapter is a folder:

    adapter.safetensors   the adapter's tensors, keyed `<module path>.<key>`
                          (see lora.adapter_state_dict)
    adapter.json          {"format": "minipeft-adapter", "method": "lora", "config": {...},
                           "base_model_class": ...}

`save_adapter` / `load_adapter` work for every method listed in `METHODS`: each needs a config
dataclass, layers with an `adapter_state_dict(name)` method, and an
`add_<method>(model, config, name, weights=...)` that checks the weights against the model before
touching it.

`export_peft` / `import_peft` translate LoRA, prompt-tuning and prefix-tuning adapters to and from
peft's folder (`adapter_config.json` + `adapter_model.safetensors`). LoRA's keys are ours behind a
`base_model.model.` prefix; prompt and prefix tuning's are `prompt_embeddings` (the virtual tokens,
or the prefixes) and, for modules_to_save, ours behind `base_model.`.

Only safetensors is read: a pickle (torch.load) can run arbitrary code, so `.bin` adapters are
refused.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minipeft.adapters import AdapterConfig, add_adapters
from minipeft.inject import CONFIGS_ATTR, adapter_state_dict, matches
from minipeft.lora import LoraConfig, add_lora
from minipeft.prompts import (PREFIX_ENCODER, PROMPT_ENCODER, PrefixTuningConfig,
                              PromptTuningConfig, add_prefix_tuning, add_prompt_tuning)

FORMAT = "minipeft-adapter"
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
# peft's keys are the model's, seen from PeftModel -> LoraModel -> model (LoRA), or from
# PeftModel -> model (prompt learning, whose prompt is the PeftModel's own `prompt_embeddings`)
PEFT_PREFIX = "base_model.model."
PEFT_PROMPT_PREFIX = "base_model."
PEFT_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM"}

# method name (as written in adapter.json) -> (config class, function that adds such an adapter
# to a model)
METHODS: dict[str, tuple[type, Callable[..., nn.Module]]] = {
    "lora": (LoraConfig, add_lora),
    "bottleneck": (AdapterConfig, add_adapters),
    "prompt_tuning": (PromptTuningConfig, add_prompt_tuning),
    "prefix_tuning": (PrefixTuningConfig, add_prefix_tuning),
}

# peft's prompt-learning methods: peft_type <-> (config class, the model attribute where minipeft
# keeps the tokens, the function that adds them)
PEFT_PROMPT_LEARNING: dict[str, tuple[type, str, Callable[..., nn.Module]]] = {
    "PROMPT_TUNING": (PromptTuningConfig, PROMPT_ENCODER, add_prompt_tuning),
    "PREFIX_TUNING": (PrefixTuningConfig, PREFIX_ENCODER, add_prefix_tuning),
}

# peft LoRA options minipeft does not implement: an adapter using any of them is refused, not
# half-loaded.
PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                    "layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters",
                    "trainable_token_indices", "layer_replication", "use_qalora", "use_bdlora",
                    "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config",
                    "kasa_config")


def model_class_name(model: nn.Module) -> str:
    """The model's class, as an adapter file records it. FSDP2's `fully_shard` gives a model a
    subclass of its own named FSDP<class>: the adapter belongs to the class underneath."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    return cls.__name__


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` of `model` to the folder `path` (created if needed); returns
    `path`.
    """
    config = _config(model, adapter_name)
    method = next(name for name, (cls, _) in METHODS.items() if isinstance(config, cls))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_detached(adapter_state_dict(model, adapter_name)), path / WEIGHTS_NAME)
    _write_json(path / CONFIG_NAME, {"format": FORMAT, "method": method, "config": asdict(config),
                                     "base_model_class": model_class_name(model)})
    return path


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved in folder `path` to `model` (in place, as `adapter_name`, made active);
    returns `model`.

    `model` must be the base model it was trained on; nothing is changed if anything does not match.
    """
    path = Path(path)
    if (path / PEFT_CONFIG_NAME).is_file() and not (path / CONFIG_NAME).exists():
        raise ValueError(f"{path} holds a peft adapter, not a minipeft one: "
                         f"use import_peft(model, {str(path)!r}).")
    meta = _read_json(path / CONFIG_NAME)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME} is not a minipeft adapter config (no \"format\": "
                         f"\"{FORMAT}\"). Pass the folder that save_adapter wrote.")
    if meta.get("method") not in METHODS:
        raise ValueError(f"{path / CONFIG_NAME}: unknown adapter method {meta.get('method')!r}; "
                         f"this minipeft knows {sorted(METHODS)}.")
    if meta.get("base_model_class") != model_class_name(model):
        raise ValueError(f"The adapter in {path} was trained on a {meta.get('base_model_class')}, "
                         f"but the model given is a {model_class_name(model)}. Load it into the "
                         "base model it was trained on.")
    config_cls, add = METHODS[meta["method"]]
    config = _build_config(config_cls, meta.get("config"), path / CONFIG_NAME)
    return add(model, config, adapter_name, weights=_read_safetensors(path / WEIGHTS_NAME))


def export_peft(model: nn.Module, out_dir: str | Path, adapter_name: str = "default",
                base_model_name_or_path: str | None = None) -> Path:
    """Write LoRA, prompt-tuning or prefix-tuning adapter `adapter_name` as a peft adapter folder
    that `PeftModel.from_pretrained(base, out_dir)` loads.

    `base_model_name_or_path` defaults to the model's own `name_or_path` (a hub id or local folder),
    as peft does.
    """
    config = _config(model, adapter_name)
    if isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
        return _export_prompt_learning(model, config, Path(out_dir), adapter_name,
                                       base_model_name_or_path)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"export_peft writes LoRA, prompt-tuning and prefix-tuning adapters; "
                         f"{adapter_name!r} is a {type(config).__name__}, which peft does not "
                         "have.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {PEFT_PREFIX + key: t
               for key, t in _detached(adapter_state_dict(model, adapter_name)).items()}
    save_file(weights, out_dir / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
    _write_json(out_dir / PEFT_CONFIG_NAME, {
        "peft_type": "LORA",
        # a plain PeftModel: classifier heads travel through modules_to_save, not task_type
        "task_type": None,
        "base_model_name_or_path": (base_model_name_or_path or getattr(model, "name_or_path", None)
                                    or None),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save or None,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    })
    return out_dir


def import_peft(model: nn.Module, in_dir: str | Path, adapter_name: str = "default") -> nn.Module:
    """Add the peft LoRA, prompt-tuning or prefix-tuning adapter saved in folder `in_dir` to
    `model` (in place, made active); returns `model`.
    """
    in_dir = Path(in_dir)
    if not (in_dir / PEFT_WEIGHTS_NAME).exists() and (in_dir / "adapter_model.bin").exists():
        raise ValueError(f"{in_dir} has only adapter_model.bin, a pickle, which minipeft never "
                         "loads (unpickling can run code). Re-save it with peft's "
                         "save_pretrained(dir, safe_serialization=True).")
    peft_config = _read_json(in_dir / PEFT_CONFIG_NAME)
    found = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
    if found is not None:
        _warn_if_another_base(model, peft_config.get("base_model_name_or_path"), in_dir)
    if found in PEFT_PROMPT_LEARNING:
        return _import_prompt_learning(model, in_dir, peft_config, adapter_name)
    if found != "LORA":
        raise ValueError(f"{in_dir / PEFT_CONFIG_NAME} is not a peft LoRA, prompt-tuning or "
                         f"prefix-tuning config (peft_type={found!r}); import_peft reads those.")
    unsupported = {k: peft_config[k] for k in PEFT_UNSUPPORTED
                   if peft_config.get(k) not in (None, False, {}, [])}
    if peft_config.get("bias", "none") != "none":
        unsupported["bias"] = peft_config["bias"]
    if peft_config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        # PiSSA, OLoRA, LoftQ, ... rewrite the base weights too, so the adapter alone is not enough.
        unsupported["init_lora_weights"] = peft_config["init_lora_weights"]
    if unsupported:
        raise ValueError(f"{in_dir} uses peft LoRA options minipeft does not implement: "
                         f"{unsupported}. Only plain LoRA / rsLoRA adapters can be imported.")
    config = _build_config(LoraConfig, {
        "r": peft_config.get("r", 8),
        "alpha": peft_config.get("lora_alpha", 8),
        "dropout": peft_config.get("lora_dropout", 0.0),
        "use_rslora": peft_config.get("use_rslora", False),
        "target_modules": peft_config.get("target_modules"),
        "modules_to_save": _existing_modules_to_save(model, peft_config),
    }, in_dir / PEFT_CONFIG_NAME)
    weights = _read_safetensors(in_dir / PEFT_WEIGHTS_NAME)
    outside = sorted(k for k in weights if not k.startswith(PEFT_PREFIX))
    if outside:
        raise ValueError(f"{in_dir / PEFT_WEIGHTS_NAME} has keys without peft's {PEFT_PREFIX!r} "
                         f"prefix, e.g. {outside[0]!r}; it was not written by peft's "
                         "save_pretrained.")
    return add_lora(model, config, adapter_name,
                    weights={k.removeprefix(PEFT_PREFIX): t for k, t in weights.items()})


def _warn_if_another_base(model: nn.Module, saved_base: str | None, in_dir: Path) -> None:
    """Keys and shapes catch an adapter for another architecture or size; a model of the same
    shapes (a base and its chat version) only differs by name, and a name can be a hub id or a
    folder: warn when the last parts of both names differ."""
    base = getattr(model, "name_or_path", None)
    if not (saved_base and base):
        return
    if Path(saved_base.rstrip("/")).name.lower() != Path(base.rstrip("/")).name.lower():
        warnings.warn(f"{in_dir} was saved from base model {saved_base!r}, but the model given "
                      f"was loaded from {base!r}. An adapter on another base than its own runs "
                      "but gives wrong outputs; if both names are the same model, ignore this.",
                      stacklevel=3)


def _export_prompt_learning(model: nn.Module, config: PromptTuningConfig | PrefixTuningConfig,
                            out_dir: Path, adapter_name: str,
                            base_model_name_or_path: str | None) -> Path:
    task_type = next((task for suffix, task in PEFT_TASK_TYPES.items()
                      if type(model).__name__.endswith(suffix)), None)
    if task_type is None:
        raise ValueError(f"export_peft: peft runs prompt and prefix tuning through a "
                         f"task-specific model; {type(model).__name__} is none of "
                         f"{sorted(PEFT_TASK_TYPES)}.")
    peft_type, encoder = next((peft_type, encoder) for peft_type, (cls, encoder, _)
                              in PEFT_PROMPT_LEARNING.items() if isinstance(config, cls))
    state = _detached(adapter_state_dict(model, adapter_name))
    weights = {("prompt_embeddings" if key == f"{encoder}.prompt_embeddings"
                else PEFT_PROMPT_PREFIX + key): t for key, t in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, out_dir / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
    model_config = getattr(model, "config", None)
    layers = getattr(model_config, "num_hidden_layers", None)
    if peft_type == "PREFIX_TUNING":     # one row per token: keys and values of every layer
        prefixes = getattr(model, PREFIX_ENCODER)
        method = {"token_dim": prefixes.heads * prefixes.head_dim,
                  "num_attention_heads": prefixes.heads,   # the key/value heads (GQA)
                  "prefix_projection": False,   # what is saved is the prefixes, MLP folded
                  "encoder_hidden_size": prefixes.heads * prefixes.head_dim}
    else:
        method = {"token_dim": weights["prompt_embeddings"].shape[1],
                  "num_attention_heads": getattr(model_config, "num_attention_heads", None),
                  "prompt_tuning_init": "RANDOM"}   # the weights are saved: how they began
    _write_json(out_dir / PEFT_CONFIG_NAME, {
        "peft_type": peft_type,
        "task_type": task_type,
        "base_model_name_or_path": (base_model_name_or_path or getattr(model, "name_or_path", None)
                                    or None),
        "num_virtual_tokens": config.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": layers,
        **method,
        "modules_to_save": config.modules_to_save or None,
        "inference_mode": True,
    })
    return out_dir


def _import_prompt_learning(model: nn.Module, in_dir: Path, peft_config: dict[str, Any],
                            adapter_name: str) -> nn.Module:
    if peft_config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{in_dir} prompts {peft_config['num_transformer_submodules']} "
                         "submodules (an encoder-decoder model); minipeft's prompt and prefix "
                         "tuning prompt one.")
    config_cls, encoder, add = PEFT_PROMPT_LEARNING[peft_config["peft_type"]]
    # peft saves a prefix adapter's prefixes (its MLP's output): they load as they are
    config = _build_config(config_cls, {
        "num_virtual_tokens": peft_config.get("num_virtual_tokens"),
        "modules_to_save": list(dict.fromkeys(_existing_modules_to_save(model, peft_config))),
    }, in_dir / PEFT_CONFIG_NAME)
    weights = _read_safetensors(in_dir / PEFT_WEIGHTS_NAME)
    outside = sorted(k for k in weights
                     if k != "prompt_embeddings" and not k.startswith(PEFT_PROMPT_PREFIX))
    if outside or "prompt_embeddings" not in weights:
        raise ValueError(f"{in_dir / PEFT_WEIGHTS_NAME} is not a peft prompt- or prefix-tuning "
                         "adapter (it needs `prompt_embeddings`, and modules_to_save keys behind "
                         f"{PEFT_PROMPT_PREFIX!r}); it was not written by peft's save_pretrained.")
    return add(model, config, adapter_name, weights={
        (f"{encoder}.prompt_embeddings" if key == "prompt_embeddings"
         else key.removeprefix(PEFT_PROMPT_PREFIX)): t for key, t in weights.items()})


def _existing_modules_to_save(model: nn.Module, peft_config: dict[str, Any]) -> list[str]:
    """peft's modules_to_save, less the heads peft adds by itself for a task_type that this model
    lacks.

    With task_type "SEQ_CLS" peft saves modules_to_save=["classifier", "score"] for any model,
    though each model has only one of the two heads.
    """
    names = peft_config.get("modules_to_save") or []
    if not peft_config.get("task_type"):
        return names
    module_names = [name for name, _ in model.named_modules()]
    return [n for n in names if any(matches(m, [n]) for m in module_names)]


def _config(model: nn.Module, adapter_name: str) -> Any:
    configs = getattr(model, CONFIGS_ATTR, {})
    if adapter_name not in configs:
        raise ValueError(f"{type(model).__name__} has no adapter named {adapter_name!r} "
                         f"(it has {sorted(configs) or 'none'}).")
    return configs[adapter_name]


def _build_config(config_cls: type, fields: Any, source: Path) -> Any:
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} does not hold a valid {config_cls.__name__}: {e}") from e


def _detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants plain contiguous tensors, not parameters that share storage with the live
    # model.
    return {k: t.detach().contiguous() for k, t in state.items()}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the folder an adapter was saved to.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON adapter config ({e}).") from e


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the adapter folder is missing its "
                                "weights.")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e}); adapters are read from "
                         "safetensors only.") from e
