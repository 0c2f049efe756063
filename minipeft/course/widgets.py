"""Interactive tools for the lessons: sliders and menus that redraw a figure.

    from minipeft.course import widgets
    widgets.will_it_fit()                      # the memory planner, for any model, method and GPU
    widgets.rank_explorer(delta, accuracy)     # lesson 2: the best rank-r update, its error
    widgets.nf4_explorer(weight)               # lesson 6: a block of weights, its codes, the error
    training.train(...)                        # in a notebook: a live loss curve (TrainingView)

Each tool is a figure function of its settings (`fit_figure`, `rank_figure`, `nf4_figure`,
`training_figure`: tested without a browser) and controls that redraw it. Where there is no widget
frontend to draw them (`MINIPEFT_WIDGETS=static`, which `make test` and `make lessons` set; a
script; a terminal), a tool draws its figure once, at its default settings, so that a committed
notebook shows a picture on GitHub instead of a widget that cannot load.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from minipeft import planner, quant

WIDGET_MODES = ("interactive", "static")
GIB = 2**30
GPUS = planner.GPUS
# The 4-bit tables of lesson 6, as fractions of a block's absmax: int4 has 15 evenly spaced
# levels; FP4 (e2m1, bitsandbytes' fp4 values) is dense near 0 and sparse at the ends; NF4 puts
# its 16 levels at the quantiles of a normal distribution (QLoRA, Dettmers et al. 2023).
_FP4 = torch.tensor([0, 0.0625, 2, 3, 4, 6, 8, 12]) / 12
LEVELS = {"int8": torch.arange(-127, 128) / 127, "int4": torch.arange(-7, 8) / 7,
          "FP4": torch.cat([-_FP4.flip(0), _FP4[1:]]), "NF4": quant.NF4_CODE}
TOOL_CLASS = "minipeft-tool"     # the CSS class of every tool's box (the browser test finds it)


def widget_mode() -> str:
    """`MINIPEFT_WIDGETS`: "interactive" (the default) or "static" (figures only)."""
    mode = os.environ.get("MINIPEFT_WIDGETS", "interactive").strip().lower()
    if mode not in WIDGET_MODES:
        raise ValueError(f"MINIPEFT_WIDGETS={mode!r} is not a widget mode: use one of "
                         f"{WIDGET_MODES}")
    return mode


def interactive() -> bool:
    """True in a Jupyter kernel with ipywidgets, unless `MINIPEFT_WIDGETS=static`."""
    if widget_mode() == "static":
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def _display_figure(figure: Figure) -> None:
    from IPython.display import display

    display(figure)
    plt.close(figure)


def _tool(draw: Callable[..., Figure], controls: dict[str, Any], defaults: dict[str, Any]):
    """`draw(**defaults)` as a figure, or a box of `controls` above the figure they redraw."""
    if not interactive():
        _display_figure(draw(**defaults))
        return None
    import ipywidgets

    output = ipywidgets.Output()

    def redraw(**values: Any) -> None:
        with output:
            output.clear_output(wait=True)
            _display_figure(draw(**values))

    box = ipywidgets.VBox([ipywidgets.HBox(list(controls.values()),
                                           layout=ipywidgets.Layout(flex_flow="row wrap")),
                           output])
    box.add_class(TOOL_CLASS)
    ipywidgets.interactive_output(redraw, controls)
    return box


# --------------------------------------------------------------------------------------------------
# Will it fit? The memory planner as a stacked bar against a GPU's memory
# --------------------------------------------------------------------------------------------------


def fit_figure(model: str, method: planner.Method, gpu: str, batch: int, seq_len: int,
               rank: int = 16, checkpointing: bool = True,
               configs: dict[str, Any] | None = None) -> Figure:
    """One bar: the planner's items for `model` (a shipped config's name, or a key of `configs`),
    stacked in GiB, with `gpu`'s memory as a dashed line."""
    config = (configs or {}).get(model) or planner.load_config(model)
    plan = planner.plan(config, method, batch=batch, seq_len=seq_len, rank=rank,
                        checkpointing=checkpointing)
    capacity = GPUS[gpu]
    items = {k: v / GIB for k, v in plan.rows().items() if k != "total" and v > 0}
    figure, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for name, gib in items.items():
        ax.barh(0, gib, left=left, label=f"{name}: {gib:.2f}", height=0.5)
        left += gib
    ax.axvline(capacity, color="k", ls="--", lw=1.2)
    ax.text(capacity, 0.3, f" {gpu}: {capacity} GiB", fontsize=8, va="bottom")
    total = plan.total / GIB
    verdict = "fits" if total < capacity else "does not fit"
    ax.set(xlim=(0, 1.15 * max(total, capacity)), ylim=(-0.35, 0.45), yticks=[], xlabel="GiB",
           title=f"{model}, {method}{f' r={rank}' if method != 'full' else ''}, batch {batch} x "
                 f"{seq_len} tokens{'' if checkpointing else ', no checkpointing'}: "
                 f"{total:.2f} GiB, {verdict}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False)
    figure.tight_layout()
    return figure


def will_it_fit(configs: dict[str, Any] | None = None, model: str = "llama-2-7b",
                method: planner.Method = "qlora", gpu: str = "T4 (16 GB)", batch: int = 1,
                seq_len: int = 512, rank: int = 16):
    """Pick a model, a method, a GPU, the batch and the sequence length: the planner's breakdown
    against the GPU's memory. `configs`: more models by name (transformers configs or dicts)."""
    import ipywidgets as w

    names = [*planner.SHIPPED, *(configs or {})]
    controls = {"model": w.Dropdown(options=names, value=model, description="model"),
                "method": w.Dropdown(options=["full", "lora", "qlora"], value=method,
                                     description="method"),
                "gpu": w.Dropdown(options=list(GPUS), value=gpu, description="GPU"),
                "batch": w.IntSlider(value=batch, min=1, max=32, description="batch"),
                "seq_len": w.SelectionSlider(options=[128, 256, 512, 1024, 2048, 4096, 8192],
                                             value=seq_len, description="tokens"),
                "rank": w.SelectionSlider(options=[4, 8, 16, 32, 64, 128], value=rank,
                                          description="rank r"),
                "checkpointing": w.Checkbox(value=True, description="checkpointing")}
    defaults = {k: c.value for k, c in controls.items()}

    def draw(**settings: Any) -> Figure:
        return fit_figure(**settings, configs=configs)

    return _tool(draw, controls, defaults)


# --------------------------------------------------------------------------------------------------
# LoRA rank explorer: the best rank-r approximation of a fine-tuning update (lesson 2)
# --------------------------------------------------------------------------------------------------


def relative_errors(delta: torch.Tensor) -> torch.Tensor:
    """For r = 1 .. min(shape): ||ΔW - ΔW_r||_F / ||ΔW||_F of the best rank-r approximation ΔW_r
    (Eckart-Young): sqrt(1 - energy(r)), energy(r) = sum of the r largest σ² / sum of all σ²."""
    energy = torch.linalg.svdvals(delta.float()).square().cumsum(0)
    return (1 - energy / energy[-1]).clamp(min=0).sqrt()


def rank_figure(errors: torch.Tensor, r: int, shape: tuple[int, int],
                accuracy: dict[int, float] | None = None, name: str = "ΔW") -> Figure:
    """The error of the best rank-r update against r, the chosen r marked; with `accuracy`
    (measured at a few ranks), the accuracy each keeps."""
    d_out, d_in = shape
    panels = 2 if accuracy else 1
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.0), squeeze=False)
    ax = axes[0, 0]
    ranks = torch.arange(1, len(errors) + 1)
    ax.plot(ranks, errors, lw=1.5)
    ax.scatter([r], [errors[r - 1]], color="C3", zorder=3)
    params = r * (d_out + d_in)
    ax.set(xscale="log", xlabel="rank r", ylabel="relative error of ΔW_r", ylim=(0, 1.02),
           title=f"{name} ({d_out}x{d_in}), r={r}: error {errors[r - 1]:.3f}\n"
                 f"B and A: {params:,} numbers ({100 * params / (d_out * d_in):.2f} % of the "
                 "layer)")
    ax.title.set_fontsize(9)
    if accuracy:
        ax = axes[0, 1]
        measured = sorted(accuracy)
        ax.plot(measured, [accuracy[k] for k in measured], marker="o")
        kept = max((k for k in measured if k <= r), default=measured[0])
        ax.scatter([kept], [accuracy[kept]], color="C3", zorder=3)
        ax.set(xscale="log", xlabel="rank r (every layer)", ylabel="accuracy",
               title=f"accuracy kept at r={kept}: {accuracy[kept]:.3f}")
        ax.set_xticks(measured, [str(k) for k in measured])
        ax.minorticks_off()
        ax.title.set_fontsize(9)
    figure.tight_layout()
    return figure


