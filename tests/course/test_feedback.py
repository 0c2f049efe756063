"""minipeft.course.feedback: instant feedback, and the hints for usual mistakes.

Every check must be able to fail: each usual mistake is written here as a learner would write it
(independently of the wrong solutions in minipeft.course.checks) and must earn its own hint. The
grading command is run on a notebook that loops, prints, raises, tampers with minipeft and kills its
kernel.
"""
from __future__ import annotations


import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.course import feedback, training
from minipeft.course.checks import EXERCISES, QUESTIONS
from minipeft.course.feedback import (ERROR, FAIL, NOT_ATTEMPTED, PASS, Answer, check, evaluate,
                                      quiz)
from minipeft.lora import LoraLinear
from minipeft.quant import DYNAMIC_CODE, NF4_CODE

# ----------------------------------------------------------- learner-style answers, right and wrong


def lora_forward(x, W0, b, A, B, alpha, r):
    return x @ W0.T + b + (alpha / r) * (x @ A.T @ B.T)


def merge(W0, A, B, alpha, r):
    return W0 + (alpha / r) * B @ A


def training_bytes(n, t, w=4):
    return n * w + t * w + t * 8


def train_step(model, batch, optimizer):
    model.train()
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def train_step_returning_a_tensor(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def train_step_loss_after_update(model, batch, optimizer):
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model(**batch).loss.item()


def train_step_no_zero_grad(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def train_step_no_step(model, batch, optimizer):
    model.train()
    optimizer.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item()


def train_step_zero_grad_too_early(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    return loss.item()


def train_step_eval_mode(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def quantize(x, blocksize, *, nibbles="high first", absmax_of="block", rounding="nearest",
             guard=True, tail=True, absmax_dtype=torch.float32, divide=True):
    """A learner's blockwise NF4 quantiser, with switches for the usual mistakes."""
    flat = x.float().flatten()
    if not tail:
        flat = flat[:flat.numel() // blocksize * blocksize]
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1) if absmax_of == "block" else flat.abs().max().repeat(len(blocks))
    scaled = blocks / (absmax.clamp(min=1e-12) if guard else absmax)[:, None] if divide else blocks
    if rounding == "nearest":
        q = (scaled[..., None] - NF4_CODE).abs().argmin(-1)
    else:
        q = (torch.bucketize(scaled, NF4_CODE, right=True) - 1).clamp(0, 15)
    q = F.pad(q.flatten()[:n], (0, n % 2), value=7).to(torch.uint8)
    first, second = (q[0::2], q[1::2]) if nibbles == "high first" else (q[1::2], q[0::2])
    return (first << 4) | second, absmax.to(absmax_dtype)


def dequantize(packed, absmax, n, blocksize, *, nibbles="high first", scale="repeat_interleave",
               keep=None):
    pairs = [packed >> 4, packed & 15] if nibbles == "high first" else [packed & 15, packed >> 4]
    q = torch.stack(pairs, dim=1).flatten().long()
    keep = n if keep is None else keep(n, blocksize, q.numel())
    if scale == "none":
        return NF4_CODE[q[:keep]]
    per_value = (absmax.repeat_interleave(blocksize) if scale == "repeat_interleave"
                 else absmax.repeat(blocksize))
    return NF4_CODE[q[:keep]] * per_value[:keep]


class LoRALinear(nn.Module):
    """A learner's LoRA layer, with switches for the usual mistakes."""

    def __init__(self, base, r, alpha, *, B_init="zeros", A_init="random", scaling="alpha / r",
                 freeze=True, name_A="A"):
        super().__init__()
        self.base = base
        if freeze:
            base.weight.requires_grad = False
            base.bias.requires_grad = False
        A = (torch.zeros(r, base.in_features) if A_init == "zeros"
             else 0.01 * torch.randn(r, base.in_features))
        B = (torch.randn(base.out_features, r) if B_init == "random"
             else torch.zeros(base.out_features, r))
        setattr(self, name_A, nn.Parameter(A))
        self.B = nn.Parameter(B)
        self.s = {"alpha / r": alpha / r, "none": 1, "alpha": alpha,
                  "r / alpha": r / alpha}[scaling]

    def forward(self, x):
        return self.base(x) + self.s * (x @ self.A.T) @ self.B.T


def inject_lora(model, r, alpha, *, names=("query", "value"), layer=LoRALinear, freeze="first",
                head=True, whole_name=False, set_on_model=False):
    """A learner's injection, with switches for the usual mistakes."""
    if freeze == "first":
        for p in model.parameters():
            p.requires_grad = False
    for name, module in list(model.named_modules()):
        key = name if whole_name else name.split(".")[-1]
        if isinstance(module, nn.Linear) and key in names:
            if set_on_model:
                setattr(model, name, layer(module, r, alpha))
            else:
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.split(".")[-1], layer(module, r, alpha))
    if freeze == "last":
        model.requires_grad_(False)
    if freeze != "never":
        for p in model.classifier.parameters():
            p.requires_grad = head
    return model


def double_quantize(absmax, *, centre="mean", blocksize=256, divide=True, table="dynamic"):
    """A learner's double quantisation, with switches for the usual mistakes."""
    offset = {"mean": absmax.mean(), "none": torch.tensor(0.0)}.get(centre)
    centred = absmax - offset if centre != "per block" else torch.cat(
        [b - b.mean() for b in absmax.split(blocksize)])
    n = len(centred)
    blocks = F.pad(centred, (0, -n % blocksize)).view(-1, blocksize)
    absmax2 = blocks.abs().max(dim=1).values
    v = (blocks / absmax2.clamp(min=1e-12)[:, None] if divide else blocks).flatten()[:n]
    codes = ((v[:, None] - DYNAMIC_CODE).abs().argmin(1) if table == "dynamic"
             else torch.round((v + 1) * 127.5)).to(torch.uint8)
    if centre == "per block":
        offset = torch.stack([b.mean() for b in absmax.split(blocksize)])
    return codes, absmax2, offset


def double_dequantize(codes, absmax2, offset, *, add_offset=True, spread="repeat_interleave",
                      lookup=True, scale=True):
    values = DYNAMIC_CODE[codes.long()] if lookup else codes.float()
    per_code = getattr(absmax2, spread)(256)[:len(codes)]
    return (values * per_code if scale else values) + (offset if add_offset else 0)


def bottleneck(z, Wd, bd, Wu, bu, *, f=torch.relu, bias_down="inside", biases=True, add_z=False):
    """A learner's adapter, with switches for the usual mistakes."""
    down = z @ Wd.T + (bd if biases and bias_down == "inside" else 0)
    up = f(down) + (bd if biases and bias_down == "outside" else 0)
    out = up @ Wu.T + (bu if biases else 0)
    return z + out if add_z else out


def adapter_output(h, r, kind, Wd, bd, Wu, bu, ln_w, ln_b, *, reads=None, skip=True, residual=True,
                   norm=True):
    def LN(x):
        return F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps=1e-12)
    reads = reads or {"houlsby": "h", "pfeiffer": "LN(h + r)"}[kind]
    z = {"h": h, "h + r": h + r, "LN(h + r)": LN(h + r)}[reads]
    out = bottleneck(z, Wd, bd, Wu, bu) + (h if skip else 0) + (r if residual else 0)
    return LN(out) if norm else out


def adapter_param_count(d, f, blocks, kind, *, per_block=None, biases=2, m=None):
    m = m(d, f) if m else d // f
    per = per_block or (2 if kind == "houlsby" else 1)
    return blocks * per * (2 * d * m + {2: m + d, 1: d, 0: 0}[biases])


def prompt_inputs(P, embeds, mask, labels, *, first=True, mask_fill=1, label_fill=-100,
                  grow_mask=True, grow_labels=True, expand=True):
    """A learner's prompt-tuning input, with switches for the usual mistakes."""
    batch, n = embeds.shape[0], P.shape[0]
    prompts = P.expand(batch, -1, -1) if expand else P

    def grow(x, front):
        return torch.cat([front, x] if first else [x, front], dim=1)

    return (grow(embeds, prompts),
            grow(mask, torch.full((batch, n), mask_fill, dtype=mask.dtype)) if grow_mask else mask,
            grow(labels, torch.full((batch, n), label_fill, dtype=labels.dtype))
            if grow_labels else labels)


def attention_with_prefix(q, k, v, pk, pv, causal, *, scale=True, prefix_values=True,
                          hide_prefix=False, tile=False):
    """A learner's attention with a prefix, with switches for the usual mistakes."""
    B, T, n = q.shape[0], q.shape[2], pk.shape[1]
    K = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    V = torch.cat([(pv if prefix_values else torch.zeros_like(pv)).expand(B, -1, -1, -1), v], dim=2)
    g = q.shape[1] // k.shape[1]
    K, V = (K.repeat(1, g, 1, 1), V.repeat(1, g, 1, 1)) if tile else (
        K.repeat_interleave(g, 1), V.repeat_interleave(g, 1))
    scores = q @ K.transpose(-2, -1) / (q.shape[-1] ** 0.5 if scale else 1.0)
    if causal:
        allowed = (torch.ones(T, n + T).tril() if hide_prefix
                   else torch.cat([torch.ones(T, n), torch.ones(T, T).tril()], dim=1))
        scores = scores.masked_fill(allowed == 0, float("-inf"))
    return torch.softmax(scores, dim=-1) @ V


def prefix_param_count(layers, n, heads, kv_heads, head_dim, *, both=2, use_heads=False,
                       per_layer=True):
    return (layers if per_layer else 1) * both * n * (heads if use_heads else kv_heads) * head_dim


def nf4_storage_bytes(n, blocksize, double_quant, *, pack=True, odd=True, round_up=True,
                      constants=True, dq_byte=True, second_level=True):
    blocks = -(-n // blocksize) if round_up else n // blocksize
    codes = ((n + 1) // 2 if odd else n // 2) if pack else n
    if not constants:
        return codes
    if double_quant and dq_byte:
        return codes + blocks + ((4 * -(-blocks // 256) + 4) if second_level else 0)
    return codes + 4 * blocks


def lora_trainable_params(layers, num_blocks, r, targets, *, a_only=False, b_only=False,
                          full=False, blocks=True, every=False, square=False):
    total = 0
    for name, (d_in, d_out) in layers.items():
        if name in targets or every:
            total += (d_in * d_out if full else r * d_in if a_only else r * d_out if b_only
                      else 2 * r * d_in if square else r * (d_in + d_out))
    return total * (num_blocks if blocks else 1)


def fsdp_shard(param, rank, world_size, *, round_up=True, pad="end", interleave=False):
    if interleave:
        return param[rank::world_size]
    rows_each = -(-param.shape[0] // world_size) if round_up else param.shape[0] // world_size
    shard = param[rank * rows_each:(rank + 1) * rows_each]
    zeros = param.new_zeros((rows_each - shard.shape[0], *param.shape[1:]))
    return {"end": torch.cat([shard, zeros]), "front": torch.cat([zeros, shard]),
            None: shard}[pad]


def ddp_bytes_per_step(parameters, *, frozen_too=False, width=None):
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}
    return sum(math.prod(p["shape"]) * (sizes[p["dtype"]] if width is None else width)
               for p in parameters if p["trainable"] or frozen_too)


def expected_calibration_error(confidence, correct, bins, *, weigh="n", absolute=True,
                               right_closed=False, one_in_last=True, per_bin=True):
    if not per_bin:
        return abs(correct.float().mean() - confidence.mean()).item()
    index = (confidence * bins).floor().long()
    if right_closed:
        index = (confidence * bins).ceil().long() - 1
    index = index.clamp(max=bins - 1) if one_in_last else index
    total, used = 0.0, 0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            gap = correct[in_bin].float().mean() - confidence[in_bin].mean()
            gap = gap.abs() if absolute else gap
            used += 1
            total += gap.item() * (in_bin.float().mean().item() if weigh == "n" else 1)
    return total / used if weigh == "bins" else total / bins if weigh == "all bins" else total


def train_lora_without_training(model, tokenizer, data):
    return inject_lora(model, 8, 16)


RIGHT = {
    "bottleneck": bottleneck,
    "adapter_output": adapter_output,
    "adapter_param_count": adapter_param_count,
    "LoRALinear": LoRALinear,
    "inject_lora": inject_lora,
    "double_quantize": double_quantize,
    "double_dequantize": double_dequantize,
    "train_step": train_step,
    "training_bytes": training_bytes,
    "lora_forward": lora_forward,
    "merge": merge,
    "lora_param_count": lambda i, o, r: r * (i + o),
    "prompt_inputs": prompt_inputs,
    "attention_with_prefix": attention_with_prefix,
    "prefix_param_count": prefix_param_count,
    "nf4_storage_bytes": nf4_storage_bytes,
    "lora_trainable_params": lora_trainable_params,
    "fsdp_shard": fsdp_shard,
    "ddp_bytes_per_step": ddp_bytes_per_step,
    "expected_calibration_error": expected_calibration_error,
    "quantize_nf4_blockwise": quantize,
    "dequantize_nf4_blockwise": dequantize,
}


def merge_in_place(W0, A, B, alpha, r):
    W0 += (alpha / r) * B @ A
    return W0


# (exercise, wrong answer, words of the hint it must earn)
WRONG = [
    ("train_step", train_step_no_zero_grad, "zero_grad"),
    ("train_step", train_step_returning_a_tensor, "Return the loss as a Python float"),
    ("train_step", train_step_loss_after_update, "not a new forward pass"),
    ("train_step", train_step_no_step, "optimizer.step()"),
    ("train_step", train_step_zero_grad_too_early, "optimizer.step()"),
    ("train_step", train_step_eval_mode, "model.train()"),
    ("training_bytes", lambda n, t, w=4: 16 * n, "16 bytes per parameter holds"),
    ("training_bytes", lambda n, t, w=4: n * w + n * w + n * 8,
     "no gradient and no optimizer state"),
    ("training_bytes", lambda n, t, w=4: n * w + n * w + t * 8,
     "count gradients for the n_trainable"),
    ("training_bytes", lambda n, t, w=4: n * w + t * w + n * 8,
     "Adam's m and v exist for trainable"),
    ("training_bytes", lambda n, t, w=4: n * w + t * 8, "gradients are missing"),
    ("training_bytes", lambda n, t, w=4: n * w + t * w + t * 4, "you counted one"),
    ("training_bytes", lambda n, t, w=4: n * w + t * w + 2 * t * w, "kept in fp32"),
    ("training_bytes", lambda n, t, w=4: n * w + 12 * t, "dtype of its weight"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + x @ A.T @ B.T,
     "alpha / r seems to be missing"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha * (x @ A.T @ B.T),
     "You scaled by alpha"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + r / alpha * (x @ A.T @ B.T),
     "not r / alpha"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + alpha / r * (x @ A.T @ B.T),
     "bias"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: alpha / r * (x @ A.T @ B.T),
     "LoRA branch only"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b, "frozen layer's output only"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha / r * (x @ B @ A),
     "wrong way round"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + alpha / r * (x @ A @ B),
     "orientation"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: lora_forward(x.float(), W0.float(), b.float(),
                                                                   A.float(), B.float(), alpha, r),
     "dtype"),
    ("lora_forward", lambda x, W0, b, A, B, alpha, r: None, "return"),
    ("merge", merge_in_place, "changed in place"),
    ("merge", lambda W0, A, B, alpha, r: W0 + B @ A, "alpha / r seems to be missing"),
    ("merge", lambda W0, A, B, alpha, r: W0 + alpha * B @ A, "You scaled by alpha"),
    ("merge", lambda W0, A, B, alpha, r: W0 + r / alpha * B @ A, "not r / alpha"),
    ("merge", lambda W0, A, B, alpha, r: alpha / r * B @ A, "update only"),
    ("merge", lambda W0, A, B, alpha, r: W0 + alpha / r * A.T @ B.T, "its transpose"),
    ("lora_param_count", lambda i, o, r: r * (i + o) + o, "no bias"),
    ("lora_param_count", lambda i, o, r: i * o, "full matrix"),
    ("lora_param_count", lambda i, o, r: r * i * o, "added, not multiplied"),
    ("lora_param_count", lambda i, o, r: r * i, "A (r x in) only"),
    ("lora_param_count", lambda i, o, r: o * r, "B (out x r) only"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, nibbles="low first"),
     "nibbles are the wrong way"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, absmax_of="tensor"),
     "absmax is per block"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, tail=False),
     "last block may be partial"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, rounding="down"), "nearest code"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, guard=False), "absmax 0"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, absmax_dtype=x.dtype),
     "stored in float32"),
    ("quantize_nf4_blockwise", lambda x, bs: quantize(x, bs, divide=False),
     "Divide each value by its block's"),
    ("quantize_nf4_blockwise", lambda x, bs: (quantize(x.flatten().view(-1, bs), bs)),
     "pad the last block"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, nibbles="low first"),
     "nibbles are the wrong way"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, scale="none"),
     "multiplied by its block"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs, scale="repeat"),
     "repeat_interleave"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs,
                                                                keep=lambda n, bs, m: m),
     "exactly n values"),
    ("dequantize_nf4_blockwise", lambda p, a, n, bs: dequantize(p, a, n, bs,
                                                                keep=lambda n, bs, m: n // bs * bs),
     "dequantise it too"),
    ("LoRALinear", lambda base, r, alpha: LoRALinear(base, r, alpha, B_init="random"),
     "B starts random"),
    ("LoRALinear", lambda base, r, alpha: LoRALinear(base, r, alpha, A_init="zeros"),
     "neither ever moves"),
    ("LoRALinear", lambda base, r, alpha: LoRALinear(base, r, alpha, scaling="none"),
     "scaling seems to be"),
    ("LoRALinear", lambda base, r, alpha: LoRALinear(base, r, alpha, scaling="alpha"),
     "You scaled by alpha"),
    ("LoRALinear", lambda base, r, alpha: LoRALinear(base, r, alpha, scaling="r / alpha"),
     "not r / alpha"),
    ("LoRALinear", lambda base, r, alpha: LoRALinear(base, r, alpha, freeze=False), "still trains"),
    ("LoRALinear", lambda base, r, alpha: LoRALinear(base, r, alpha, name_A="lora_A"),
     "two attributes"),
    ("inject_lora", lambda m, r, a: inject_lora(m, r, a, whole_name=True), "dotted names"),
    ("inject_lora", lambda m, r, a: inject_lora(m, r, a, names=("query",)),
     "value projections too"),
    ("inject_lora", lambda m, r, a: inject_lora(m, r, a, names=("query", "key")),
     "key projections"),
    ("inject_lora", lambda m, r, a: inject_lora(m, r, a, freeze="never"),
     "base model still trains"),
    ("inject_lora", lambda m, r, a: inject_lora(m, r, a, freeze="last"), "Nothing of LoRA trains"),
    ("inject_lora", lambda m, r, a: inject_lora(m, r, a, head=False), "classifier head is new"),
    ("inject_lora", lambda m, r, a: inject_lora(
        m, r, a, layer=lambda b, r, a: LoRALinear(b, r, a, B_init="random")),
     "fix LoRALinear first"),
    ("inject_lora", lambda m, r, a: inject_lora(m, r, a, set_on_model=True),
     "set the new layer on its parent"),
    ("train_lora", train_lora_without_training, "loss went down"),
    ("bottleneck", lambda *a: bottleneck(*a, f=lambda x: x), "non-linearity is missing"),
    ("bottleneck", lambda *a: bottleneck(*a, add_z=True), "Do not add z"),
    ("bottleneck", lambda *a: bottleneck(*a, biases=False), "biases are part of A"),
    ("bottleneck", lambda *a: bottleneck(*a, bias_down="outside"), "goes inside the non-linearity"),
    ("bottleneck", lambda z, Wd, bd, Wu, bu: torch.relu(z @ Wd + bd) @ Wu + bu,
     "as nn.Linear stores"),
    ("adapter_output", lambda *a: adapter_output(*a, residual=False),
     "residual input r is missing"),
    ("adapter_output", lambda *a: adapter_output(*a, skip=False), "own output h is missing"),
    ("adapter_output", lambda *a: adapter_output(*a, norm=False), "ends with its LayerNorm"),
    ("adapter_output", lambda h, r, kind, *a: adapter_output(h, r, kind, *a, reads="h"),
     "reads LN(h + r)"),
    ("adapter_output", lambda h, r, kind, *a: adapter_output(h, r, kind, *a, reads="LN(h + r)"),
     "Houlsby's reads h"),
    ("adapter_output", lambda *a: adapter_output(*a, reads="h + r"), "not h + r"),
    ("adapter_param_count", lambda *a: adapter_param_count(*a, biases=0), "Count the biases too"),
    ("adapter_param_count", lambda *a: adapter_param_count(*a, biases=1), "Both biases train"),
    ("adapter_param_count", lambda *a: adapter_param_count(*a, per_block=1), "Houlsby puts two"),
    ("adapter_param_count", lambda *a: adapter_param_count(*a, per_block=2), "Pfeiffer puts one"),
    ("adapter_param_count", lambda *a: adapter_param_count(*a, m=lambda d, f: d * f),
     "not hidden_size *"),
    ("adapter_param_count", lambda *a: adapter_param_count(*a, m=lambda d, f: round(d / f)),
     "rounded down"),
    ("double_quantize", lambda a: double_quantize(a, centre="none"), "Subtract the mean"),
    ("double_quantize", lambda a: double_quantize(a, centre="per block"),
     "One offset for the whole"),
    ("double_quantize", lambda a: double_quantize(a, blocksize=len(a)), "blocks of 256"),
    ("double_quantize", lambda a: double_quantize(a, divide=False), "Divide each centred value"),
    ("double_quantize", lambda a: double_quantize(a, table="linear"), "dynamic map"),
    ("double_dequantize", lambda c, a2, o: double_dequantize(c, a2, o, add_offset=False),
     "Add the offset back"),
    ("double_dequantize", lambda c, a2, o: double_dequantize(c, a2, o, spread="repeat"),
     "repeat_interleave(256)"),
    ("double_dequantize", lambda c, a2, o: double_dequantize(c, a2, o, lookup=False),
     "Look each code up"),
    ("double_dequantize", lambda c, a2, o: double_dequantize(c, a2, o, scale=False),
     "Multiply by the block's"),
    ("prompt_inputs", lambda *a: prompt_inputs(*a, first=False), "in front of the input"),
    ("prompt_inputs", lambda *a: prompt_inputs(*a, grow_mask=False), "The mask must grow"),
    ("prompt_inputs", lambda *a: prompt_inputs(*a, mask_fill=0), "new mask columns are ones"),
    ("prompt_inputs", lambda *a: prompt_inputs(*a, grow_labels=False), "labels must grow too"),
    ("prompt_inputs", lambda *a: prompt_inputs(*a, label_fill=0), "value the loss skips"),
    ("prompt_inputs", lambda *a: prompt_inputs(*a, expand=False), "expand P to (batch, n, d)"),
    ("attention_with_prefix", lambda *a: attention_with_prefix(*a, hide_prefix=True),
     "visible to every query"),
    ("attention_with_prefix", lambda *a: attention_with_prefix(*a, scale=False), "sqrt(d_head)"),
    ("attention_with_prefix", lambda *a: attention_with_prefix(*a, prefix_values=False),
     "values need their prefix"),
    ("attention_with_prefix", lambda *a: attention_with_prefix(*a, tile=True), "repeat_interleave"),
    ("prefix_param_count", lambda *a: prefix_param_count(*a, both=1), "Keys and values"),
    ("prefix_param_count", lambda *a: prefix_param_count(*a, use_heads=True), "key/value heads"),
    ("prefix_param_count", lambda *a: prefix_param_count(*a, per_layer=False),
     "multiply by the layers"),
    ("nf4_storage_bytes", lambda *a: nf4_storage_bytes(*a, constants=False), "constants count too"),
    ("nf4_storage_bytes", lambda *a: nf4_storage_bytes(*a, pack=False), "share a byte"),
    ("nf4_storage_bytes", lambda *a: nf4_storage_bytes(*a, odd=False), "half-used byte"),
    ("nf4_storage_bytes", lambda *a: nf4_storage_bytes(*a, round_up=False),
     "round the block count up"),
    ("nf4_storage_bytes", lambda *a: nf4_storage_bytes(*a, dq_byte=False), "1-byte code, not 4"),
    ("nf4_storage_bytes", lambda *a: nf4_storage_bytes(*a, second_level=False), "second level"),
    ("lora_trainable_params", lambda *a: lora_trainable_params(*a, a_only=True),
     "A and B both train"),
    ("lora_trainable_params", lambda *a: lora_trainable_params(*a, b_only=True),
     "B is out x r and A"),
    ("lora_trainable_params", lambda *a: lora_trainable_params(*a, full=True),
     "not the layer's in x out"),
    ("lora_trainable_params", lambda *a: lora_trainable_params(*a, blocks=False),
     "multiply by the number of blocks"),
    ("lora_trainable_params", lambda *a: lora_trainable_params(*a, every=True),
     "Only the targeted layers"),
    ("lora_trainable_params", lambda *a: lora_trainable_params(*a, square=True), "narrower than q"),
    ("fsdp_shard", lambda *a: fsdp_shard(*a, round_up=False), "rounded up"),
    ("fsdp_shard", lambda *a: fsdp_shard(*a, pad=None), "pad a short"),
    ("fsdp_shard", lambda *a: fsdp_shard(*a, pad="front"), "padding goes after the rows"),
    ("fsdp_shard", lambda *a: fsdp_shard(*a, interleave=True), "not every N-th row"),
    ("ddp_bytes_per_step", lambda ps: ddp_bytes_per_step(ps, frozen_too=True), "Frozen parameters"),
    ("ddp_bytes_per_step", lambda ps: ddp_bytes_per_step(ps, width=1), "Count bytes, not numbers"),
    ("ddp_bytes_per_step", lambda ps: ddp_bytes_per_step(ps, width=4), "parameter's dtype"),
    ("expected_calibration_error", lambda *a: expected_calibration_error(*a, weigh="bins"),
     "share of the predictions"),
    ("expected_calibration_error", lambda *a: expected_calibration_error(*a, weigh="all bins"),
     "counts empty bins"),
    ("expected_calibration_error", lambda *a: expected_calibration_error(*a, absolute=False),
     "must not cancel"),
    ("expected_calibration_error", lambda *a: expected_calibration_error(*a, per_bin=False),
     "once over all"),
    ("expected_calibration_error", lambda *a: expected_calibration_error(*a, one_in_last=False),
     "exactly 1"),
    ("expected_calibration_error", lambda *a: expected_calibration_error(*a, right_closed=True),
     "bin above it"),
]


