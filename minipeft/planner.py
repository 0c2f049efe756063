"""The memory planner: how much GPU memory fine-tuning a model will take, before loading it.

For a transformers config (BERT, Llama, Mistral, Qwen2, OLMo 2) and a method (full fine-tuning,
LoRA, QLoRA), it adds up, in bytes:

    weights       full / LoRA: every parameter in the weight dtype
                  QLoRA: targeted linear weights as NF4 codes (N / 2) plus their constants (one
                  fp32 absmax per 64 weights: 0.5 bit each; double-quantised to 8 bits per block
                  plus one fp32 per 256 blocks: 0.127 bit each), the rest (embeddings, norms,
                  head) in the weight dtype
    trainable     weights, gradients and AdamW's two moments: full fine-tuning pays them for
                  every parameter, (Q)LoRA for r (in + out) per adapted layer, kept in fp32 (16 B)
    activations   what backward needs, per token and layer (counted below); with checkpointing
                  only each block's input (h values) plus one block's recomputation; with
                  `attention="math"` also each head's s x s attention probabilities (below)
    logits        b s V in the compute dtype, their float32 copy for the loss, the log-
                  probabilities cross-entropy keeps for backward, and their gradient: at long
                  sequences and large vocabularies the largest single item

On several GPUs (`gpus=N`), the figures are per GPU, each with its share of the batch (`batch` is
per GPU):

    ddp           every item as on one GPU, plus DDP's gradient buckets (a copy of the
                  gradients of what trains, which it all-reduces)
    fsdp          weights and trainable state divided by N; plus two blocks gathered whole (the
                  one computing and the next, prefetched), the outer unit gathered whole from
                  forward to backward (embeddings, norms and head: FSDP2 does not reshard it
                  after forward), and one block's whole gradients before they are
                  reduce-scattered; with `cpu_offload`, the shards live in host memory and only
                  the gathered weights, activations and logits are on the GPU

Not included: the CUDA context (about 0.3-0.5 GiB), allocator slack and fragmentation, and
temporary buffers inside kernels. A plan is a lower bound to compare with a measured peak, not a
promise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

Method = Literal["full", "lora", "qlora"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DECODERS = ("llama", "mistral", "qwen2", "olmo2")
SEVEN_B = ("llama-2-7b", "mistral-7b", "qwen2.5-7b", "olmo-2-7b")
SHIPPED = (*SEVEN_B, "llama-2-13b", "llama-2-70b")
Strategy = Literal["ddp", "fsdp"]
Attention = Literal["fused", "math"]
ADAMW_STATE_BYTES = 8          # fp32 first and second moments
# GiB that PyTorch reports as each card's total memory (a T4's 16 GB is 14.75 GiB on Colab; the
# others as CUDA out-of-memory messages give their "total capacity")
GPUS = {"T4 (16 GB)": 14.75, "L4 (24 GB)": 22.0, "A100 40 GB": 39.4, "A100/H100 80 GB": 79.2}
BLOCKSIZE, DOUBLE_QUANT_BLOCK = 64, 256


def load_config(name: str) -> dict[str, Any]:
    """One of the configs minipeft ships (`SHIPPED`), as a dict of transformers config fields."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped config {name!r}: choose one of {SHIPPED}, or pass any "
                         "transformers config (AutoConfig.from_pretrained(...)) to plan().")
    return json.loads((Path(__file__).parent / "configs" / f"{name}.json").read_text())


