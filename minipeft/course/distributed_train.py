"""Lesson 9's training script: LoRA, QLoRA or full fine-tuning of the course "bert" on N processes,
with DDP or FSDP2, from the same code on CPUs (gloo) and GPUs (nccl).

    torchrun --standalone --nproc_per_node 2 -m minipeft.course.distributed_train \\
        --out runs/ --runs ddp:lora fsdp:qlora --steps 6 --global-batch 16

Each run trains on the same global batches in the same order: the first `steps x global_batch`
sentences of the course's training set, each global batch tokenized as one (padded to its longest
sentence) and split into equal slices, one per rank. Dropout is off, so N processes with slices of
B sentences compute what one process computes with N B: `train("single", ...)` in one process is
the reference a distributed run must equal. Rank 0 writes, per run, `metrics.json` (a RunResult)
and the adapter (`save_adapter`; none for full fine-tuning) under `out/<strategy>-<method>/`.
`launch` starts the script from Python (a notebook, a test) and reads the results back.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minipeft import course
from minipeft.course import training
from minipeft.adapter_io import save_adapter
from minipeft.distributed import (data_parallel, gather_trainable, init_process_group,
                                  local_model_bytes, shard_model)
from minipeft.lora import LoraConfig, add_lora
from minipeft.memory import count_parameters
from minipeft.qlora import quantize_model

STRATEGIES = ("single", "ddp", "fsdp")
METHODS = ("lora", "qlora", "full")
LEARNING_RATES = {"lora": 4e-3, "qlora": 4e-3, "full": 1e-4}   # lesson 4's


@dataclass
class RunResult:
    strategy: str
    method: str
    world_size: int
    losses: list[float] = field(default_factory=list)   # the global batch's mean loss, per step
    seconds: float = 0.0
    trainable_params: int = 0
    allreduce_bytes_per_step: float = 0.0               # DDP's gradient all-reduce (0 otherwise)
    model_bytes_per_rank: int = 0                       # what rank 0 holds (after sharding)
    model_bytes: int = 0                                # the whole model's


def build_model(method: str, seed: int = 0) -> tuple[nn.Module, object]:
    """The course "bert" for `method`, the same on every rank: LoRA r=8 on query and value (as in
    lessons 3 and 4) with the new classifier head trained in full; QLoRA the same on a model whose
    encoder linear layers are NF4; full fine-tuning trains everything. Dropout off."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {METHODS}")
    course.seed_everything(seed)                   # the same new head (and LoRA A) on every rank
    model, tokenizer = course.load_model("bert", num_labels=2)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if method == "qlora":
        quantize_model(model, ["query", "key", "value", "dense"], compute_dtype=torch.float32)
    if method != "full":
        add_lora(model, LoraConfig(target_modules=["query", "value"], r=8, alpha=16,
                                   modules_to_save=["classifier"]))
    return model, tokenizer


def global_batches(tokenizer, steps: int, global_batch: int) -> list[dict[str, torch.Tensor]]:
    """The first steps x global_batch training sentences, in order, as tokenized global batches."""
    train = course.load_data("sentiment")["train"]
    if steps * global_batch > len(train):
        raise ValueError(f"{steps} steps of {global_batch} need {steps * global_batch} sentences; "
                         f"the training set has {len(train)}: ask for at most "
                         f"{len(train) // global_batch} steps of {global_batch}")
    # lesson 1's loader, in order: each batch padded to its longest sentence
    return list(training.make_loader(train.select(range(steps * global_batch)), tokenizer,
                                     batch_size=global_batch))


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world_size: int
               ) -> dict[str, torch.Tensor]:
    """Rank `rank`'s equal share of a global batch: rows rank B ... (rank + 1) B."""
    size = len(batch["labels"])
    if size % world_size:
        raise ValueError(f"a global batch of {size} does not split into {world_size} equal "
                         f"slices: choose a global batch divisible by the number of processes")
    share = size // world_size
    return {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}