# train_lora's right answer trains for half a minute: the solution notebook proves it passes (its
# nbval run, and tests/course/test_exercises.py grades it at full marks).
@pytest.mark.parametrize("name", sorted(set(EXERCISES) - {"train_lora"}))
@pytest.mark.parametrize("seed", [0, 12345])
def test_right_answers_pass_every_case(name, seed):
    result = evaluate(name, RIGHT[name], seed=seed)
    assert [c.status for c in result.cases] == [PASS] * result.total, result.report()
    assert result.total >= 3


@functools.cache
def evaluated(index: int) -> feedback.ExerciseResult:
    """WRONG[index] judged once, for both tests below (each judgement runs every mistake)."""
    name, wrong, _ = WRONG[index]
    return evaluate(name, wrong)


@pytest.mark.parametrize("index", range(len(WRONG)), ids=[f"{n}-{h}" for n, _, h in WRONG])
def test_a_usual_mistake_fails_with_its_hint(index):
    name, _, hint = WRONG[index]
    result = evaluated(index)
    failing = [c for c in result.cases if c.status != PASS]
    assert failing, f"{name}: the wrong answer passed every case"
    assert any(hint in c.hint for c in failing), result.report()


def test_every_usual_mistake_is_reached_by_a_wrong_answer():
    """Each mistake's hint in minipeft.course.checks is earned by at least one learner-style answer
    above."""
    earned = {c.hint for index in range(len(WRONG)) for c in evaluated(index).cases}
    for exercise in EXERCISES.values():
        for mistake in exercise.mistakes:
            assert mistake.hint in earned, (f"{exercise.name}: no wrong answer earns "
                                            f"{mistake.hint!r}")


