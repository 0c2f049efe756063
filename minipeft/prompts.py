"""Soft prompts: prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691) and prefix
tuning (Li and Liang, 2021, https://arxiv.org/abs/2101.00190).

The model stays frozen in both; what trains is n "virtual tokens".

**Prompt tuning**: n vectors P (n x d) in the model's embedding space, put in front of every
input's token embeddings E(x). The model reads them as words it has never seen, and training finds
the words that steer it:

    inputs_embeds = [P ; E(x)]                (Lester et al., §2: prepend the prompt)
    attention_mask = [1 ... 1 ; mask]         every input attends to the prompt
    labels = [-100 ... -100 ; labels]         a causal LM is not scored on the prompt
    token_type_ids = [0 ... 0 ; types]        BERT's segment ids for the prompt

This is what peft's prompt tuning computes, and the tests compare the two. The prompt goes in
through a forward pre-hook on the model, which rewrites its keyword arguments; the model's own
code is not touched, and `model(**batch)` and `model.generate(...)` work as before.

Initialisation (`init`): "random" (N(0, 1), as nn.Embedding draws it), "vocab" (rows of the
embedding matrix for random vocabulary tokens), or "text" (the embeddings of `init_text`,
repeated or cut to n tokens; Lester et al. found vocabulary-based inits train better than random
ones on small models).

**Prefix tuning**: n trainable keys and values in every attention layer, which every token
attends to as if n tokens came before the input (Li and Liang, §4.2):

    K_l = [P_k,l ; X W_k,l]    V_l = [P_v,l ; X W_v,l]      for every layer l
    softmax(Q_l K_l^T / sqrt(d_head)) V_l                   the input's own queries

The prefixes reach the attention through a custom attention function, registered with
transformers' attention interface, that puts them in front of the layer's keys and values and
widens its mask: no cache argument (`past_key_values`) is involved, so a change to the cache API
cannot break it, and generation's own cache holds only real tokens. The tokens' positions start
at n, where they would be if n tokens came first: the convention of Li and Liang (and peft), whose
outputs the tests compare. With grouped-query attention the prefixes have the key/value heads.
Li and Liang train the prefixes through an MLP, P = MLP(P') (§4.3), which they found more stable;
`prefix_projection=True` does that, and `fold_prefix_projection` replaces the MLP by the prefixes
it computes, which are all that inference (and a saved adapter) needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import nn

from minipeft.inject import (CONFIGS_ATTR, check_adapter_name, check_not_merged, check_weights,
                             finish_adding, matches, saved_shapes)

Init = Literal["random", "vocab", "text"]
PROMPT_ENCODER = "prompt_encoder"     # the model attribute that holds the prompts
PREFIX_ENCODER = "prefix_encoder"     # ... and the one that holds the prefixes
PREFIX_ATTENTION = "minipeft_prefix"  # the attention function's name in transformers' registry
PREFIX_SLOT = "minipeft_prefix"       # attention-module attribute: this forward's (keys, values)
IGNORE_INDEX = -100                   # labels a loss skips


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
        _check_virtual_tokens("PromptTuningConfig", self.num_virtual_tokens)
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"PromptTuningConfig: init must be 'random', 'vocab' or 'text', got "
                             f"{self.init!r}.")
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("PromptTuningConfig: init='text' needs init_text, e.g. "
                             "init_text='Classify the sentiment of this review:'.")
        self.modules_to_save = _check_modules_to_save("PromptTuningConfig", self.modules_to_save)


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


def _check_virtual_tokens(config_name: str, n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{config_name}: num_virtual_tokens must be an integer >= 1, got {n!r}. "
                         "Lester et al. used 1 to 150 prompt tokens, Li and Liang 5 to 200 "
                         "prefix tokens; 20 is a common start.")


def _check_modules_to_save(config_name: str, modules: object) -> list[str]:
    if isinstance(modules, str):
        raise ValueError(f"{config_name}: modules_to_save must be a list of module names, got "
                         f"{modules!r}.")
    return list(modules)


def _to_save(model: nn.Module, modules_to_save: list[str]) -> list[tuple[str, nn.Module]]:
    to_save = [(name, m) for name, m in model.named_modules() if matches(name, modules_to_save)]
    if modules_to_save and not to_save:
        raise ValueError(f"modules_to_save={modules_to_save} matched no module of "
                         f"{type(model).__name__}.")
    return to_save


def _past_length(kwargs: dict) -> int:
    """How many tokens the caller's cache (generate()'s, during decoding) already holds."""
    past = kwargs.get("past_key_values")
    return past.get_seq_length() if past is not None else 0


def _keyword_inputs(args: tuple, method: str) -> None:
    if args:
        raise ValueError(f"A model with {method} takes keyword arguments only: call "
                         "model(input_ids=..., attention_mask=...) or model(**batch).")


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
    to_save = _to_save(model, config.modules_to_save)
    width = model.get_input_embeddings().weight.shape[1]
    if weights is not None:
        expected = {f"{PROMPT_ENCODER}.prompt_embeddings": (config.num_virtual_tokens, width)}
        check_weights(weights, expected | saved_shapes(to_save))
    prompt = (_initial_prompt(model, config, tokenizer) if weights is None
              else torch.zeros(config.num_virtual_tokens, width))   # the weights replace it

    # Everything is validated; nothing below can fail on user input.
    if not hasattr(model, PROMPT_ENCODER):
        setattr(model, PROMPT_ENCODER, PromptEncoder())
        model.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
    getattr(model, PROMPT_ENCODER).prompts[adapter_name] = nn.Parameter(prompt)
    return finish_adding(model, adapter_name, config, to_save, weights)


def _prepend_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The forward pre-hook: the active prompt in front of the input (see the module docstring).
    During generate() only the first call (the cache still empty) gets the prompt; the later
    ones find it in the cache, and need only the mask and positions to count it."""
    prompt = getattr(model, PROMPT_ENCODER).active()
    if prompt is None:                                  # disabled, or no prompt: the base model
        return None
    _keyword_inputs(args, "prompt tuning")
    n, first_call = prompt.shape[0], _past_length(kwargs) == 0
    if first_call:
        input_ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        batch = embeds.shape[0]
        prompts = prompt.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)        # [P ; E(x)]
    if kwargs.get("attention_mask") is not None:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    if kwargs.get("position_ids") is not None:           # the prompt holds positions 0 .. n-1
        positions = kwargs["position_ids"] + n
        if first_call:
            start = torch.arange(n, device=positions.device).expand(positions.shape[0], -1)
            positions = torch.cat([start, positions], dim=1)
        kwargs["position_ids"] = positions
    if first_call and kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
    labels = kwargs.get("labels")
    if first_call and labels is not None and labels.dim() == 2:   # a label per token: skip P
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels],
                                     dim=1)
    return args, kwargs