def rank_explorer(delta: torch.Tensor, accuracy: dict[int, float] | None = None,
                  name: str = "ΔW", r: int = 8):
    """A rank slider over the SVD of `delta` (one layer's fine-tuning update), with the
    reconstruction error and, given `accuracy` {rank: accuracy}, the accuracy each rank kept."""
    import ipywidgets as w

    errors = relative_errors(delta)
    slider = w.IntSlider(value=min(r, len(errors)), min=1, max=len(errors), description="rank r")

    def draw(r: int) -> Figure:
        return rank_figure(errors, r, tuple(delta.shape), accuracy, name)

    return _tool(draw, {"r": slider}, {"r": slider.value})


# --------------------------------------------------------------------------------------------------
# NF4 explorer: a block of real weights, the levels of each 4-bit format, and the error (lesson 6)
# --------------------------------------------------------------------------------------------------


def roundtrip(weights: torch.Tensor, fmt: str, blocksize: int = 64) -> torch.Tensor:
    """Blockwise absmax scaling, the nearest level of `fmt`'s table, and back (lesson 6)."""
    table = LEVELS[fmt]
    blocks = weights.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    index = torch.bucketize(blocks / absmax, (table[:-1] + table[1:]) / 2)
    return (table[index] * absmax).reshape(weights.shape)