def test_wrong_answers_cover_every_exercise():
    assert {name for name, _, _ in WRONG} == set(EXERCISES) == set(RIGHT) | {"train_lora"}


def test_each_exercise_has_three_cases_with_distinct_names():
    for exercise in EXERCISES.values():
        names = [c.name for c in feedback.cases_for(exercise, seed=0)]
        assert len(names) >= 3 and len(set(names)) == len(names), exercise.name


def test_cases_depend_on_the_seed_and_only_on_it():
    exercise = EXERCISES["lora_forward"]
    first, again, other = (feedback.cases_for(exercise, s) for s in (7, 7, 8))
    assert all(torch.equal(a.inputs["x"], b.inputs["x"]) for a, b in zip(first, again))
    assert not torch.equal(first[0].inputs["x"], other[0].inputs["x"])


def test_placeholder_is_not_attempted_never_a_traceback(capsys):
    def placeholder(*args):
        # YOUR CODE HERE
        raise NotImplementedError()

    result = evaluate("merge", placeholder)
    assert {c.status for c in result.cases} == {NOT_ATTEMPTED}
    check("merge", placeholder)
    printed = capsys.readouterr().out
    assert "not attempted yet" in printed and "Traceback" not in printed


def test_an_exception_is_one_line_per_case(capsys):
    def broken(i, o, r):
        return {}[i]

    check("lora_param_count", broken)
    printed = capsys.readouterr().out
    assert "raised KeyError" in printed and "Traceback" not in printed
    assert evaluate("lora_param_count", broken).cases[0].status == ERROR


