"""Soft prompts: prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

The model stays frozen; what trains is n "virtual tokens": n vectors P (n x d) in the model's
embedding space, put in front of every input's token embeddings E(x). The model reads them as
words it has never seen, and training finds the words that steer it:

    inputs_embeds = [P ; E(x)]                (Lester et al., §2: prepend the prompt)
    attention_mask = [1 ... 1 ; mask]         every input attends to the prompt
    labels = [-100 ... -100 ; labels]         a causal LM is not scored on the prompt
    token_type_ids = [0 ... 0 ; types]        BERT's segment ids for the prompt

This is what peft's prompt tuning computes, and the tests compare the two. The prompt goes in
through a forward pre-hook on the model, which rewrites its keyword arguments; the model's own
code is not touched, and `model(**batch)` works as before.

Initialisation (`init`): "random" (N(0, 1), as nn.Embedding draws it), "vocab" (rows of the
embedding matrix for random vocabulary tokens), or "text" (the embeddings of `init_text`,
repeated or cut to n tokens; Lester et al. found vocabulary-based inits train better than random
ones on small models).

Not yet: `generate()` (the pre-hook would add the prompt again at every step; it is refused with
an error rather than decoded wrongly) and prefix tuning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import nn

from minipeft.inject import (CONFIGS_ATTR, check_adapter_name, check_not_merged, check_weights,
                             finish_adding, matches, saved_shapes)

Init = Literal["random", "vocab", "text"]
ENCODER = "prompt_encoder"   # the model attribute that holds the prompts
IGNORE_INDEX = -100          # labels a loss skips


@dataclass
class PromptTuningConfig:
    """num_virtual_tokens: the prompt's length n. init: "random", "vocab" or "text" (then
    `init_text` is the text whose token embeddings start the prompt). modules_to_save: modules
    trained in full next to the prompt (e.g. ["classifier"])."""
    num_virtual_tokens: int = 20
    init: Init = "random"
    init_text: str = ""
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"PromptTuningConfig: num_virtual_tokens must be an integer >= 1, "
                             f"got {n!r}. Lester et al. used 1 to 150; 20 is a common start.")
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"PromptTuningConfig: init must be 'random', 'vocab' or 'text', got "
                             f"{self.init!r}.")
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("PromptTuningConfig: init='text' needs init_text, e.g. "
                             "init_text='Classify the sentiment of this review:'.")
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"PromptTuningConfig: modules_to_save must be a list of module names, "
                             f"got {self.modules_to_save!r}.")
        self.modules_to_save = list(self.modules_to_save)


class PromptEncoder(nn.Module):
    """The virtual tokens of each named prompt, of which at most one is active."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ParameterDict()
        self.active_adapter: str | None = None

    def active(self) -> nn.Parameter | None:
        return self.prompts[self.active_adapter] if self.active_adapter in self.prompts else None

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """peft saves a prompt-tuning adapter as one tensor, `prompt_embeddings` (n x d)."""
        return {"prompt_embeddings": self.prompts[name]} if name in self.prompts else {}

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name
        for key, prompt in self.prompts.items():
            prompt.requires_grad_(key == name)


def _initial_prompt(model: nn.Module, config: PromptTuningConfig, tokenizer: Any) -> torch.Tensor:
    embedding = model.get_input_embeddings().weight.detach()
    n = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(n, embedding.shape[1]).to(embedding)
    if config.init == "vocab":
        return embedding[torch.randint(0, embedding.shape[0], (n,))].clone()
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    ids = (ids * (n // len(ids) + 1))[:n]                   # repeated, then cut to n tokens
    return embedding[torch.tensor(ids, device=embedding.device)].clone()


def add_prompt_tuning(model: nn.Module, config: PromptTuningConfig,
                      adapter_name: str = "default", *, tokenizer: Any = None,
                      weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Add prompt `adapter_name` to `model` in place, make it the active one, freeze everything
    else (but `config.modules_to_save`), and return `model`. `tokenizer` is needed for
    init="text"; `weights` (keys as `adapter_state_dict` gives them) replace the fresh init.
    Everything is checked before the model is touched."""
    configs = getattr(model, CONFIGS_ATTR, {})
    check_adapter_name(adapter_name, configs)
    check_not_merged(model, "add an adapter")
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings "
                         "(get_input_embeddings()): prompt tuning needs a transformers model.")
    if config.init == "text" and tokenizer is None and weights is None:
        raise ValueError("add_prompt_tuning: init='text' needs the model's tokenizer: pass "
                         "tokenizer=...")
    to_save = [(name, m) for name, m in model.named_modules()
               if matches(name, config.modules_to_save)]
    if config.modules_to_save and not to_save:
        raise ValueError(f"modules_to_save={config.modules_to_save} matched no module of "
                         f"{type(model).__name__}.")
    width = model.get_input_embeddings().weight.shape[1]
    if weights is not None:
        check_weights(weights, {f"{ENCODER}.prompt_embeddings": (config.num_virtual_tokens, width)}
                      | saved_shapes(to_save))
    prompt = (_initial_prompt(model, config, tokenizer) if weights is None
              else torch.zeros(config.num_virtual_tokens, width))   # the weights replace it

    # Everything is validated; nothing below can fail on user input.
    if not hasattr(model, ENCODER):
        setattr(model, ENCODER, PromptEncoder())
        model.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
    getattr(model, ENCODER).prompts[adapter_name] = nn.Parameter(prompt)
    return finish_adding(model, adapter_name, config, to_save, weights)


def _prepend_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The forward pre-hook: the active prompt in front of the input (see the module docstring)."""
    prompt = getattr(model, ENCODER).active()
    if prompt is None:                                  # disabled, or no prompt: the base model
        return None
    if args:
        raise ValueError("A model with prompt tuning takes keyword arguments only: call "
                         "model(input_ids=..., attention_mask=...) or model(**batch).")
    if kwargs.get("past_key_values") is not None:        # generate(), or a caller's cache
        raise NotImplementedError("generate() and past_key_values are not supported with "
                                  "minipeft's prompt tuning yet: the prompt would be added again "
                                  "at every step. Call the model on whole sequences.")
    if kwargs.get("position_ids") is not None:
        raise ValueError("position_ids cannot be passed with prompt tuning: the prompt shifts "
                         "every position. Leave them out; the model numbers the positions.")
    input_ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(input_ids)
    batch, n = embeds.shape[0], prompt.shape[0]
    prompts = prompt.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)        # [P ; E(x)]
    if kwargs.get("attention_mask") is not None:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2:          # one label per token: skip the prompt
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
    return args, kwargs
