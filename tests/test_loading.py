"""minipeft.loading: a checkpoint read into 4 bits tensor by tensor is the model that loading it
whole and quantising gives (same bytes, same logits), with a lower peak, and bad checkpoints or too
little memory stop it before anything is half-loaded."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import minipeft.loading as loading
from minipeft.loading import load_quantized, read_safetensors
from minipeft.qlora import quantize_model
from minipeft.quant import Linear4bit
from tests.tiny_models import tiny_llama, tiny_qwen2

IDS = torch.tensor([[5, 17, 42, 8, 3, 99], [7, 7, 1, 60, 4, 9]])
ROOT = Path(__file__).resolve().parents[1]


def saved(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def assert_same_4bit_model(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert layers and layers.keys() == {n for n, m in reference.named_modules()
                                        if isinstance(m, Linear4bit)}
    for name, layer in layers.items():
        other = reference.get_submodule(name)
        assert torch.equal(layer.weight_packed, other.weight_packed), name
        assert torch.equal(layer.absmax, other.absmax), name
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, reference(input_ids=IDS).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-tied-biases"])
def test_loading_tensor_by_tensor_equals_loading_whole_then_quantising(tmp_path, make):
    folder = saved(make(), tmp_path)
    ours = load_quantized(folder)
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    assert_same_4bit_model(ours, reference)
    assert ours.lm_head.weight.dtype == torch.float32 and not ours.training
    if make is tiny_qwen2:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
        assert ours.model.layers[0].self_attn.q_proj.bias is not None


def test_a_sharded_bf16_checkpoint_loads_into_the_requested_compute_dtype(tmp_path):
    folder = saved(tiny_llama().to(torch.bfloat16), tmp_path, max_shard_size="20KB")
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    ours = load_quantized(folder, ["q_proj", "v_proj"], compute_dtype=torch.float32)
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                               ["q_proj", "v_proj"], compute_dtype=torch.float32)
    assert_same_4bit_model(ours, reference)
    assert isinstance(ours.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_rotary_frequencies_are_recomputed_not_left_empty(tmp_path):
    model = tiny_llama()
    ours = load_quantized(saved(model, tmp_path))
    assert torch.equal(ours.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_the_reader_gives_the_saved_tensors_back(tmp_path):
    from safetensors.torch import save_file
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, dtype=torch.bfloat16), "empty": torch.zeros(0)}
    save_file(tensors, tmp_path / "x.safetensors")
    got = dict(read_safetensors(tmp_path / "x.safetensors"))
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_a_pickled_checkpoint_is_refused_not_unpickled(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors only.*save_pretrained"):
        load_quantized(tmp_path)


def test_a_git_lfs_pointer_is_named_as_such(tmp_path):
    saved(tiny_llama(), tmp_path)
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                                "oid sha256:0123\nsize 123456\n")
    with pytest.raises(ValueError, match="not a safetensors file.*git lfs pull"):
        load_quantized(tmp_path)


def test_old_checkpoints_rotary_copies_are_skipped_and_late_biases_attached(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_qwen2()
    folder = saved(model, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)   # as Llama-2's
    biases = {k: v for k, v in tensors.items() if k.endswith("proj.bias")}
    save_file({k: v for k, v in tensors.items() if k not in biases}, folder / "a.safetensors")
    save_file(biases, folder / "b.safetensors")           # every bias after its weight
    (folder / "model.safetensors").unlink()
    weight_map = {k: "a.safetensors" for k in tensors if k not in biases} | {
        k: "b.safetensors" for k in biases}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                     "weight_map": weight_map}))
    ours = load_quantized(folder)
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    assert_same_4bit_model(ours, reference)


def test_a_truncated_checkpoint_is_an_error(tmp_path):
    folder = saved(tiny_llama(), tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(folder)


def test_weights_of_another_shape_than_the_config_says_are_an_error(tmp_path):
    folder = saved(tiny_llama(), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 120
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape.*config.json and weights disagree"):
        load_quantized(folder)


def test_too_little_memory_is_refused_before_reading_anything(tmp_path, monkeypatch):
    folder = saved(tiny_llama(), tmp_path)
    read = []
    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 1000)
    monkeypatch.setattr(loading, "read_safetensors", lambda path: read.append(path) or iter(()))
    with pytest.raises(MemoryError, match=r"needs about .* GiB on cpu .* free.*check_memory"):
        load_quantized(folder)
    assert read == []


def test_a_containers_memory_limit_counts_when_it_leaves_less(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "CGROUP", tmp_path)
    host = loading.free_memory_bytes(torch.device("cpu"))           # no limit files: the host's
    assert host and host > 0
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("123\n")
    assert abs(loading.free_memory_bytes(torch.device("cpu")) - host) < 2**28
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**29}\n")
    assert loading.free_memory_bytes(torch.device("cpu")) == 2**29


def test_the_plan_counts_the_4bit_model_exactly(tmp_path):
    folder = saved(tiny_llama(), tmp_path)
    model = load_quantized(folder)
    tensors = [*model.parameters(), *model.buffers()]
    size = sum(t.numel() * t.element_size() for t in tensors)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig.from_pretrained(folder))
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    plan = loading.plan_load(skeleton, [folder / "model.safetensors"], quantized, torch.float32,
                             64, True)
    assert plan.model_bytes == size


PEAK_SCRIPT = textwrap.dedent("""
    import gc, sys, torch
    from transformers import AutoModelForCausalLM
    from minipeft.loading import load_quantized
    from minipeft.memory import peak_memory, rss_bytes
    from minipeft.qlora import quantize_model
    folder, warm_up, route = sys.argv[1:4]
    load = {"stream": load_quantized, "whole": lambda f: quantize_model(
        AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32))}[route]
    load(warm_up)                               # libraries and kernels loaded before measuring
    gc.collect()
    start = rss_bytes()
    with peak_memory() as peak:
        load(folder)
    print(peak.peak_bytes - start)
""")


def test_the_peak_stays_near_the_4bit_model_and_below_loading_it_whole(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=10, num_attention_heads=8, max_position_embeddings=64)
    big, small = saved(LlamaForCausalLM(config), tmp_path / "big"), saved(tiny_llama(),
                                                                           tmp_path / "small")
    # one fresh process per route: memory one route frees and the C allocator keeps would let
    # the other grow less than it allocates
    peaks = {route: int(subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(big), str(small), route], capture_output=True,
        text=True, cwd=ROOT, timeout=120, check=True).stdout.split()[-1])
        for route in ("stream", "whole")}
    linear_weights = sum(m.weight.numel() * 4 for m in LlamaForCausalLM(config).modules()
                         if isinstance(m, torch.nn.Linear))
    # whole: the float32 model, at least its linear weights; streaming: a fraction of that (the
    # plan against a measured peak is in lesson 7, on a model large enough to read it)
    assert peaks["whole"] >= linear_weights > 2 * peaks["stream"], (peaks, linear_weights)