def test_report_shows_expected_got_and_hint(capsys):
    check("lora_forward", lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + x @ A.T @ B.T)
    printed = capsys.readouterr().out
    assert ("cases pass" in printed and "expected" in printed and ", got " in printed
            and "hint:" in printed)
    assert "✓ fresh adapter (B = 0)" in printed  # B = 0: the scaling does not matter there


def test_check_leaves_the_callers_random_state_and_threads_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("train_step", train_step)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_check_refuses_unknown_names_and_non_functions():
    with pytest.raises(ValueError, match="no exercise named 'lora'.*lora_forward"):
        check("lora", lora_forward)
    with pytest.raises(ValueError, match="without calling it"):
        check("lora_forward", lora_forward(*[torch.ones(1, 1)] * 5, 1, 1))


def test_a_learner_changing_the_inputs_does_not_change_the_reference():
    def vandal(x, W0, b, A, B, alpha, r):
        out = lora_forward(x, W0, b, A, B, alpha, r)
        for t in (x, W0, b, A, B):
            t.zero_()
        return out

    assert (evaluate("lora_forward", vandal).passed
            == len(evaluate("lora_forward", lora_forward).cases))


def test_difference_tolerates_rounding_but_not_mistakes():
    want = {"h": torch.tensor([1.0, -2.0, 4.0])}
    assert feedback.difference(want, {"h": want["h"] * (1 + 1e-6)}) is None
    assert feedback.difference(want, {"h": want["h"] * 1.01}).kind == "value"
    assert feedback.difference(want, {"h": want["h"].double()}).kind == "dtype"
    assert feedback.difference(want, {"h": want["h"][:2]}).kind == "shape"
    assert feedback.difference({"n": 12}, {"n": 12.0}) is None
    assert feedback.difference({"n": 12}, {"n": True}).kind == "type"
    nan = {"h": torch.tensor([float("nan"), 1.0])}
    assert feedback.difference(nan, {"h": nan["h"].clone()}) is None
    assert feedback.difference(nan, {"h": torch.tensor([0.0, 1.0])}) is not None