# ------------------------------------------------------------------------------ prefix tuning

@dataclass
class PrefixTuningConfig:
    """num_virtual_tokens: the prefix length n. prefix_projection: train the prefixes through
    Li and Liang's MLP (Embedding -> Linear -> Tanh -> Linear) of width `encoder_hidden_size`
    (default: the key/value width, as peft). modules_to_save: modules trained in full next to the
    prefixes (e.g. ["classifier"]). Names as in peft's PrefixTuningConfig."""
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_virtual_tokens("PrefixTuningConfig", self.num_virtual_tokens)
        hidden = self.encoder_hidden_size
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int)
                                   or hidden < 1):
            raise ValueError(f"PrefixTuningConfig: encoder_hidden_size must be an integer >= 1 "
                             f"(or None for the key/value width), got {hidden!r}.")
        self.modules_to_save = _check_modules_to_save("PrefixTuningConfig", self.modules_to_save)


class PrefixProjection(nn.Module):
    """P = MLP(P') (Li and Liang, §4.3): n rows P' of the key/value width, mapped to every layer's
    keys and values. Only for training: `fold_prefix_projection` keeps P and drops the MLP.
    Attribute names as peft's PrefixEncoder, whose weights load into it."""

    def __init__(self, n: int, width: int, hidden: int, out: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, width)
        self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)                      # P = MLP(P')


