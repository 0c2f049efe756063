"""Bottleneck adapters (Houlsby et al., 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al.,
2021, https://arxiv.org/abs/2005.00247).

An adapter is a small two-layer network with a narrow middle, m = hidden_size // reduction_factor:

    A(z) = W_up f(W_down z + b_down) + b_up          (Houlsby et al., §2.1; W_down: m x d)

It is inserted after a sublayer of every transformer block, and trained while the model stays
frozen. In BERT's post-norm block a sublayer ends with h = dropout(dense(x)), adds its residual
input r and normalises: out = LN(h + r). With adapters, as AdapterHub's `adapters` library (1.x,
`DoubleSeqBnConfig` and `SeqBnConfig`) computes them:

    Houlsby  (after attention and after feed-forward):  out = LN(h + A(h) + r)
    Pfeiffer (after feed-forward only):                 out = LN(h + A(LN(h + r)) + r)

Pfeiffer's LN is the block's own LayerNorm, applied twice. In a pre-norm decoder (Llama) nothing
follows a sublayer but the residual add x + h, so the rule is: the adapter goes on the sublayer's
output before that add, h + A(h), after the attention's `o_proj` (Houlsby) and after the MLP's
`down_proj` (Houlsby and Pfeiffer).

Initialisation (`init`):
- "identity" (our default): W_down like nn.Linear, W_up = 0 and b_up = 0, so A(z) = 0 and a fresh
  adapter leaves the model exactly as it was (as LoRA's B = 0 does): training starts from the
  pretrained model, and W_down still gets a gradient through W_up once W_up moves.
- "houlsby": every weight from a normal of std 1e-2 cut at 2 std, biases 0 (Houlsby et al.'s
  near-identity init: A(z) is small, not zero).
- "bert": every weight from N(0, 0.02), biases 0 (the `adapters` library's default, which is
  *not* the identity at init).

The pieces:
- `AdapterConfig`        kind, reduction factor, non-linearity, init, modules_to_save
- `Bottleneck`           A(z)
- `PostNormAdapters`     a BERT sublayer output (dense, dropout, LayerNorm) with named adapters
- `PreNormAdapters`      a pre-norm sublayer's last Linear with named adapters
- `add_adapters`         insert them into a model, freeze everything else
Switching adapters and disabling them is `minipeft.inject.set_active_adapter` and
`disable_adapters`, as for every method; saving is `minipeft.adapter_io`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
from torch import nn

from minipeft.inject import (CONFIGS_ATTR, check_adapter_name, check_not_merged, check_weights,
                             finish_adding, matches, replace_module, saved_shapes)

Kind = Literal["houlsby", "pfeiffer"]
Init = Literal["identity", "houlsby", "bert"]
NON_LINEARITIES = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU,
                   "tanh": nn.Tanh}
DEFAULT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}  # the `adapters` library's


@dataclass
class AdapterConfig:
    """Which bottleneck adapter, and how it starts.

    kind: "houlsby" (after attention and feed-forward) or "pfeiffer" (after feed-forward only).
    reduction_factor: the bottleneck is hidden_size // reduction_factor wide (16: 24 for MiniLM).
    non_linearity: f in A(z); None takes the kind's default (houlsby: "swish", pfeiffer: "relu").
    init: "identity" (A = 0 at first), "houlsby" or "bert" (see the module's docstring).
    modules_to_save: modules trained in full next to the adapters (e.g. ["classifier"]).
    """
    kind: Kind = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str | None = None
    init: Init = "identity"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_NON_LINEARITY:
            raise ValueError(f"AdapterConfig: kind must be 'houlsby' or 'pfeiffer', got "
                             f"{self.kind!r}.")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 1:
            raise ValueError(f"AdapterConfig: reduction_factor must be an integer >= 1, got "
                             f"{self.reduction_factor!r}. 16 is the usual choice; smaller is "
                             "wider.")
        self.non_linearity = self.non_linearity or DEFAULT_NON_LINEARITY[self.kind]
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"AdapterConfig: non_linearity={self.non_linearity!r} is not one of "
                             f"{sorted(NON_LINEARITIES)}.")
        if self.init not in ("identity", "houlsby", "bert"):
            raise ValueError(f"AdapterConfig: init must be 'identity', 'houlsby' or 'bert', got "
                             f"{self.init!r}.")
        if isinstance(self.modules_to_save, str) \
                or not all(isinstance(n, str) and n for n in self.modules_to_save):
            raise ValueError(f"AdapterConfig: modules_to_save must be a list of module names, "
                             f"got {self.modules_to_save!r}.")
        self.modules_to_save = list(self.modules_to_save)


class Bottleneck(nn.Module):
    """A(z) = W_up f(W_down z + b_down) + b_up."""

    def __init__(self, hidden_size: int, config: AdapterConfig) -> None:
        super().__init__()
        width = hidden_size // config.reduction_factor
        if width < 1:
            raise ValueError(f"AdapterConfig: reduction_factor={config.reduction_factor} leaves "
                             f"no bottleneck for hidden size {hidden_size}: use at most "
                             f"{hidden_size}.")
        self.down = nn.Linear(hidden_size, width)
        self.non_linearity = NON_LINEARITIES[config.non_linearity]()
        self.up = nn.Linear(width, hidden_size)
        self._init(config.init)

    @torch.no_grad()
    def _init(self, init: Init) -> None:
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if init == "identity":    # W_down as nn.Linear draws it, W_up = 0: A(z) = 0
            nn.init.zeros_(self.up.weight)
        elif init == "houlsby":   # std 1e-2, cut at 2 std
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:                     # "bert": N(0, 0.02)
            for linear in (self.down, self.up):
                nn.init.normal_(linear.weight, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.non_linearity(self.down(z)))  # A(z) = W_up f(W_down z + b) + b


class _AdapterHost(nn.Module):
    """Named bottlenecks at one place in the model, of which at most one is active."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.kinds: dict[str, Kind] = {}
        self.active_adapter: str | None = None

    def add_adapter(self, name: str, config: AdapterConfig, hidden_size: int,
                    dtype: torch.dtype, device: torch.device) -> None:
        self.adapters[name] = Bottleneck(hidden_size, config).to(device=device, dtype=dtype)
        self.kinds[name] = config.kind

    def active(self) -> Bottleneck | None:
        return self.adapters[self.active_adapter] if self.active_adapter in self.adapters else None

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.adapters:
            return {}
        return dict(self.adapters[name].state_dict())  # down.weight, down.bias, up.weight, ...

    def set_active(self, name: str | None) -> None:
        self.active_adapter = name
        for key, adapter in self.adapters.items():
            adapter.requires_grad_(key == name)


class PostNormAdapters(_AdapterHost):
    """A post-norm sublayer output (BERT's `BertSelfOutput` / `BertOutput`: dense, dropout,
    LayerNorm), recomputed with the active adapter. Without one it computes what the original
    does, LN(h + r)."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = base.dropout(base.dense(hidden_states))
        r = input_tensor
        adapter = self.active()
        if adapter is None:
            return base.LayerNorm(h + r)
        if self.kinds[self.active_adapter] == "houlsby":
            return base.LayerNorm(h + adapter(h) + r)                     # LN(h + A(h) + r)
        return base.LayerNorm(h + adapter(base.LayerNorm(h + r)) + r)     # LN(h + A(LN(h+r)) + r)


class PreNormAdapters(_AdapterHost):
    """A pre-norm sublayer's last Linear (`o_proj`, `down_proj`) followed by the active adapter:
    h + A(h), before the block adds the residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        adapter = self.active()
        if adapter is None:
            return h
        # A 16-bit base with a float32 adapter: the adapter runs in its dtype, the sum in h's.
        return h + adapter(h.to(adapter.down.weight.dtype)).to(h.dtype)  # h + A(h)


# Where adapters go: (sublayer, path inside a block) per architecture, and the kinds that use it.
POST_NORM_SITES = {"attention": "attention.output", "feed-forward": "output"}    # BERT family
PRE_NORM_SITES = {"attention": "self_attn.o_proj", "feed-forward": "mlp.down_proj"}  # Llama family
KINDS_AT = {"attention": ("houlsby",), "feed-forward": ("houlsby", "pfeiffer")}


def adapter_sites(model: nn.Module, kind: Kind) -> list[tuple[str, type[_AdapterHost]]]:
    """The module paths where adapters of `kind` go, and the host class for each; raises when
    the model has no recognisable transformer blocks."""
    sites = []
    for name, block in model.named_modules():
        for table, host in ((POST_NORM_SITES, PostNormAdapters),
                            (PRE_NORM_SITES, PreNormAdapters)):
            paths = {sub: f"{name}.{path}" if name else path for sub, path in table.items()}
            if not all(_has_module(model, p) for p in paths.values()):
                continue
            if host is PostNormAdapters and not all(
                    _is_post_norm_output(_unwrapped(model.get_submodule(p)))
                    for p in paths.values()):
                continue
            sites += [(path, host) for sub, path in paths.items() if kind in KINDS_AT[sub]]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no transformer block minipeft recognises: "
                         "adapters go into BERT-family encoders (blocks with attention.output and "
                         "output, each with dense, dropout and LayerNorm) and Llama-family "
                         "decoders (blocks with self_attn.o_proj and mlp.down_proj).")
    return sites


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _is_post_norm_output(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Module)
               for a in ("dense", "dropout", "LayerNorm"))


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, _AdapterHost) else module