def nf4_figure(weights: torch.Tensor, block: int, fmt: str, blocksize: int = 64) -> Figure:
    """Block `block` of `weights` (flattened) and what `fmt` makes of it: each weight against its
    level, the levels as lines, the block's and the whole tensor's relative error."""
    flat = weights.detach().float().reshape(-1)[: weights.numel() // blocksize * blocksize]
    restored = roundtrip(flat, fmt, blocksize)
    start = block * blocksize
    original, rounded = flat[start:start + blocksize], restored[start:start + blocksize]
    absmax = original.abs().max().item()

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / a.norm().clamp(min=1e-30)).item()

    figure, ax = plt.subplots(figsize=(8, 3.2))
    if len(LEVELS[fmt]) <= 16:
        for level in LEVELS[fmt] * absmax:
            ax.axhline(level.item(), color="grey", lw=0.5, alpha=0.6)
    positions = torch.arange(blocksize)
    ax.vlines(positions, original, rounded, color="C3", lw=1)
    ax.scatter(positions, original, s=14, label="weight")
    ax.scatter(positions, rounded, s=14, marker="_", color="k", label=f"{fmt} value")
    ax.set(xlabel=f"position in block {block} ({blocksize} weights)", ylabel="value",
           title=f"{fmt}: relative error {error(original, rounded):.4f} in this block, "
                 f"{error(flat, restored):.4f} over the whole tensor")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    return figure


def nf4_explorer(weights: torch.Tensor, block: int = 0, fmt: str = "NF4", blocksize: int = 64):
    """Pick a block of `weights` and a format (int8, int4, FP4, NF4): its weights, the levels
    they snap to, and the error."""
    import ipywidgets as w

    blocks = weights.numel() // blocksize
    if blocks == 0:
        raise ValueError(f"nf4_explorer needs at least one block of {blocksize} weights; got "
                         f"{weights.numel()}")
    controls = {"block": w.IntSlider(value=block, min=0, max=blocks - 1, description="block"),
                "fmt": w.ToggleButtons(options=list(LEVELS), value=fmt, description="format")}

    def draw(block: int, fmt: str) -> Figure:
        return nf4_figure(weights, block, fmt, blocksize)

    return _tool(draw, controls, {"block": block, "fmt": fmt})


# --------------------------------------------------------------------------------------------------
# Live training view: the loss curve as it is drawn (training.train, progress "live", in a kernel)
# --------------------------------------------------------------------------------------------------


def training_figure(losses: list[float], val_accuracy: list[tuple[int, float]], total: int,
                    desc: str) -> Figure:
    """Loss per step (and validation accuracy, when measured) of a run of `total` steps."""
    figure, ax = plt.subplots(figsize=(7, 2.8))
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2, label="training loss")
    ax.set(xlim=(0, max(total, 1)), xlabel="step", ylabel="loss",
           title=f"{desc}: step {len(losses)} of {total}"
                 + (f", loss {losses[-1]:.3f}" if losses else ""))
    if val_accuracy:
        twin = ax.twinx()
        twin.plot(*zip(*val_accuracy), color="C1", marker="o", label="validation accuracy")
        twin.set(ylim=(0, 1.02), ylabel="validation accuracy")
        twin.legend(fontsize=7, loc="center right")
    ax.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    return figure


class TrainingView:
    """A live loss curve in a notebook, redrawn at most once every `interval` seconds."""

    def __init__(self, desc: str, total: int, interval: float = 1.0):
        import ipywidgets
        from IPython.display import display

        self.desc, self.total, self.interval = desc, total, interval
        self.output = ipywidgets.Output()
        self.output.add_class(TOOL_CLASS)
        self._drawn = 0.0
        display(self.output)

    def update(self, losses: list[float], val_accuracy: list[tuple[int, float]],
               force: bool = False) -> None:
        if not force and time.monotonic() - self._drawn < self.interval:
            return
        self._drawn = time.monotonic()
        with self.output:
            self.output.clear_output(wait=True)
            _display_figure(training_figure(losses, val_accuracy, self.total, self.desc))
