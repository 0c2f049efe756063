"""Load a model straight into 4 bits, one tensor at a time: QLoRA where host memory is short.

`from_pretrained` and then `quantize_model` holds the whole 16-bit model first. A 7B model in
bf16 is 13.5 GB, and Colab gives 12.7 GB of host memory. `load_quantized` never holds it:

1. build the model on PyTorch's meta device: every module and shape, no memory for weights
2. read the checkpoint's safetensors files one tensor at a time (a JSON header, then raw bytes;
   read with plain file reads, so nothing stays mapped into the process)
3. quantise each targeted linear weight as soon as it is read, and drop the 16-bit copy; give
   every other tensor (embeddings, norms, head) to the model in the requested dtype
4. recompute the buffers a checkpoint does not hold (rotary frequencies), and tie the head to
   the embedding when the model shares them

The peak is the 4-bit model plus one tensor and its quantisation's scratch space. That is
predicted from the checkpoint's headers and the model's shapes before anything is read, and a
machine without that much free memory gets an error instead of a crash half-way.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from minipeft.inject import ALL_LINEAR, replace_module
from minipeft.qlora import compute_dtype_for, targeted_linears
from minipeft.quant import Linear4bit, nf4_nbytes, quantize_nf4

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
# quantize_nf4's scratch space per weight, codes included: 2.8 bytes measured on the CPU for a
# 4096 x 4096 float32 weight, 1.8 for bf16; rounded up, as a bound
QUANTIZE_SCRATCH_BYTES = 4


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file (name -> dtype, shape, data_offsets) and the byte
    where the data starts, checked against the file's size. Nothing else is read."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)                                   # a little-endian u64, then the JSON
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (a Git LFS pointer, or a download "
                         "cut short?): fetch it again, e.g. `git lfs pull` in its repository.")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which "
                             f"load_quantized does not read ({', '.join(SAFETENSORS_DTYPES)}): "
                             "save the model in bf16, fp16 or fp32 first.")
        begin, end = info["data_offsets"]
        itemsize = SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if end - begin != math.prod(info["shape"]) * itemsize or begin < 0:
            raise ValueError(f"{path}: tensor {name!r}'s bytes do not fit its shape and dtype; "
                             "the file is damaged: fetch it again.")
    return header, 8 + length


def read_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in a .safetensors file, one at a time, in file order."""
    header, start = safetensors_header(path)
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            data = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(data) != len(data):
                raise ValueError(f"{path} is truncated: tensor {name!r} runs past its end.")
            tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(shape)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a transformers checkpoint folder (one, or the shards its index
    names). Pickled checkpoints (pytorch_model.bin) are refused: unpickling runs code."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} holds no model.safetensors (or its index). load_quantized "
                            "reads safetensors only; convert a pickled checkpoint once with "
                            "from_pretrained(...).save_pretrained(folder).")


@dataclass(frozen=True)
class LoadPlan:
    """Bytes `load_quantized` will hold: the finished model, and on top of it at most one
    tensor's read, conversion and quantisation scratch at a time."""
    model_bytes: int
    largest_step_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.model_bytes + self.largest_step_bytes