def test_statuses_summarise_an_exercise():
    cases = [feedback.CaseResult("a", PASS), feedback.CaseResult("b", FAIL, "x", "y")]
    assert feedback.ExerciseResult("e", cases).status == "1 failing"
    assert (feedback.ExerciseResult("e", [feedback.CaseResult("a", NOT_ATTEMPTED)] * 3).status
            == NOT_ATTEMPTED)
    assert Answer("ok").outputs == {}


# ---------------------------------------------------------------- borrowed answers

def _quantize_by_hand(x, blocksize):
    return NF4_CODE.sum() * 0 + x.sum()           # uses a minipeft constant: not borrowing


def _quantize_with_minipeft(x, blocksize):
    from minipeft.quant import quantize_nf4        # an import inside the function
    packed, state = quantize_nf4(x, blocksize)
    return packed.view(-1), state.absmax


def _helper(x, blocksize):
    return _quantize_with_minipeft(x, blocksize)


def _quantize_through_a_helper(x, blocksize):
    return _helper(x, blocksize)


def _train_step_with_minipeft(model, batch, optimizer):
    return training.train_step(model, batch, optimizer)


@pytest.mark.parametrize("solution, uses", [
    (_quantize_by_hand, []),
    (_quantize_with_minipeft, ["minipeft.quant.quantize_nf4"]),
    (_quantize_through_a_helper, ["minipeft.quant.quantize_nf4"]),
    (_train_step_with_minipeft, ["minipeft.course.training.train_step"]),
    (lambda W0, A, B, alpha, r: LoraLinear, ["minipeft.lora.LoraLinear"]),
])
def test_borrowed_names_what_minipeft_an_answer_uses(solution, uses):
    assert feedback.borrowed(solution) == uses


