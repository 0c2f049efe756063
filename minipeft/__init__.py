"""minipeft: parameter-efficient fine-tuning built from scratch.

The methods, one idea per module, each short enough to read in one sitting:

- `minipeft.lora`         LoRA (Hu et al., 2021), and rsLoRA's scaling
- `minipeft.inject`       what every method does to a model: match names, replace modules,
                          modules_to_save, collect an adapter's weights
- `minipeft.adapter_io`   saving and loading adapters (safetensors + JSON), and peft's format
- `minipeft.memory`       parameter counts and memory accounting, predicted and measured
- `minipeft.quant`        NF4 quantisation (Dettmers et al., 2023): the format, its reference path,
                          Linear4bit, and the choice of a fast path
- `minipeft.quant_cpu`    NF4 by table lookups in PyTorch operations (fast on the CPU)
- `minipeft.quant_c`      NF4 dequantisation in C (nf4_dequantize.c, built on first use)
- `minipeft.quant_triton` NF4 on CUDA, in Triton

They need torch and safetensors only (triton on CUDA; GCC optional).

`minipeft.course` is the course around them (setup, models and data, the training loop, feedback
on exercises, the grader); it needs the `course` extra.

minipeft never imports peft or bitsandbytes: those are the references the tests compare against.
"""
__version__ = "0.1.0"