def train(strategy: str, method: str, *, steps: int = 6, global_batch: int = 16,
          seed: int = 0, device: torch.device | str = "cpu") -> tuple[nn.Module, RunResult]:
    """One run on this process's share; "single" needs no process group, "ddp" and "fsdp" need
    the one `init_process_group` joins. Returns the trained model (unwrapped) and its figures."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {STRATEGIES}")
    if strategy != "single" and not dist.is_initialized():
        raise RuntimeError(f"strategy {strategy!r} needs a process group: run this under "
                           "torchrun (see the module's docstring), or use strategy 'single'.")
    rank, world = (dist.get_rank(), dist.get_world_size()) if strategy != "single" else (0, 1)
    model, tokenizer = build_model(method, seed)
    model.to(device)
    result = RunResult(strategy, method, world,
                       trainable_params=count_parameters(model).trainable,
                       model_bytes=local_model_bytes(model))
    counter, trained = None, model
    if strategy == "ddp":
        trained, counter = data_parallel(model)
    elif strategy == "fsdp":
        shard_model(model)
    result.model_bytes_per_rank = local_model_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=LEARNING_RATES[method], weight_decay=0.0)
    start = time.perf_counter()
    for batch in global_batches(tokenizer, steps, global_batch):
        local = {k: v.to(device) for k, v in rank_slice(batch, rank, world).items()}
        mean_loss = torch.tensor(training.train_step(trained, local, optimizer), device=device)
        if world > 1:                                  # for the log only: the global batch's loss
            dist.all_reduce(mean_loss)
            mean_loss /= world
        result.losses.append(mean_loss.item())
    result.seconds = time.perf_counter() - start
    if counter is not None:
        result.allreduce_bytes_per_step = counter.bytes_per_step
    if strategy == "fsdp":
        gather_trainable(model)                       # every rank: the adapter, whole, for saving
    return model, result


def save_run(model: nn.Module, result: RunResult, out: Path) -> Path:
    """Rank 0 (or a single process) writes the adapter and metrics.json; returns the folder."""
    folder = Path(out) / f"{result.strategy}-{result.method}"
    if not dist.is_initialized() or dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if result.method != "full":
            save_adapter(model, folder)
        (folder / "metrics.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    return folder


def read_run(folder: Path) -> RunResult:
    """The RunResult a run wrote to `folder` (metrics.json)."""
    return RunResult(**json.loads((Path(folder) / "metrics.json").read_text()))


def launch(runs: list[str], out: str | Path, nproc: int = 2, steps: int = 6,
           global_batch: int = 16, timeout: float = 300) -> dict[str, RunResult]:
    """Run this script under torchrun on this machine (`nproc` processes, one thread each) and
    return each run's RunResult by "strategy:method". Raises with torchrun's last output lines if
    a process fails or the whole takes longer than `timeout` seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "minipeft.course.distributed_train",
               "--out", str(out), "--steps", str(steps), "--global-batch", str(global_batch),
               "--runs", *runs]
    # one thread per process (torchrun's own default, set here so it does not warn about it)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            raise RuntimeError(f"torchrun did not finish within {timeout:g} s; it and its "
                               "processes were stopped") from None
        except KeyboardInterrupt:                     # a notebook's interrupt: stop them too
            _stop(process)
            raise
    if process.returncode != 0:
        lines = output.strip().splitlines()
        # a rank's own error, rather than torchrun's summary of which rank failed
        errors = [line for line in lines if re.match(r"\[rank\d+\]: \w+(Error|Exception)", line)]
        raise RuntimeError(f"torchrun failed (exit code {process.returncode}):\n"
                           + "\n".join(errors[:1] or lines[-15:]))
    return {run: read_run(Path(out) / run.replace(":", "-")) for run in runs}


def _stop(process: subprocess.Popen) -> None:
    """Stop torchrun and its workers. Each worker runs in a session of its own, so only torchrun
    can reach them: terminated, it stops them before it exits; killed if it does not within 30 s."""
    process.terminate()
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def parse_run(text: str) -> tuple[str, str]:
    """"ddp:lora" -> ("ddp", "lora"); an argparse error naming the choices otherwise."""
    strategy, _, method = text.partition(":")
    if strategy not in STRATEGIES or method not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: write strategy:method, strategy one of "
                                         f"{STRATEGIES}, method one of {METHODS}")
    return strategy, method


def main(argv: list[str] | None = None) -> None:
    """The command line: join the process group (under torchrun), then train and save each run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs' results")
    parser.add_argument("--runs", type=parse_run, nargs="+", required=True,
                        help="strategy:method pairs, e.g. ddp:lora fsdp:qlora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    course.quiet_known_library_warnings()
    distributed = "RANK" in os.environ
    _, _, device = init_process_group() if distributed else (0, 1, torch.device("cpu"))
    try:
        for strategy, method in args.runs:
            model, result = train(strategy, method, steps=args.steps,
                                  global_batch=args.global_batch, seed=args.seed, device=device)
            save_run(model, result, args.out)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
