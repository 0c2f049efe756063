"""PEFT on several devices, with PyTorch's own engines: DDP and FSDP2 (`fully_shard`).

Data parallelism (DDP) keeps a whole copy of the model on each of N devices, gives each a slice of
the global batch, and after backward averages the gradients of what trains, so that every copy
takes the same step:

    g = (1/N) sum_k g_k        every rank's gradient, all-reduced (summed) and divided by N

With equal slices and a loss averaged over each slice, g is the gradient of the loss averaged over
the global batch: N processes with batch B train exactly as one process with batch N B. PEFT makes
this cheap, because only trainable parameters are all-reduced: LoRA's few thousand numbers per
layer, not the model. `AllReduceCounter` is a DDP communication hook that counts those bytes.

Sharding (FSDP) goes further: each rank keeps 1/N of every parameter and its optimizer state; a
block's full weights are gathered just before its forward (and backward) and dropped after, and
gradients are reduce-scattered so each rank holds the averaged 1/N it updates. PyTorch's FSDP2
shards each parameter along dim 0 and gathers parameters of mixed dtypes as bytes, so the NF4
codes of `Linear4bit` (uint8) are sharded beside float32 adapters once they are parameters
(`shard_model` makes them frozen parameters; they are buffers otherwise, and FSDP would copy
buffers to every rank). FSDP1 flattened each block into one tensor of one dtype, which is why
QLoRA under FSDP1 needed the packed bytes stored in the bf16 dtype of the rest (Answer.AI's
FSDP-QLoRA, bitsandbytes' `quant_storage`).
"""
# No `from __future__ import annotations` here: DDP checks a hook's `bucket` annotation against
# dist.GradBucket itself, not a string.
import inspect
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from minipeft.quant import Linear4bit

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# Linear4bit's tensors that FSDP shards; the small second-level constants of double quantisation
# (one float per 256 blocks, and one offset) stay buffers, copied to every rank.
SHARDED_4BIT_TENSORS = ("weight_packed", "absmax")


def init_process_group() -> tuple[int, int, torch.device]:
    """Join the process group `torchrun` describes (RANK, WORLD_SIZE, MASTER_ADDR in the
    environment): nccl with one GPU per process when the machine has a GPU for each of its
    processes, else gloo on CPUs (two processes on a one-GPU laptop or Colab still run, on the
    CPU). Returns (rank, world size, this rank's device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("no process group to join: RANK and WORLD_SIZE are not set. Launch "
                           "with `torchrun --nproc_per_node N ...`, which sets them.")
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available() and torch.cuda.device_count() >= processes_here:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


class AllReduceCounter:
    """What DDP all-reduced: `bytes` in all, over `steps` backward passes. Register it with its
    hook: `ddp.register_comm_hook(counter, count_and_allreduce)` (`data_parallel` does)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.steps = 0

    @property
    def bytes_per_step(self) -> float:
        """The average over the steps so far (0 before the first)."""
        return self.bytes / max(self.steps, 1)


def count_and_allreduce(counter: AllReduceCounter, bucket: dist.GradBucket
                        ) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: averages gradients over the default process group as DDP's
    default hook does, and counts the bytes.

    DDP packs the gradients of trainable parameters into buckets (25 MiB each by default) and
    calls the hook once per bucket in every backward; the last bucket ends a step."""
    buffer = bucket.buffer()
    counter.bytes += buffer.numel() * buffer.element_size()
    counter.steps += int(bucket.is_last())
    buffer.div_(dist.get_world_size())                      # g = (1/N) sum_k g_k
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def data_parallel(model: nn.Module) -> tuple[nn.Module, AllReduceCounter]:
    """`model` wrapped in DDP with the counting hook; returns (the DDP model, its counter).

    DDP would otherwise re-send every buffer (a QLoRA model's NF4 codes among them) from rank 0
    before each forward; a frozen model's buffers never change, so that is turned off (the
    argument's name changed in torch 2.13)."""
    ddp_class = nn.parallel.DistributedDataParallel
    no_resync = ({"forward_sync_buffers": False}
                 if "forward_sync_buffers" in inspect.signature(ddp_class).parameters
                 else {"broadcast_buffers": False})
    ddp, counter = ddp_class(model, **no_resync), AllReduceCounter()
    ddp.register_comm_hook(counter, count_and_allreduce)
    return ddp, counter


def make_4bit_shardable(model: nn.Module) -> nn.Module:
    """Turn each Linear4bit's NF4 codes and block constants into frozen parameters (in place), so
    that FSDP shards them; the forward pass reads them by the same names and is unchanged. Calling
    it again changes nothing."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for name in SHARDED_4BIT_TENSORS:
                if name in module._buffers:
                    tensor = module._buffers.pop(name)
                    module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    return model


def shard_model(model: nn.Module, mesh: "DeviceMesh | None" = None) -> nn.Module:
    """FSDP2 over `model`: each module whose class transformers names in
    `model._no_split_modules` its own unit (the transformer blocks, and for BERT its embeddings
    too, as Accelerate's FSDP auto-wrap chooses them), gathered for its forward and backward and
    dropped after; then the whole model as the outermost unit, for what is left (a Llama's
    embeddings, norm and head). Linear4bit layers are made shardable first
    (`make_4bit_shardable`). In place; returns `model`."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"shard_model: no transformer blocks found in {type(model).__name__} "
                         "(its _no_split_modules names none of its modules). Pass a transformers "
                         "model, or call torch's fully_shard on its blocks yourself.")
    make_4bit_shardable(model)
    for block in reversed(blocks):        # inner units before the units that contain them
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_model_bytes(model: nn.Module) -> int:
    """Bytes of the model this rank holds: its shards of sharded parameters, whole tensors of
    the rest (parameters and buffers, NF4 codes included)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


@torch.no_grad()
def gather_trainable(model: nn.Module) -> nn.Module:
    """Replace every sharded trainable parameter by its whole tensor, on every rank (in place).

    For saving an adapter after FSDP training: every rank must call it (each shard is gathered
    from all ranks), then one rank saves with `save_adapter` or `export_peft` right away. The
    frozen base stays sharded, and a forward pass would put FSDP's own parameters back: train and
    run no further with this model."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                module._parameters[name] = nn.Parameter(p.full_tensor())
    return model