def test_check_flags_a_borrowed_answer_that_passes(capsys):
    check("quantize_nf4_blockwise", _quantize_with_minipeft)
    out = capsys.readouterr().out
    assert out.startswith("✓ quantize_nf4_blockwise: all 5 cases pass")
    assert "⚑ quantize_nf4_blockwise uses minipeft's own minipeft.quant.quantize_nf4" in out
    check("lora_forward", lora_forward)
    assert "⚑" not in capsys.readouterr().out


def test_case_names_and_error_hints_belong_to_their_function():
    merge_names = [c.name for c in feedback.cases_for(EXERCISES["merge"], seed=0)]
    assert not any("input" in name for name in merge_names)
    assert all(" x " not in hint and "x @" not in hint
               for _, hint in EXERCISES["merge"].error_hints)
    result = evaluate("merge", lambda W0, A, B, alpha, r: W0 + (alpha / r) * A @ B)
    assert any("B @ A is (out, in)" in c.hint for c in result.cases if c.status != PASS)


def test_a_wrong_nf4_byte_is_shown_with_its_codes_and_values():
    def swapped(x, blocksize):
        from minipeft.course.checks.lesson06 import _reference_quantize
        packed, absmax = _reference_quantize(x, blocksize)
        return (packed << 4) | (packed >> 4), absmax

    message = next(c.message for c in evaluate("quantize_nf4_blockwise", swapped).cases
                   if c.status == FAIL)
    assert re.search(r"expected \d+ \(0x[0-9A-F]{2}: codes \d+ and \d+, i\.e\. [+-]\d\.\d{4} and "
                     r"[+-]\d\.\d{4} times the absmax\), got \d+ \(0x", message), message