class PrefixEncoder(nn.Module):
    """Each named adapter's prefixes, of which at most one is active. A prefix is one row per
    virtual token holding [layer 0 keys, layer 0 values, layer 1 keys, ...], each of
    (key/value heads x head size): the layout of peft's `prompt_embeddings`."""

    def __init__(self, attentions: list[nn.Module], heads: int, head_dim: int) -> None:
        super().__init__()
        self.prefixes = nn.ParameterDict()     # P itself
        self.projections = nn.ModuleDict()     # P = MLP(P'), while training with the MLP
        self.active_adapter: str | None = None
        self.attentions = attentions           # a plain list: the model already owns them
        self.heads, self.head_dim = heads, head_dim

    def active(self) -> torch.Tensor | None:
        """(n, layers * 2 * heads * head_dim): the active adapter's prefixes (computed by its MLP,
        if it has one), or None when none is active."""
        name = self.active_adapter
        if name in self.prefixes:
            return self.prefixes[name]
        return self.projections[name]() if name in self.projections else None

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The prefixes, as peft saves them (`prompt_embeddings`): the MLP's output, not the MLP."""
        if name in self.prefixes:
            return {"prompt_embeddings": self.prefixes[name]}
        if name in self.projections:
            return {"prompt_embeddings": self.projections[name]().detach()}
        return {}

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name
        for key, prefix in self.prefixes.items():
            prefix.requires_grad_(key == name)
        for key, projection in self.projections.items():
            projection.requires_grad_(key == name)


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules, in layer order: transformers numbers them
    (`layer_idx`), one per layer."""
    found = {m.layer_idx: m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")
             and not getattr(m, "is_cross_attention", False)}
    layers = getattr(model.config, "num_hidden_layers", None)
    if not found or sorted(found) != list(range(layers or 0)):
        raise ValueError(f"prefix tuning found no self-attention layer numbered 0 .. "
                         f"{(layers or 0) - 1} (modules with `layer_idx`) in "
                         f"{type(model).__name__}: it needs a transformers model whose attention "
                         "goes through transformers' attention interface (BERT, Llama, ...).")
    return [found[i] for i in range(layers)]


def _register_prefix_attention() -> None:
    """Make "minipeft_prefix" an attention implementation transformers can dispatch to: PyTorch's
    scaled_dot_product_attention, with the layer's prefixes in front (and sdpa's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with this layer's prefixes: K = [P_k ; K], V = [P_v ; V], and every query may
    attend to the n prefix positions. Shapes: query (B, heads, T, d), key/value (B, kv heads, S, d),
    prefixes (kv heads, n, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, PREFIX_SLOT, None)
    if prefix is not None:
        batch, seen, causal = key.shape[0], key.shape[2], kwargs.pop("is_causal", None)
        prefix_keys, prefix_values = (p.unsqueeze(0).expand(batch, -1, -1, -1).to(key.dtype)
                                      for p in prefix)
        key = torch.cat([prefix_keys, key], dim=2)                          # K = [P_k ; K]
        value = torch.cat([prefix_values, value], dim=2)                    # V = [P_v ; V]
        causal = getattr(module, "is_causal", False) if causal is None else causal
        attention_mask = _widen_mask(attention_mask, query.shape[2], seen, prefix[0].shape[1],
                                     causal, query.device)
        kwargs["is_causal"] = False          # the mask says it all now
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _widen_mask(mask: torch.Tensor | None, queries: int, keys: int, n: int, causal: bool,
                device: torch.device) -> torch.Tensor | None:
    """The (B, 1, T, S) mask for T queries over S keys, widened to [prefix ; keys]: the prefix is
    visible to every query. sdpa leaves a causal mask out (None) when it can; then it is made."""
    if mask is None and not (causal and queries > 1):
        return None                                       # every query sees every key
    if mask is None:                                      # query i sees keys up to S - T + i
        mask = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
        mask = mask[None, None]
    visible = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
        *mask.shape[:-1], n, dtype=mask.dtype, device=mask.device)   # True / 0.0: attend
    return torch.cat([visible, mask], dim=-1)


