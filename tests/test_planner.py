"""minipeft.planner: the 7B arithmetic of the QLoRA recipe, the shipped configs, real transformers
configs, and the predicted training state against what minipeft's own models hold."""
import pytest
import torch
import transformers

from minipeft.lora import LoraConfig, add_lora
from minipeft.memory import training_state_bytes
from minipeft.planner import SEVEN_B, SHIPPED, Shape, load_config, plan
from minipeft.qlora import quantize_model
from tests.tiny_models import tiny_llama

GB = 1e9


def test_llama_2_7b_qlora_weights_add_up_as_in_the_arithmetic():
    config = load_config("llama-2-7b")
    assert Shape.of(config).linear_params() == 6_476_005_376          # 6.48 B in linear layers
    qlora = plan(config, "qlora")
    assert round(qlora.quantized_weights / GB, 2) == 3.24              # N / 2 bytes of codes
    assert round(qlora.quantization_constants / GB, 2) == 0.10         # 0.127 bit per weight
    weights = qlora.quantized_weights + qlora.quantization_constants + qlora.other_weights
    assert round(weights / GB, 2) == 3.87                              # embeddings, head in bf16
    without_double = plan(config, "qlora", double_quant=False).quantization_constants
    assert round(without_double / GB, 2) == 0.40                       # 0.5 bit per weight


def test_qwen_untied_vocabulary_costs_2_2_gb_in_bf16():
    shape = Shape.of(load_config("qwen2.5-7b"))
    assert round(2 * shape.vocab * shape.hidden * 2 / GB, 2) == 2.18
    assert plan(load_config("qwen2.5-7b"), "qlora").other_weights > 2.18 * GB


@pytest.mark.parametrize("name", SEVEN_B)
def test_every_shipped_7b_fits_qlora_on_a_t4_and_not_full_fine_tuning(name):
    config = load_config(name)
    t4 = 14.75 * 2**30                                 # what PyTorch sees of a T4's 16 GB
    assert plan(config, "qlora", seq_len=512).total < t4
    assert plan(config, "full", weight_dtype="float32").total > 80 * 2**30    # not even an H100
    assert plan(config, "full", weight_dtype="bfloat16").total > 40 * 2**30   # nor an A100 40 GB
    assert 6e9 < Shape.of(config).linear_params() + Shape.of(config).other_params() < 8e9


def test_checkpointing_and_sequence_length_move_the_right_items():
    config = load_config("llama-2-7b")
    short, long = plan(config, seq_len=512), plan(config, seq_len=4096)
    assert long.logits == 8 * short.logits and long.quantized_weights == short.quantized_weights
    assert plan(config, checkpointing=False).activations > 10 * short.activations


def test_a_real_transformers_config_and_the_trainable_state_of_a_real_model():
    model = add_lora(quantize_model(tiny_llama()), LoraConfig(target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4))
    predicted = plan(model.config, "qlora", rank=4, weight_dtype="float32")
    held = training_state_bytes(model)
    assert predicted.trainable_params == sum(p.numel() for p in model.parameters()
                                             if p.requires_grad)
    assert predicted.trainable_state == 4 * predicted.trainable_params + held.gradients \
        + held.optimizer
    packed = sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight_packed"))
    assert predicted.quantized_weights == packed
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert predicted.adapter_weights == adapters
    assert predicted.training_growth == held.gradients + held.optimizer \
        + predicted.activations + predicted.logits


def assert_plan_within_15_percent(model, inputs: dict, method: str, **settings) -> None:
    """What two training steps of `model` add in live tensors (the second starts with AdamW's
    state), against the plan's `training_growth` for the same batch, float32 weights."""
    from bench.timing import train_step_fn, training_peak
    from minipeft.memory import peak_tensor_memory

    measured = training_peak(train_step_fn(model, inputs), 2, peak_tensor_memory)
    batch, seq_len = inputs["input_ids"].shape
    predicted = plan(model.config, method, batch=batch, seq_len=seq_len, weight_dtype="float32",
                     **settings).training_growth    # the adapters' weights were there before
    assert abs(measured - predicted) < 0.15 * predicted, (measured, predicted)


def test_the_plan_of_a_qlora_step_is_within_15_percent_of_the_tensors_measured_on_cpu():
    """Issue 14's CPU check, on the course's offline LLM (SmolLM2-135M, 49,152-word vocabulary):
    what a step adds to the loaded model, against the live tensors' peak (the resident set
    holds the C allocator's reserve too: bench/qlora.py prints both)."""
    from transformers import AutoModelForCausalLM

    from minipeft import course
    from minipeft.qlora import prepare_for_training

    model = AutoModelForCausalLM.from_pretrained(course.model_source("llm", "offline"))
    model = prepare_for_training(add_lora(quantize_model(model), LoraConfig(
        target_modules=list(Shape.of(model.config).linear_layers()), r=16)))
    ids = torch.randint(100, 40000, (2, 128), generator=torch.Generator().manual_seed(0))
    assert_plan_within_15_percent(model, {"input_ids": ids, "labels": ids}, "qlora", rank=16)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_plan_of_a_bert_step_is_within_15_percent_of_the_tensors_measured_on_cpu(method):
    """The offline "bert" (MiniLM), LoRA on query and value or full fine-tuning, batch 16 x 128:
    with attention dropout on, PyTorch's CPU attention keeps each head's s x s probabilities for
    backward (over 40 % of the LoRA step's tensors, a quarter of full fine-tuning's), which
    attention="math" counts."""
    from transformers import AutoModelForSequenceClassification

    from minipeft import course

    model = AutoModelForSequenceClassification.from_pretrained(
        course.model_source("bert", "offline"), num_labels=2)
    assert Shape.of(model.config).attention_dropout == 0.1
    if method == "lora":
        model = add_lora(model, LoraConfig(target_modules=["query", "value"], r=8,
                                           modules_to_save=["classifier"]))
    ids = torch.randint(1000, 20000, (16, 128), generator=torch.Generator().manual_seed(0))
    assert_plan_within_15_percent(model, {"input_ids": ids, "labels": torch.zeros(16).long()},
                                  method, rank=8, targets="attention", checkpointing=False,
                                  attention="math")