class _SubclassedLoRA(LoraLinear):
    pass


class _OwnLoRA(nn.Module):
    def forward(self, x):
        return _helper(x, 64)


def _train_lora_with_the_course_loop(model, tokenizer, data):
    training.train(model, tokenizer, data)
    return model


def test_borrowed_looks_into_classes_and_built_models():
    assert feedback.borrowed(_SubclassedLoRA) == ["minipeft.lora.LoraLinear"]
    assert feedback.borrowed(_OwnLoRA) == ["minipeft.quant.quantize_nf4"]   # through its method
    assert feedback.borrowed(LoRALinear) == []
    model = nn.Sequential(LoraLinear(nn.Linear(2, 2)))
    assert feedback.borrowed(model) == ["minipeft.lora.LoraLinear"]
    assert feedback.borrowed(nn.Sequential(nn.Linear(2, 2))) == []


def test_an_exercise_may_allow_the_course_machinery():
    """train_lora may use lesson 1's training loop; train_step may not."""
    assert feedback.borrowed(_train_lora_with_the_course_loop) == ["minipeft.course.training.train"]
    assert feedback.borrowed_in(EXERCISES["train_lora"], _train_lora_with_the_course_loop) == []
    assert feedback.borrowed_in(EXERCISES["train_step"], _train_step_with_minipeft) == [
        "minipeft.course.training.train_step"]