def plan_load(model: nn.Module, files: list[Path], quantized: set[str], dtype: torch.dtype,
              blocksize: int, double_quant: bool) -> LoadPlan:
    """Predict the memory of loading `files` into the meta `model`, from the headers alone."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    seen: set[str] = set()
    model_bytes = largest = 0
    for file in files:
        for name, info in safetensors_header(file)[0].items():
            name = tied.get(name, name)
            if name in seen:                      # a tied pair stored under both names
                continue
            seen.add(name)
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            kept = dtype if stored.is_floating_point else stored
            width = kept.itemsize
            numel = math.prod(info["shape"])
            read = info["data_offsets"][1] - info["data_offsets"][0]
            converted = numel * width if stored != kept else 0
            if name.removesuffix(".weight") in quantized:
                model_bytes += nf4_nbytes(numel, blocksize, double_quant)
                step = read + converted + numel * QUANTIZE_SCRATCH_BYTES
            else:                          # the tensor read (or its conversion) is the model's
                model_bytes += numel * width
                step = read if converted else 0
            largest = max(largest, step)
    model_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return LoadPlan(model_bytes, largest)


CGROUP = Path("/sys/fs/cgroup")      # a container's memory limit (cgroup v2), where there is one


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on `device`: on the host (Linux), MemAvailable, or less
    where a container's limit leaves less; the GPU's free memory on CUDA; None where it cannot
    be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        used = int((CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return free
    return free if limit == "max" else min(free, int(limit) - used)


@torch.no_grad()
def load_quantized(folder: str | Path, target_modules: str | list[str] = ALL_LINEAR, *,
                   compute_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   blocksize: int = 64, double_quant: bool = True,
                   check_memory: bool = True) -> nn.Module:
    """A transformers causal LM from a local checkpoint `folder`, its targeted linear layers
    quantised to NF4 while loading (see the module docstring): equal to
    `quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=compute_dtype), ...)`,
    with a peak of the 4-bit model plus one layer. Other weights are kept in `compute_dtype`
    (bf16 on a GPU that has it, else float32). `check_memory`: refuse to start when the
    predicted peak is more than `device` has free."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    dtype = compute_dtype_for(device, compute_dtype)
    files = checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):                                 # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized = {name for name, _ in targeted_linears(model, target_modules)}
    plan = plan_load(model, files, quantized, dtype, blocksize, double_quant)
    free = free_memory_bytes(device) if check_memory else None
    if free is not None and plan.peak_bytes > free:
        raise MemoryError(
            f"loading {folder} in 4 bits needs about {plan.peak_bytes / 2**30:.2f} GiB on "
            f"{device} (model {plan.model_bytes / 2**30:.2f} GiB + largest layer "
            f"{plan.largest_step_bytes / 2**30:.2f} GiB) and {free / 2**30:.2f} GiB is free. "
            "Close other programs or notebooks, load onto a GPU (device='cuda'), or use a "
            "machine with more memory; check_memory=False tries anyway.")

    # a tied head and embedding are one tensor, which a checkpoint may store under either name
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    ignored = [re.compile(p) for p in [r"rotary_emb\.inv_freq$",     # older checkpoints' copies
                                       *(model._keys_to_ignore_on_load_unexpected or [])]]
    biased = {name for name in quantized if model.get_submodule(name).bias is not None}
    early_biases: dict[str, torch.Tensor] = {}        # biases read before their weight
    for file in files:
        for name, tensor in read_safetensors(file):
            name = tied.get(name, name)
            module_name, _, kind = name.rpartition(".")
            if any(p.search(name) for p in ignored):
                continue
            if module_name in quantized and kind == "weight":
                _quantize(model, module_name, tensor.to(device, dtype), blocksize, double_quant,
                          dtype, early_biases.pop(module_name, None))
            elif module_name in quantized and kind == "bias":
                layer = model.get_submodule(module_name)
                if isinstance(layer, Linear4bit):
                    layer.bias = nn.Parameter(tensor.to(device, dtype), requires_grad=False)
                else:
                    early_biases[module_name] = tensor.to(device, dtype)
            else:
                _set_tensor(model, name, tensor.to(device, dtype if tensor.is_floating_point()
                                                    else tensor.dtype))
    _recompute_buffers(model, device)
    model.tie_weights()
    _check_nothing_missing(model, folder, quantized, biased)
    return model.eval()


def _quantize(model: nn.Module, name: str, weight: torch.Tensor, blocksize: int,
              double_quant: bool, dtype: torch.dtype, bias: torch.Tensor | None) -> None:
    """Replace the meta nn.Linear at `name` by a Linear4bit of `weight`; the 16-bit weight is
    freed when the caller lets go of it."""
    expected = tuple(model.get_submodule(name).weight.shape)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{name}.weight: the checkpoint's shape {tuple(weight.shape)} is not "
                         f"the model's {expected}; config.json and weights disagree.")
    packed, state = quantize_nf4(weight, blocksize, double_quant)
    replace_module(model, name, Linear4bit(packed, state, bias, dtype))


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or not hasattr(module, attr):
        raise ValueError(f"the checkpoint holds {name!r}, which {type(model).__name__} has no "
                         "place for: is config.json from the same model as the weights?")
    old = getattr(module, attr)
    if tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: the checkpoint's shape {tuple(tensor.shape)} is not the "
                         f"model's {tuple(old.shape)}; config.json and weights disagree.")
    if isinstance(old, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
    # transformers' initialisers skip tensors marked so; _recompute_buffers relies on it
    tensor._is_hf_initialized = True
    setattr(module, attr, tensor)


def _recompute_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers a checkpoint does not store (rotary inv_freq) are still on meta: give them memory
    and let the model's own initialisation compute them, as from_pretrained does."""
    for module in model.modules():
        meta = [name for name, b in module.named_buffers(recurse=False) if b.is_meta]
        for name in meta:
            buffer = getattr(module, name)
            setattr(module, name, torch.empty_like(buffer, device=device))
        if meta:
            model._init_weights(module)


def _check_nothing_missing(model: nn.Module, folder: str | Path, quantized: set[str],
                           biased: set[str]) -> None:
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_meta]
    missing += [f"{name}.weight" for name in sorted(quantized)
                if not isinstance(model.get_submodule(name), Linear4bit)]
    missing += [f"{name}.bias" for name in sorted(biased)
                if model.get_submodule(name).bias is None]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} tensors the model needs, e.g. "
                         f"{missing[:3]}: an incomplete or mismatched checkpoint.")
