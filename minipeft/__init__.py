"""minipeft: parameter-efficient fine-tuning built from scratch.

One module per method, each short enough to read in one sitting:

- `minipeft.course`     the course runtime: profile, models, data, banner
- `minipeft.data`       the offline sentiment data set the course makes itself
- `minipeft.training`   the small train / evaluate loop every lesson reuses
- `minipeft.memory`     parameter counts and memory accounting
- `minipeft.lora`       LoRA (Hu et al., 2021)
- `minipeft.adapter_io` saving and loading adapters (safetensors), and peft's adapter format
- `minipeft.quant`      NF4 quantisation (Dettmers et al., 2023): the format, in PyTorch operations
- `minipeft.quant_c`    its CPU dequantisation kernel in C (nf4_dequantize.c, built on first use)
- `minipeft.quant_triton` its CUDA kernels in Triton
- `minipeft.checks`     what each exercise checks: cases, reference, usual mistakes and their hints
- `minipeft.grading`    `check()` for instant feedback, and `python -m minipeft.grading NB`
- `minipeft.exercises`  generates exercises/ from solutions/

minipeft never imports peft or bitsandbytes: those are the references the tests compare against.
"""
__version__ = "0.1.0"