def _hidden_size(module: nn.Module) -> tuple[int, torch.dtype, torch.device]:
    """The width of a site's output, and its weight's dtype and device."""
    linear = module.dense if hasattr(module, "dense") else module
    return linear.out_features, linear.weight.dtype, linear.weight.device


def add_adapters(model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *,
                 weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Add bottleneck adapter `adapter_name` to `model` in place, make it the active one, and
    return `model`.

    Every block gets the adapter at its kind's sites (houlsby: after attention and feed-forward;
    pfeiffer: after feed-forward); modules in `config.modules_to_save` get a trainable copy; every
    other parameter is frozen. Adapters of 16-bit models are kept in float32. `weights` (keys as
    `adapter_state_dict` gives them) replace the fresh init. Everything is checked before the model
    is touched: a ValueError leaves it as it was.
    """
    configs = getattr(model, CONFIGS_ATTR, {})
    check_adapter_name(adapter_name, configs)
    check_not_merged(model, "add an adapter")
    sites = adapter_sites(model, config.kind)
    to_save = [(name, m) for name, m in model.named_modules()
               if matches(name, config.modules_to_save)]
    if config.modules_to_save and not to_save:
        raise ValueError(f"modules_to_save={config.modules_to_save} matched no module of "
                         f"{type(model).__name__}.")
    widths = {path: _hidden_size(_unwrapped(model.get_submodule(path)))[0] for path, _ in sites}
    if min(widths.values()) < config.reduction_factor:
        raise ValueError(f"AdapterConfig: reduction_factor={config.reduction_factor} leaves no "
                         f"bottleneck for hidden size {min(widths.values())}: use at most "
                         f"{min(widths.values())}.")
    if weights is not None:
        expected = {}
        for path, width in widths.items():
            bottleneck = Bottleneck(width, config).to("meta")
            expected |= {f"{path}.{key}": tuple(t.shape)
                         for key, t in bottleneck.state_dict().items()}
        check_weights(weights, expected | saved_shapes(to_save))

    # Everything is validated; nothing below can fail on user input.
    for path, host_class in sites:
        module = model.get_submodule(path)
        host = module if isinstance(module, host_class) else replace_module(model, path,
                                                                            host_class(module))
        width, dtype, device = _hidden_size(host.base_layer)
        host.add_adapter(adapter_name, config, width,
                         torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype,
                         device)
    return finish_adding(model, adapter_name, config, to_save, weights)


def bottleneck_parameters(hidden_size: int, reduction_factor: int) -> int:
    """Trainable numbers of one adapter: W_down, b_down, W_up, b_up."""
    width = hidden_size // reduction_factor
    return 2 * hidden_size * width + width + hidden_size