def test_the_attention_matrices_count_only_on_the_math_path_with_dropout():
    config = dict(load_config("llama-2-7b"), attention_dropout=0.1)
    fused, math = plan(config, seq_len=1024), plan(config, seq_len=1024, attention="math")
    # with checkpointing, one block's: b h s^2 values of 2 x 2 + 1 bytes (bf16 and a mask)
    assert math.activations - fused.activations == 32 * 1024 ** 2 * 5
    assert plan(load_config("llama-2-7b"), attention="math") == plan(load_config("llama-2-7b"))
    with pytest.raises(ValueError, match="attention must be 'fused' or 'math'"):
        plan(config, attention="flash")


def test_configs_the_planner_cannot_count_are_refused():
    with pytest.raises(ValueError, match="lacks.*intermediate_size"):
        plan({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ValueError, match="'gpt2' is not one the planner counts"):
        plan({"model_type": "gpt2", "hidden_size": 8, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10})
    with pytest.raises(ValueError, match="no shipped config"):
        load_config("llama-3-70b")
    with pytest.raises(ValueError, match="method must be"):
        plan(load_config("llama-2-7b"), "dora")


def parameters_of(model_class: type, config: transformers.PretrainedConfig) -> int:
    """The parameter count of a model built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_counts_exactly_the_parameters_of_its_transformers_model(name):
    fields = load_config(name)
    shape = Shape.of(fields)
    billions = {"7b": (6e9, 8e9), "13b": (12e9, 14e9), "70b": (68e9, 70e9)}[name.split("-")[-1]]
    assert billions[0] < shape.linear_params() + shape.other_params() < billions[1]
    model_class = transformers.AutoModelForCausalLM.from_config
    assert shape.linear_params() + shape.other_params() == parameters_of(
        model_class, transformers.AutoConfig.for_model(**fields))


@pytest.mark.parametrize("size", [
    {},                                                                     # bert-base: 110 M
    dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6),    # MiniLM-L6's shapes
])
def test_bert_counts_exactly_the_parameters_of_its_transformers_model(size):
    config = transformers.BertConfig(**size)
    shape = Shape.of(config)
    assert shape.linear_params() + shape.other_params() == parameters_of(transformers.BertModel,
                                                                          config)
    assert plan(config, "lora", targets=["query", "value"], rank=8).trainable_params \
        == config.num_hidden_layers * 2 * 8 * (config.hidden_size + config.hidden_size)


def test_ddp_keeps_everything_on_every_gpu_and_adds_the_gradient_buckets():
    config = load_config("llama-2-7b")
    one, two = plan(config, "qlora"), plan(config, "qlora", gpus=2, strategy="ddp")
    assert two.total - one.total == two.communication == 4 * one.trainable_params
    full = plan(config, "full", gpus=2, strategy="ddp")
    assert full.communication == 2 * full.trainable_params     # bf16 gradients, all of them


def test_fsdp_divides_weights_and_state_and_adds_two_gathered_blocks():
    config = load_config("llama-2-70b")
    one, eight = plan(config, "qlora"), plan(config, "qlora", gpus=8)
    assert eight.quantized_weights == one.quantized_weights // 8
    assert eight.trainable_state == one.trainable_state // 8
    assert eight.activations == one.activations and eight.logits == one.logits
    shape = Shape.of(config)
    block_codes, outer_unit = shape.linear_params() // 80 // 2, 2 * shape.other_params()
    assert 2 * block_codes + outer_unit < eight.communication < 2.1 * block_codes + outer_unit
    offloaded = plan(config, "qlora", gpus=2, cpu_offload=True)
    assert offloaded.quantized_weights == offloaded.trainable_state == 0
    assert offloaded.total == offloaded.activations + offloaded.logits + offloaded.communication
    # 70B QLoRA at 512 tokens, one sequence per GPU: not on one 24 GB card, on two of them
    assert plan(config, "qlora", seq_len=512).total > 24e9
    assert plan(config, "qlora", seq_len=512, gpus=2).total < 24e9


def test_settings_for_several_gpus_that_make_no_sense_are_refused():
    config = load_config("llama-2-7b")
    with pytest.raises(ValueError, match="gpus must be a whole number"):
        plan(config, gpus=0)
    with pytest.raises(ValueError, match="strategy 'ddp' or 'fsdp'"):
        plan(config, gpus=2, strategy="zero3")
    with pytest.raises(ValueError, match="names of llama's linear layers"):
        plan(config, targets=["q_proj", "query"])
    with pytest.raises(ValueError, match="cpu_offload is FSDP's"):
        plan(config, gpus=2, strategy="ddp", cpu_offload=True)


def test_targets_by_name_count_only_those_layers():
    config = load_config("llama-2-7b")
    named = plan(config, "qlora", rank=64, targets=["q_proj", "k_proj", "v_proj", "gate_proj",
                                                   "up_proj", "down_proj"])
    assert plan(config, "qlora", rank=64).trainable_params - named.trainable_params \
        == 32 * 64 * (4096 + 4096)                                   # o_proj's A and B, left out
    assert plan(config, targets=["q_proj", "v_proj"]) == plan(config, targets="attention")