def add_prefix_tuning(model: nn.Module, config: PrefixTuningConfig,
                      adapter_name: str = "default", *,
                      weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Add prefixes `adapter_name` to every attention layer of `model` in place, make them the
    active adapter, freeze everything else (but `config.modules_to_save`), and return `model`.
    `weights` (keys as `adapter_state_dict` gives them: the prefixes) replace the fresh init, and
    then the prefixes are loaded as they are, without the MLP. Checked before the model is
    touched."""
    configs = getattr(model, CONFIGS_ATTR, {})
    check_adapter_name(adapter_name, configs)
    check_not_merged(model, "add an adapter")
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise ValueError(f"{type(model).__name__} has no transformers config: prefix tuning needs "
                         "a transformers model.")
    attentions = _attention_layers(model)
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = (getattr(model_config, "head_dim", None)
                or model_config.hidden_size // model_config.num_attention_heads)
    n, width = config.num_virtual_tokens, heads * head_dim
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and n >= context:
        raise ValueError(f"num_virtual_tokens={n} leaves no room for input: the prefix takes "
                         f"positions 0 .. {n - 1} and {type(model).__name__} has "
                         f"{context} positions. Use a shorter prefix (20 is a common start).")
    to_save = _to_save(model, config.modules_to_save)
    out = len(attentions) * 2 * width                    # keys and values, every layer
    if weights is not None:
        check_weights(weights, {f"{PREFIX_ENCODER}.prompt_embeddings": (n, out)}
                      | saved_shapes(to_save))

    # Everything is validated; nothing below can fail on user input.
    if not hasattr(model, PREFIX_ENCODER):
        _register_prefix_attention()
        model.set_attn_implementation(PREFIX_ATTENTION)
        setattr(model, PREFIX_ENCODER, PrefixEncoder(attentions, heads, head_dim))
        model.register_forward_pre_hook(_hand_prefixes_to_attention, with_kwargs=True)
        model.register_forward_hook(_take_prefixes_back, always_call=True)
    encoder = getattr(model, PREFIX_ENCODER)
    if config.prefix_projection and weights is None:
        encoder.projections[adapter_name] = PrefixProjection(
            n, width, config.encoder_hidden_size or width, out)
    else:              # N(0, 1), as nn.Embedding draws it (peft's init), or the loaded prefixes
        encoder.prefixes[adapter_name] = nn.Parameter(torch.randn(n, out))
    return finish_adding(model, adapter_name, config, to_save, weights)


def fold_prefix_projection(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Replace adapter `adapter_name`'s MLP by the prefixes it computes (P = MLP(P'), once): the
    outputs stay the same, and the adapter keeps only P."""
    encoder = getattr(model, PREFIX_ENCODER, None)
    if encoder is None or adapter_name not in encoder.projections:
        raise ValueError(f"fold_prefix_projection: {type(model).__name__} has no prefix adapter "
                         f"{adapter_name!r} trained through an MLP (prefix_projection=True).")
    with torch.no_grad():
        prefixes = encoder.projections[adapter_name]()
    del encoder.projections[adapter_name]
    encoder.prefixes[adapter_name] = nn.Parameter(prefixes)
    encoder.set_active(encoder.active_adapter)
    return model


def _hand_prefixes_to_attention(model: nn.Module, args: tuple,
                                kwargs: dict) -> tuple[tuple, dict] | None:
    """The forward pre-hook: compute the active prefixes once (through the MLP, if any), give
    each attention module its layer's keys and values, and start the tokens' positions at n."""
    encoder = getattr(model, PREFIX_ENCODER)
    prefixes = encoder.active()
    if prefixes is None:                                 # disabled, or no prefix: the base model
        return None
    _keyword_inputs(args, "prefix tuning")
    if getattr(model, "is_activation_checkpointing", False):
        raise ValueError("prefix tuning does not run with gradient checkpointing: the prefixes "
                         "are handed to the attention for one forward pass, and the recomputation "
                         "comes later. Call model.activation_checkpointing_disable().")
    n = prefixes.shape[0]
    prefixes = prefixes.view(n, len(encoder.attentions), 2, encoder.heads, encoder.head_dim)
    for layer, attention in enumerate(encoder.attentions):
        keys, values = prefixes[:, layer].permute(1, 2, 0, 3)        # each (heads, n, d)
        setattr(attention, PREFIX_SLOT, (keys, values))
    positions = kwargs.get("position_ids")
    if positions is None:                   # the model would number the tokens from 0 (or from
        inputs = kwargs.get("input_ids")    # the cache's length): they come after the prefix
        length = (inputs if inputs is not None else kwargs["inputs_embeds"]).shape[1]
        seen = _past_length(kwargs)
        positions = torch.arange(seen, seen + length, device=prefixes.device).unsqueeze(0)
    kwargs["position_ids"] = positions + n
    return args, kwargs


def _take_prefixes_back(model: nn.Module, args: tuple, output: Any) -> None:
    """The forward hook (run even when forward fails): no prefix tensor outlives its pass."""
    for attention in getattr(model, PREFIX_ENCODER).attentions:
        setattr(attention, PREFIX_SLOT, None)