def test_a_model_below_the_floor_fails_with_the_accuracy_it_reached():
    message = next(c.message for c in evaluate("train_lora", train_lora_without_training).cases)
    assert re.fullmatch(r"accuracy: expected at least 0\.9, got 0\.\d+", message), message


# ---------------------------------------------------------------- concept checks

@pytest.mark.parametrize("name", sorted(QUESTIONS))
def test_a_right_answer_passes_and_each_wrong_one_gets_its_explanation(name):
    question = QUESTIONS[name]
    right = feedback.judge_question(question, question.answer)
    assert right.status == "right" and right.cases[0].message == question.why
    for wrong, explanation in question.wrong.items():
        result = feedback.judge_question(question, wrong)
        assert result.status == "wrong" and result.cases[0].hint == explanation, wrong
    assert feedback.judge_question(question, ...).status == NOT_ATTEMPTED
    if question.options:
        assert set(question.wrong) == set(question.options) - {question.answer}
        assert "letter" in feedback.judge_question(question, 2).cases[0].hint
    else:
        assert len(question.wrong) >= 2 and question.otherwise
        assert feedback.judge_question(question, -123456).cases[0].hint == question.otherwise
        assert "number" in feedback.judge_question(question, "a").cases[0].hint


def test_every_notebook_has_three_to_five_concept_checks():
    from minipeft.course.checks import notebooks, questions_of
    assert all(3 <= len(questions_of(n)) <= 5 for n in notebooks())


def test_quiz_shows_the_question_then_judges_and_keeps_the_answer(capsys):
    feedback.QUIZ_ANSWERS.clear()
    quiz("doubling_r", ...)
    shown = capsys.readouterr().out
    assert shown.startswith("? doubling_r: You raise r") and "b) It halves" in shown
    assert 'quiz("doubling_r", "a"), then run it' in shown and feedback.QUIZ_ANSWERS == {}
    quiz("doubling_r", "A")
    assert "✗ doubling_r: 'A' is not it. The scaling depends on r" in capsys.readouterr().out
    quiz("doubling_r", " b ")
    assert "✓ doubling_r: right." in capsys.readouterr().out
    assert feedback.QUIZ_ANSWERS == {"doubling_r": " b "}
    quiz("double_quant_bits", 0.12695)                 # within the question's tolerance
    assert "✓ double_quant_bits" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no concept check named 'nope'"):
        quiz("nope", 1)


def test_a_question_must_explain_every_wrong_option():
    from minipeft.course.checks import Question
    with pytest.raises(ValueError, match=r"missing: \['c'\]"):
        Question("q", "nb", "?", "a", "why", {"b": "no"}, options={"a": "1", "b": "2", "c": "3"})


def test_in_a_live_notebook_quiz_also_shows_buttons_that_judge_at_once(monkeypatch, capsys):
    import IPython
    import IPython.display
    import ipywidgets

    shown = []
    monkeypatch.setenv("MINIPEFT_PROGRESS", "live")
    monkeypatch.setattr(IPython, "get_ipython", lambda: type("Shell", (), {"kernel": object()})())
    monkeypatch.setattr(IPython.display, "display", shown.append)
    quiz("doubling_r", ...)
    assert "? doubling_r" in capsys.readouterr().out
    (box,) = shown
    buttons, verdict = box.children
    assert isinstance(buttons, ipywidgets.ToggleButtons) and buttons.options == ("a", "b", "c")
    # a click: judged at once (in a kernel, into the widget's output area)
    buttons.value = "c"
    judged = capsys.readouterr().out
    assert "r is in the denominator" in judged and 'write quiz("doubling_r", \'c\')' in judged
    assert feedback.QUIZ_ANSWERS.get("doubling_r") != "c"  # only the cell's answer is handed in

    shown.clear()
    monkeypatch.setenv("MINIPEFT_PROGRESS", "summary")   # nbval, make lessons, the grader
    quiz("doubling_r", ...)
    assert shown == []
