"""Lesson 9's script under torchrun, two CPU processes (gloo): DDP-LoRA and FSDP-QLoRA train to
the adapter one process trains on the whole batch, within float32 rounding, and one process on
half the batch does not; what DDP all-reduces is LoRA's trainable state; FSDP halves what each
rank holds; rank 0 saves ordinary adapter files."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minipeft.course import distributed_train as dt

STEPS, GLOBAL_BATCH = 2, 8
TOLERANCE = 1e-4     # float32: slices reduce in another order than the whole batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = dt.launch(["ddp:lora", "fsdp:qlora"], out, nproc=2, steps=STEPS,
                        global_batch=GLOBAL_BATCH, timeout=240)
    return out, results


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter.safetensors"))


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("run", ["ddp:lora", "fsdp:qlora"])
def test_two_processes_train_what_one_process_trains_on_the_whole_batch(runs, run, tmp_path):
    out, results = runs
    strategy, method = run.split(":")
    model, single = dt.train("single", method, steps=STEPS, global_batch=GLOBAL_BATCH)
    dt.save_run(model, single, tmp_path)
    distributed = adapter(out / f"{strategy}-{method}")
    assert largest_difference(distributed, adapter(tmp_path / f"single-{method}")) < TOLERANCE
    assert results[run].losses == pytest.approx(single.losses, abs=1e-5)
    assert results[run].world_size == 2

    # the test can fail: one process on half of each batch trains to another adapter
    model, half = dt.train("single", method, steps=STEPS, global_batch=GLOBAL_BATCH // 2)
    half.strategy = "half"
    dt.save_run(model, half, tmp_path)
    assert largest_difference(distributed, adapter(tmp_path / f"half-{method}")) > 10 * TOLERANCE


def test_ddp_all_reduces_the_trainable_state_and_fsdp_halves_each_ranks_share(runs):
    _, results = runs
    ddp, fsdp = results["ddp:lora"], results["fsdp:qlora"]
    assert ddp.allreduce_bytes_per_step == 4 * ddp.trainable_params      # float32 gradients
    assert ddp.model_bytes_per_rank == ddp.model_bytes                   # a whole copy each
    assert fsdp.allreduce_bytes_per_step == 0
    assert 0.5 <= fsdp.model_bytes_per_rank / fsdp.model_bytes < 0.51    # half, plus buffers


def test_bad_runs_are_refused_before_anything_starts():
    with pytest.raises(argparse.ArgumentTypeError, match="strategy:method"):
        dt.parse_run("fsdp-lora")
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        dt.rank_slice({"labels": torch.zeros(5)}, 0, 2)
    with pytest.raises(RuntimeError, match="needs a process group"):
        dt.train("ddp", "lora")
    with pytest.raises(ValueError, match="method 'dora'"):
        dt.build_model("dora")
    with pytest.raises(ValueError, match="ask for at most 125 steps of 16"):
        dt.global_batches(None, steps=1000, global_batch=16)


def command_lines_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that contain `text` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:                                   # gone while we looked
            continue
        if text in line:
            found.append(line)
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux's /proc")
def test_a_launch_past_its_time_is_stopped_with_all_its_processes(tmp_path):
    out = tmp_path / "too-slow"
    with pytest.raises(RuntimeError, match="did not finish within 4 s"):
        dt.launch(["ddp:lora"], out, steps=100, timeout=4)          # about a minute of work
    assert command_lines_naming(str(out)) == []
