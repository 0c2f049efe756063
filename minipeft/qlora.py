"""QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314): LoRA trained through a frozen
4-bit base model.

Every targeted linear layer stores W0 in NF4 with double quantisation (`minipeft.quant`), and LoRA
adds its update in the compute dtype (QLoRA, §3):

    Y = X doubleDequant(c1, c2, W0_NF4) + s X A^T B^T        (c1, c2: the two levels of constants)

Only A and B train, in float32; gradients flow through the dequantised W0 to the layers below, and
W0 never gets one. Built from minipeft's own parts:

- `compute_dtype_for`   the dtype the 4-bit layers compute in: bf16 where the GPU has it, else fp32
- `quantize_model`      targeted nn.Linear layers become `Linear4bit`, one layer at a time
- `prepare_for_training`   gradient checkpointing, and inputs that require grad so it works
- then `minipeft.lora.add_lora`, whose `LoraLinear` wraps a `Linear4bit` like an nn.Linear, and
  `adapter_io.export_peft` / `import_peft` for peft's adapter folders

Embeddings, norms and the output head are not quantised, as in the QLoRA recipe: they are a small
share of a 7B model's parameters, and the head's precision matters for the loss.
"""
from __future__ import annotations

import torch
from torch import nn

from minipeft.inject import ALL_LINEAR, last_names, matches, replace_module
from minipeft.quant import FLOAT_DTYPES, Linear4bit


def compute_dtype_for(device: torch.device | str, requested: torch.dtype | None = None
                      ) -> torch.dtype:
    """The dtype 4-bit layers dequantise to and compute in on `device`: `requested`, or bf16 on a
    GPU that has it, float32 otherwise. fp16 is never chosen: its range (max 65,504) overflows in
    4-bit training often enough to give NaN losses, and a GPU without bf16 (a T4) is safer in fp32.
    Refuses a dtype the device cannot run."""
    device = torch.device(device)
    if requested is not None and requested not in FLOAT_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16 "
                         f"(what NF4 dequantises to), got {requested!r}.")
    # native bf16 units from compute capability 8.0 (A100); is_bf16_supported() would also count
    # a T4's emulation, which is slow
    has_bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
    if requested == torch.bfloat16 and not has_bf16:
        raise ValueError(f"{torch.cuda.get_device_name(device)} cannot compute in bfloat16 (it "
                         "needs compute capability 8.0, an A100 or newer). Use "
                         "compute_dtype=torch.float32 (the default here), not float16, which "
                         "overflows into NaN losses in 4-bit training.")
    if requested is not None:
        return requested
    return torch.bfloat16 if device.type == "cuda" and has_bf16 else torch.float32


def targeted_linears(model: nn.Module, target_modules: str | list[str]
                     ) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the nn.Linear layers `target_modules` names in `model`; an error if none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if target_modules == ALL_LINEAR:
        found = [(name, m) for name, m in linears if m is not head]
    else:
        found = [(name, m) for name, m in linears if matches(name, target_modules)]
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of "
                         f"{type(model).__name__}. Its Linear layers' names end in: "
                         f"{last_names(linears) or '(it has none)'}; or use 'all-linear'.")
    return found


@torch.no_grad()
def quantize_model(model: nn.Module, target_modules: str | list[str] = ALL_LINEAR, *,
                   compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   double_quant: bool = True) -> nn.Module:
    """Replace the targeted nn.Linear layers of `model` by 4-bit `Linear4bit`s (NF4, QLoRA's double
    quantisation by default), in place, and return `model`. One layer at a time: each layer's
    full-precision weight can be freed before the next is quantised, so the peak is the 4-bit
    model plus one layer. `target_modules`: "all-linear" (all but the output head), or names as in
    LoraConfig. Checked before the model is touched."""
    names = [name for name, _ in targeted_linears(model, target_modules)]
    device = next(model.parameters()).device
    dtype = compute_dtype_for(device, compute_dtype)
    for name in names:      # by name: a list of the layers would keep every one of them alive
        replace_module(model, name, Linear4bit.from_linear(model.get_submodule(name), blocksize,
                                                           double_quant, dtype))
    return model


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True,
                         use_reentrant: bool = False) -> nn.Module:
    """Get a quantised transformers model ready for LoRA training. With gradient checkpointing
    (the QLoRA recipe), each block keeps only its input and recomputes its activations in
    backward. PyTorch's non-reentrant checkpointing (the default) needs nothing else; the older
    reentrant kind records no graph for a block whose inputs and weights are all frozen, so the
    adapters inside it would get no gradient: then the embeddings' output is made to require grad,
    as peft's `prepare_model_for_kbit_training` does."""
    if gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        # a training forward keeps no key/value cache (it would be thrown away); saying so here
        # spares a warning on every step. generate() still uses its cache.
        model.config.use_cache = False
        if use_reentrant:
            model.enable_input_require_grads()
    return model