@dataclass(frozen=True)
class Shape:
    """What the planner needs from a config."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    positions: int          # learned position embeddings (BERT), 0 for rotary models
    attention_dropout: float = 0.0

    @classmethod
    def of(cls, config: Mapping[str, Any] | Any) -> Shape:
        fields = config if isinstance(config, Mapping) else config.to_dict()
        needed = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size")
        missing = [f for f in needed if fields.get(f) is None]
        if missing:
            raise ValueError(f"plan: the config lacks {missing}; pass a transformers config of a "
                             "BERT or Llama-family model (AutoConfig.from_pretrained(...)).")
        kind = fields["model_type"]
        if kind != "bert" and kind not in DECODERS:
            raise ValueError(f"plan: model_type {kind!r} is not one the planner counts; it knows "
                             f"bert and {', '.join(DECODERS)}.")
        heads = fields["num_attention_heads"]
        return cls(kind, fields["hidden_size"], fields["intermediate_size"],
                   fields["num_hidden_layers"], heads, fields.get("num_key_value_heads") or heads,
                   fields.get("head_dim") or fields["hidden_size"] // heads, fields["vocab_size"],
                   bool(fields.get("tie_word_embeddings", kind == "bert")),
                   fields.get("max_position_embeddings", 0) if kind == "bert" else 0,
                   fields.get("attention_probs_dropout_prob" if kind == "bert"
                              else "attention_dropout") or 0.0)

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by its transformers name."""
        h, i, q, kv = (self.hidden, self.intermediate, self.heads * self.head_dim,
                       self.kv_heads * self.head_dim)
        if self.model_type == "bert":
            return {"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense":
                    (h, h), "intermediate.dense": (h, i), "output.dense": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Weights of every block's linear layers: what QLoRA quantises."""
        return self.layers * sum(i * o for i, o in self.linear_layers().values())

    def other_params(self) -> int:
        """Embeddings, head, norms and biases: what stays in the weight dtype."""
        h, embeddings = self.hidden, self.vocab * self.hidden
        head = 0 if self.tied else embeddings
        if self.model_type == "bert":   # biases, 2 LayerNorms per block, positions, types, pooler
            per_block = 4 * h + self.intermediate + h + 2 * 2 * h
            return (embeddings + (self.positions + 2) * h + 2 * h + self.layers * per_block
                    + h * h + h)
        norms = self.layers * 2 * h + h
        if self.model_type == "olmo2":          # QK-norm
            norms += self.layers * (self.heads + self.kv_heads) * self.head_dim
        biases = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim \
            if self.model_type == "qwen2" else 0
        return embeddings + head + norms + biases

    def activations_per_token(self) -> int:
        """Values one block keeps for backward, per token: inputs and outputs of its norms,
        q, k, v, the attention output, and the feed-forward's inner tensors."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        if self.model_type == "bert":        # q, k, v, context, 2 LayerNorms, FFN in, GELU
            return 9 * h + 2 * i
        return 2 * h + (h + 2 * kv) + h + 2 * h + 4 * i   # norm, q k v, o_proj in, norm, SwiGLU


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted bytes, by item; `total` is their sum."""
    quantized_weights: int
    quantization_constants: int
    other_weights: int
    trainable_params: int
    trainable_state: int          # weights + gradients + AdamW moments of what trains
    activations: int
    logits: int
    communication: int = 0        # DDP's gradient buckets, or FSDP's gathered weights
    adapter_weights: int = 0      # (Q)LoRA: the adapters' own fp32 weights, in trainable_state

    @property
    def total(self) -> int:
        return (self.quantized_weights + self.quantization_constants + self.other_weights
                + self.trainable_state + self.activations + self.logits + self.communication)

    @property
    def training_growth(self) -> int:
        """What training adds to the model once it is loaded with its adapters: gradients and
        AdamW's moments of what trains, activations, logits (and communication): the figure to
        set against a measured peak's increase over the loaded model."""
        return self.total - self.model_bytes

    @property
    def model_bytes(self) -> int:
        """The loaded model with its adapters, before the first step."""
        return (self.quantized_weights + self.quantization_constants + self.other_weights
                + self.adapter_weights)

    def rows(self) -> dict[str, int]:
        return {"4-bit codes": self.quantized_weights,
                "quantisation constants": self.quantization_constants,
                "other weights (16/32-bit)": self.other_weights,
                "trainable: weights, gradients, AdamW": self.trainable_state,
                "activations": self.activations, "logits and their gradient": self.logits,
                **({"gathered weights, gradient buckets": self.communication}
                   if self.communication else {}),
                "total": self.total}


def plan(config: Mapping[str, Any] | Any, method: Method = "qlora", *, batch: int = 1,
         seq_len: int = 512, rank: int = 16, targets: str | Sequence[str] = "all-linear",
         weight_dtype: str = "bfloat16", checkpointing: bool = True,
         double_quant: bool = True, gpus: int = 1, strategy: Strategy = "fsdp",
         cpu_offload: bool = False, attention: Attention = "fused") -> MemoryPlan:
    """Predict the training memory of `config` (a transformers config or its dict) under `method`,
    per GPU. `targets`: "all-linear" (QLoRA's choice), "attention" (q and v, the LoRA paper's), or
    a list of a block's linear layers by name (`Shape.linear_layers`). `gpus`, `strategy` ("ddp"
    or "fsdp"), `cpu_offload` (FSDP's): see the module's docstring. `attention`: "fused" (a GPU's
    FlashAttention or memory-efficient kernel: no s x s matrix is kept) or "math" (PyTorch's
    plain path, which a CPU takes whenever attention dropout is on: BERT's is 0.1)."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"plan: method must be 'full', 'lora' or 'qlora', got {method!r}.")
    if strategy not in ("ddp", "fsdp") or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"plan: gpus must be a whole number >= 1 and strategy 'ddp' or 'fsdp', "
                         f"got gpus={gpus!r}, strategy={strategy!r}.")
    if cpu_offload and (gpus == 1 or strategy != "fsdp"):
        raise ValueError("plan: cpu_offload is FSDP's: pass gpus > 1 and strategy='fsdp'.")
    if attention not in ("fused", "math"):
        raise ValueError(f"plan: attention must be 'fused' or 'math', got {attention!r}.")
    if weight_dtype not in DTYPE_BYTES:
        raise ValueError(f"plan: weight_dtype must be one of {sorted(DTYPE_BYTES)}, got "
                         f"{weight_dtype!r}.")
    shape = Shape.of(config)
    width = DTYPE_BYTES[weight_dtype]
    linear, other = shape.linear_params(), shape.other_params()
    layers = shape.linear_layers()
    if targets == "all-linear":
        adapted = layers
    elif targets == "attention":
        adapted = {k: v for k, v in layers.items() if k in ("q_proj", "v_proj", "query", "value")}
    elif isinstance(targets, str) or any(name not in layers for name in targets):
        raise ValueError(f"plan: targets must be 'all-linear', 'attention' or names of "
                         f"{shape.model_type}'s linear layers {list(layers)}; got {targets!r}.")
    else:
        adapted = {k: v for k, v in layers.items() if k in targets}
    lora_params = shape.layers * sum(rank * (i + o) for i, o in adapted.values())

    if method == "qlora":
        codes, constants = _nf4_bytes(linear, double_quant)
        weights = other * width
    else:
        codes, constants, weights = 0, 0, (linear + other) * width
    if method == "full":
        trainable = linear + other
        state = trainable * (width + ADAMW_STATE_BYTES)             # gradients + moments
    else:
        trainable = lora_params
        state = trainable * (4 + 4 + ADAMW_STATE_BYTES)             # fp32 A, B, grads, moments

    tokens = batch * seq_len
    block_activations = tokens * shape.activations_per_token() * width
    if attention == "math" and shape.attention_dropout > 0:
        # backward needs each head's softmax output, the dropout mask (1 byte a value) and the
        # dropped probabilities: 2 x width + 1 bytes for each of b h s^2 values
        block_activations += batch * shape.heads * seq_len ** 2 * (2 * width + 1)
    activations = (shape.layers * tokens * shape.hidden * width + block_activations
                   if checkpointing else shape.layers * block_activations)
    # a language model's logits over its vocabulary (a BERT classifier's few logits are nothing)
    vocab = 0 if shape.model_type == "bert" else shape.vocab
    logits = tokens * vocab * (width + (4 if width != 4 else 0) + 4 + 4)
    adapters = 0 if method == "full" else trainable * 4
    one_gpu = MemoryPlan(codes, constants, weights, trainable, state, activations, logits,
                         adapter_weights=adapters)
    if gpus == 1:
        return one_gpu
    gradient_width = 4 if method != "full" else width
    if strategy == "ddp":
        return replace(one_gpu, communication=trainable * gradient_width)
    share = 0 if cpu_offload else gpus       # 0: the shards live in host memory
    block_weights = _block_bytes(shape, method, width, double_quant)
    outer_unit = other * width                 # embeddings, norms, head: gathered whole
    block_trainable = (linear if method == "full" else lora_params) // shape.layers
    return replace(one_gpu, quantized_weights=_shard(codes, share),
                   quantization_constants=_shard(constants, share),
                   other_weights=_shard(weights, share), trainable_state=_shard(state, share),
                   adapter_weights=_shard(adapters, share),
                   communication=(2 * block_weights + outer_unit
                                  + block_trainable * gradient_width))


def _shard(nbytes: int, gpus: int) -> int:
    """One GPU's share of `nbytes` split over `gpus` (0: none of it is on a GPU)."""
    return -(-nbytes // gpus) if gpus else 0


def _nf4_bytes(weights: int, double_quant: bool) -> tuple[int, int]:
    """(codes, constants) in bytes for `weights` NF4 weights: two 4-bit codes per byte; one absmax
    per block of 64, an 8-bit code plus one fp32 per 256 blocks with double quantisation, or an
    fp32 without."""
    blocks = weights // BLOCKSIZE
    constants = blocks + 4 * (blocks // DOUBLE_QUANT_BLOCK) if double_quant else 4 * blocks
    return weights // 2, constants


def _block_bytes(shape: Shape, method: Method, width: int, double_quant: bool) -> int:
    """One transformer block's weights as FSDP gathers them: NF4 codes and constants for QLoRA's
    linear layers, the weight dtype otherwise (its norms are a rounding error here)."""
    linear = shape.linear_params() // shape.layers
    return sum(_nf4_bytes(linear, double_quant)) if method == "qlora" else linear * width
