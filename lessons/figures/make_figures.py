"""Draw the course's method diagrams: LoRA, adapters, prompt/prefix tuning, NF4, LoRA in a layer,
QLoRA, DDP and FSDP, and lesson 8's guide to choosing a method.

Run it from the repository root:

    python lessons/figures/make_figures.py

It writes lora.png, adapters.png, prompts.png, nf4.png, lora_in_block.png, qlora.png,
distributed.png and choosing.png next to it
(lessons/figures/), then embeds each into the lessons whose markdown shows it
(`![...](attachment:lora.png)`), so that the figures show offline, on GitHub and on Colab, where a
notebook opens without the files beside it (tests/test_notebooks.py checks the copies are
current). Only matplotlib and numpy are used, with a fixed seed and no timestamp in the PNG
metadata, so two runs give byte-identical files. The colours are the same in every figure:
orange for trainable parameters, grey-blue for frozen ones (Okabe-Ito based, readable with the
common colour-vision deficiencies).
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Circle, FancyBboxPatch, Patch, Polygon, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
DPI = 120
WIDTH = 10.0  # inches

TRAINABLE = "#E69F00"  # Okabe-Ito orange: parameters that receive gradients
FROZEN = "#A9BCD0"  # grey-blue: pretrained parameters that stay fixed
ACTIVATION = "#FFFFFF"  # vectors flowing through the network
PANEL = "#F5F7FA"  # background of grouping frames
INK = "#222222"
MUTED = "#5A5A5A"
VALUE = "#0072B2"  # Okabe-Ito blue: scaled weights in the NF4 figure
SNAPPED = "#D55E00"  # Okabe-Ito vermillion: their NF4 levels

NF4_LEVELS = np.array([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734,
                       -0.09105004, 0.0, 0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098,
                       0.5626170, 0.7229568, 1.0], dtype=np.float32)
NF4_BLOCKSIZE = 64
SEED = 0

Point = tuple[float, float]


# -------------------------------------------------------------------------------------- drawing kit

def _canvas(height: float, title: str) -> tuple[Figure, Axes]:
    """A WIDTH x height figure with one frameless axes whose data units are inches."""
    fig = plt.figure(figsize=(WIDTH, height), facecolor="white")
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.text(WIDTH / 2, height - 0.32, title, ha="center", va="center", fontsize=14,
            weight="bold", color=INK)
    return fig, ax


def _box(ax: Axes, x: float, y: float, w: float, h: float, color: str, text: str = "", *,
         fontsize: float = 10, rotation: float = 0) -> None:
    """A rounded rectangle with lower-left corner (x, y) and optional centred text."""
    rounding = min(0.06, w / 3, h / 3)
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={rounding}",
                                facecolor=color, edgecolor=INK, linewidth=1.2))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize,
                rotation=rotation, color=INK)


def _arrow(ax: Axes, *points: Point) -> None:
    """A polyline through `points` with an arrowhead at the last one."""
    if len(points) > 2:
        xs, ys = zip(*points[:-1])
        ax.plot(xs, ys, color=INK, linewidth=1.3, solid_capstyle="butt")
    ax.annotate("", xy=points[-1], xytext=points[-2],
                arrowprops={"arrowstyle": "-|>", "color": INK, "linewidth": 1.3,
                            "shrinkA": 0, "shrinkB": 0, "mutation_scale": 13})


def _dot(ax: Axes, point: Point) -> None:
    """A small filled circle where a line branches."""
    ax.add_patch(Circle(point, 0.045, color=INK, zorder=3))


def _plus(ax: Axes, center: Point, radius: float = 0.22) -> None:
    """A summation node."""
    ax.add_patch(Circle(center, radius, facecolor="white", edgecolor=INK, linewidth=1.3,
                        zorder=3))
    ax.text(center[0], center[1], "+", ha="center", va="center", fontsize=15 * radius / 0.22,
            zorder=4)


def _legend(ax: Axes, anchor: Point, height: float, ncol: int = 2) -> None:
    """The trainable / frozen legend, its top centre at `anchor` (inches)."""
    handles = [Patch(facecolor=TRAINABLE, edgecolor=INK, label="trainable"),
               Patch(facecolor=FROZEN, edgecolor=INK, label="frozen")]
    ax.legend(handles=handles, loc="upper center", ncol=ncol, fontsize=10, frameon=False,
              bbox_to_anchor=(anchor[0] / WIDTH, anchor[1] / height), handlelength=1.6,
              columnspacing=1.8)


def _save(fig: Figure, name: str) -> None:
    """Write a PNG next to this script without a Software/date entry, so reruns are identical."""
    fig.savefig(HERE / name, dpi=DPI, facecolor="white", metadata={"Software": None},
                pil_kwargs={"optimize": True})
    plt.close(fig)


# --------------------------------------------------------------------------------------------- LoRA

def draw_lora() -> None:
    """lora.png: h = W0 x + (alpha / r) B A x, with A and B drawn thin to show the low rank."""
    height = 6.6
    fig, ax = _canvas(height, "LoRA: a frozen linear layer plus a trainable low-rank update")
    _legend(ax, (8.9, 5.85), height, ncol=1)
    d, r = 2.2, 0.32  # drawn sizes of d_in = d_out and of the rank r

    # Input vector and the branch point.
    _box(ax, 0.45, 2.4, r, d, ACTIVATION, r"input $x$   ($d_{in}$)", rotation=90)
    ax.plot([0.45 + r, 1.5], [3.5, 3.5], color=INK, linewidth=1.3)
    _dot(ax, (1.5, 3.5))
    _arrow(ax, (1.5, 3.5), (1.5, 4.7), (2.3, 4.7))
    _arrow(ax, (1.5, 3.5), (1.5, 2.1), (2.3, 2.1))

    # Frozen path: the full d_out x d_in matrix.
    _box(ax, 2.3, 3.6, d, d, FROZEN,
         "$W_0$\n\n" r"$d_{out} \times d_{in}$" "\n\nfrozen", fontsize=12)
    _arrow(ax, (2.3 + d, 4.7), (8.0, 4.7), (8.0, 3.72))
    ax.text(6.2, 4.8, "$W_0 x$", ha="center", va="bottom", fontsize=11)

    # Trainable path: A (r x d_in), the r-dimensional A x, B (d_out x r), the scale s.
    _box(ax, 2.3, 1.94, d, r, TRAINABLE, "A: random init")
    ax.text(2.3 + d / 2, 1.84, r"$r \times d_{in}$", ha="center", va="top", fontsize=10)
    _arrow(ax, (2.3 + d, 2.1), (4.85, 2.1))
    _box(ax, 4.85, 1.94, r, r, ACTIVATION)
    ax.text(4.85 + r / 2, 1.84, "$Ax$\n($r$)", ha="center", va="top", fontsize=10)
    _arrow(ax, (4.85 + r, 2.1), (5.55, 2.1))
    _box(ax, 5.55, 1.0, r, d, TRAINABLE, "B = 0 at init", rotation=90)
    ax.text(5.55 + r / 2, 0.9, r"$d_{out} \times r$", ha="center", va="top", fontsize=10)
    _arrow(ax, (5.55 + r, 2.1), (6.55, 2.1))
    ax.text(6.21, 2.2, "$BAx$", ha="center", va="bottom", fontsize=11)
    ax.add_patch(Circle((6.85, 2.1), 0.3, facecolor="white", edgecolor=INK, linewidth=1.3))
    ax.text(6.85, 2.1, r"$\times\, s$", ha="center", va="center", fontsize=12)
    ax.text(6.85, 1.7, r"$s = \alpha / r$", ha="center", va="top", fontsize=11)
    _arrow(ax, (7.15, 2.1), (8.0, 2.1), (8.0, 3.28))

    # Sum and output.
    _plus(ax, (8.0, 3.5))
    _arrow(ax, (8.22, 3.5), (8.95, 3.5))
    _box(ax, 8.95, 2.4, r, d, ACTIVATION, r"output $h$   ($d_{out}$)", rotation=90)

    ax.text(0.45, 0.55, r"$h = W_0\,x + \dfrac{\alpha}{r}\,B\,A\,x$", ha="left", va="center",
            fontsize=16)
    ax.text(WIDTH - 0.3, 0.55,
            "rank $r \\ll d$: trains $r\\,(d_{in} + d_{out})$ values\n"
            "instead of $d_{out}\\,d_{in}$; $BA = 0$ at init, so the layer\n"
            "starts out exactly as the pretrained one",
            ha="right", va="center", fontsize=10, color=MUTED, linespacing=1.5)
    _save(fig, "lora.png")


# ----------------------------------------------------------------------------------------- adapters

def _transformer_block(ax: Axes, x0: float, name: str, where: str, after_attention: bool) -> None:
    """One encoder block drawn bottom-up in a 2.5-inch column, with its adapters in orange."""
    bx, bw = x0 + 0.5, 1.9
    cx, skip_x = bx + bw / 2, x0 + 0.2
    ax.text(cx, 6.45, name, ha="center", va="center", fontsize=12, weight="bold")
    ax.text(cx, 6.2, where, ha="center", va="center", fontsize=9.5, color=MUTED)

    ax.text(cx, 0.62, "hidden states in", ha="center", va="top", fontsize=9.5)
    _arrow(ax, (cx, 0.68), (cx, 1.1))
    _box(ax, bx, 1.1, bw, 0.5, FROZEN, "Multi-head attention")
    if after_attention:
        _arrow(ax, (cx, 1.6), (cx, 1.95))
        _box(ax, bx, 1.95, bw, 0.4, TRAINABLE, "Adapter")
        _arrow(ax, (cx, 2.35), (cx, 2.7))
    else:
        _arrow(ax, (cx, 1.6), (cx, 2.7))
    _box(ax, bx, 2.7, bw, 0.4, FROZEN, "Add & LayerNorm")
    _arrow(ax, (cx, 3.1), (cx, 3.5))
    _box(ax, bx, 3.5, bw, 0.5, FROZEN, "Feed-forward")
    _arrow(ax, (cx, 4.0), (cx, 4.35))
    _box(ax, bx, 4.35, bw, 0.4, TRAINABLE, "Adapter")
    _arrow(ax, (cx, 4.75), (cx, 5.1))
    _box(ax, bx, 5.1, bw, 0.4, FROZEN, "Add & LayerNorm")
    _arrow(ax, (cx, 5.5), (cx, 5.8))
    ax.text(cx, 5.83, "hidden states out", ha="center", va="bottom", fontsize=9.5)

    # The block's own residual connections around each sublayer.
    for start, end in ((0.88, 2.9), (3.3, 5.3)):
        _dot(ax, (cx, start))
        _arrow(ax, (cx, start), (skip_x, start), (skip_x, end), (bx, end))


def draw_adapters() -> None:
    """adapters.png: where Houlsby and Pfeiffer put bottleneck adapters, and one adapter zoomed."""
    height = 7.6
    fig, ax = _canvas(height, "Bottleneck adapters: small trainable modules inside a frozen block")
    _legend(ax, (2.75, height - 0.55), height)
    _transformer_block(ax, 0.1, "Houlsby", "after attention and after feed-forward", True)
    _transformer_block(ax, 2.75, "Pfeiffer", "after feed-forward only", False)

    # Zoom frame, tied to Pfeiffer's adapter.
    fx, fy, fw, fh = 5.7, 0.3, 4.15, 6.3
    ax.add_patch(Rectangle((fx, fy), fw, fh, facecolor=PANEL, edgecolor=MUTED,
                           linestyle="--", linewidth=1.0))
    for box_y, frame_y in ((4.75, fy + fh), (4.35, fy)):
        ax.plot([5.15, fx], [box_y, frame_y], color=MUTED, linestyle="--", linewidth=1.0)
    cz, wide, narrow = 8.0, 2.4, 0.6
    ax.text(fx + fw / 2, 6.35, "Inside an adapter", ha="center", va="center", fontsize=12,
            weight="bold")

    _box(ax, cz - wide / 2, 1.0, wide, 0.3, ACTIVATION, "$z$   (hidden size $d$)", fontsize=10)
    _arrow(ax, (cz, 1.3), (cz, 1.6))
    _trapezoid(ax, cz, 1.6, wide, narrow, 0.9, "down-projection\n$W_{down},\\ b_{down}$",
               fontsize=9.5, text_y=1.93)
    _arrow(ax, (cz, 2.5), (cz, 2.75))
    _box(ax, cz - narrow / 2, 2.75, narrow, 0.4, ACTIVATION, "$f$", fontsize=13)
    ax.text(cz + 0.45, 2.95, "nonlinearity\n(e.g. ReLU)", ha="left", va="center", fontsize=9.5)
    ax.text(cz - 0.45, 2.95, "width:\nhidden size /\nreduction_factor", ha="right",
            va="center", fontsize=9.5)
    _arrow(ax, (cz, 3.15), (cz, 3.4))
    _trapezoid(ax, cz, 3.4, narrow, wide, 0.9, "up-projection\n$W_{up},\\ b_{up}$",
               fontsize=9.5, text_y=3.97)
    _arrow(ax, (cz, 4.3), (cz, 4.73))
    ax.text(cz + 0.1, 4.5, "$A(z)$", ha="left", va="center", fontsize=10.5)
    _plus(ax, (cz, 4.95))
    skip_x = cz - wide / 2 - 0.6
    _arrow(ax, (cz - wide / 2, 1.15), (skip_x, 1.15), (skip_x, 4.95), (cz - 0.22, 4.95))
    ax.text(skip_x - 0.12, 3.0, "residual skip (identity)", ha="center", va="center",
            fontsize=9.5, rotation=90)
    _arrow(ax, (cz, 5.17), (cz, 5.45))
    _box(ax, cz - wide / 2, 5.45, wide, 0.3, ACTIVATION, "$z + A(z)$", fontsize=10.5)

    ax.text(fx + fw / 2, 0.6, r"$A(z) = W_{up}\ f\,(W_{down}\,z + b_{down}) + b_{up}$",
            ha="center", va="center", fontsize=12.5)
    _save(fig, "adapters.png")


# ------------------------------------------------------------------------------- prompts / prefixes

def _prompt_tuning_panel(ax: Axes) -> None:
    """Left half: trainable virtual-token embeddings prepended at the embedding layer."""
    ax.text(2.5, 5.15, "Prompt tuning", ha="center", va="center", fontsize=12, weight="bold")
    ax.text(2.5, 4.9, "trainable embeddings prepended to the input, once", ha="center",
            va="center", fontsize=9.5, color=MUTED)
    slot_w, step, x0 = 0.48, 0.57, 0.3
    labels = ["$P_1$", "$P_2$", "...", "$P_n$", "$e_1$", "$e_2$", "$e_3$", "$e_4$"]
    words = ["the", "film", "was", "great"]
    for i, label in enumerate(labels):
        x = x0 + i * step
        cx = x + slot_w / 2
        if label == "...":
            ax.text(cx, 1.55, "...", ha="center", va="center", fontsize=12)
            continue
        color = TRAINABLE if label.startswith("$P") else FROZEN
        _box(ax, x, 1.3, slot_w, 0.5, color, label, fontsize=11)
        _arrow(ax, (cx, 1.8), (cx, 2.3))
        if i >= 4:
            ax.text(cx, 0.75, words[i - 4], ha="center", va="center", fontsize=10,
                    style="italic")
            _arrow(ax, (cx, 0.9), (cx, 1.3))
    ax.text(x0 + 1.5 * step + slot_w / 2, 1.0, "n virtual tokens\n(n × d values)", ha="center",
            va="center", fontsize=9.5)
    ax.text(x0 + 5.5 * step + slot_w / 2, 0.42, "embeddings of the input tokens", ha="center",
            va="center", fontsize=9.5, color=MUTED)
    right = x0 + 7 * step + slot_w
    _box(ax, x0, 2.3, right - x0, 1.6, FROZEN,
         "frozen transformer\n(every layer unchanged;\nsequence length n + 4)", fontsize=10.5)
    _arrow(ax, ((x0 + right) / 2, 3.9), ((x0 + right) / 2, 4.3))
    ax.text((x0 + right) / 2, 4.38, "task output", ha="center", va="bottom", fontsize=9.5)


def _prefix_layer(ax: Axes, y0: float, name: str) -> None:
    """One attention layer whose keys and values get trainable prefixes."""
    x0, w, h = 5.3, 4.45, 1.05
    ax.add_patch(Rectangle((x0, y0), w, h, facecolor=PANEL, edgecolor=MUTED, linewidth=1.0))
    ax.text(x0 + 0.2, y0 + h / 2, name, ha="center", va="center", fontsize=10, rotation=90)
    for y, letter in ((y0 + 0.57, "K"), (y0 + 0.13, "V")):
        ax.text(x0 + 0.55, y + 0.17, letter, ha="center", va="center", fontsize=11,
                weight="bold")
        for i in range(6):  # prefixes p_1 ... p_n, then the 4 input tokens' keys or values
            if i < 2:
                label, color = f"$p^{letter}_{'1n'[i]}$", TRAINABLE
            else:
                label, color = f"${letter.lower()}_{i - 1}$", FROZEN
            _box(ax, x0 + 0.8 + i * 0.5, y, 0.42, 0.34, color, label, fontsize=10)
    ax.text(x0 + 3.85, y0 + h / 2, "queries:\ninput\ntokens\nonly", ha="left", va="center",
            fontsize=8.5, color=MUTED)


def _prefix_tuning_panel(ax: Axes) -> None:
    """Right half: trainable key/value prefixes in every attention layer."""
    ax.text(7.5, 5.15, "Prefix tuning", ha="center", va="center", fontsize=12, weight="bold")
    ax.text(7.5, 4.9, "trainable keys and values prepended in every attention layer",
            ha="center", va="center", fontsize=9.5, color=MUTED)
    _prefix_layer(ax, 0.6, "layer 1")
    _arrow(ax, (7.5, 1.65), (7.5, 1.85))
    _prefix_layer(ax, 1.85, "layer 2")
    ax.text(7.5, 3.1, "...", ha="center", va="center", fontsize=14, rotation=90)
    _prefix_layer(ax, 3.35, "layer L")
    ax.text(7.5, 0.35, "n prefix keys + n prefix values per layer (2 × L × n × d values)",
            ha="center", va="center", fontsize=9.5, color=MUTED)


def draw_prompts() -> None:
    """prompts.png: prompt tuning (input embeddings) next to prefix tuning (every layer's K/V)."""
    height = 6.2
    fig, ax = _canvas(height, "Prompt tuning and prefix tuning: trainable vectors, frozen model")
    _legend(ax, (WIDTH / 2, height - 0.55), height)
    ax.plot([5.0, 5.0], [0.2, 5.3], color="#BBBBBB", linewidth=1.0)
    _prompt_tuning_panel(ax)
    _prefix_tuning_panel(ax)
    _save(fig, "prompts.png")


# ---------------------------------------------------------------------------------------------- NF4

def _nf4_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """256 seeded weights, the absmax of each 64-value block, and the NF4 index of every weight."""
    weights = np.random.default_rng(SEED).normal(0.0, 0.02, 4 * NF4_BLOCKSIZE).astype(np.float32)
    blocks = weights.reshape(-1, NF4_BLOCKSIZE)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / absmax[:, None]
    indices = np.abs(scaled[..., None] - NF4_LEVELS).argmin(axis=-1).reshape(-1)
    return weights, absmax, indices


def _nf4_blocks_axes(ax: Axes, weights: np.ndarray, absmax: np.ndarray) -> None:
    """Step 1: the row of weights, its blocks of 64 and each block's absmax."""
    n = weights.size
    ax.axvspan(-0.5, NF4_BLOCKSIZE - 0.5, color="#EDEDED", zorder=0)
    ax.bar(np.arange(n), weights, width=1.0, color=FROZEN, edgecolor="none")
    ax.axhline(0.0, color=INK, linewidth=0.6)
    top = float(absmax.max()) * 1.55
    for b, m in enumerate(absmax):
        lo, hi = b * NF4_BLOCKSIZE - 0.5, (b + 1) * NF4_BLOCKSIZE - 0.5
        if b:
            ax.axvline(lo, color=INK, linewidth=1.0)
        ax.hlines([m, -m], lo + 1, hi - 1, colors=INK, linestyles="--", linewidth=1.0)
        ax.text((lo + hi) / 2, top * 0.86, f"block {b}: absmax = {m:.4f}", ha="center",
                va="center", fontsize=9.5)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(-top, top)
    ax.set_xticks([0, 64, 128, 192, 255])
    ax.set_ylabel("weight", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.set_title("1.  256 weights, N(0, 0.02) with seed 0, in blocks of 64; each block keeps its"
                 " absmax", fontsize=10.5, loc="left")


def _nf4_levels_axes(ax: Axes, scaled: np.ndarray, indices: np.ndarray) -> None:
    """Step 2: block 0 divided by its absmax, snapped to the nearest of the 16 levels."""
    positions = np.arange(scaled.size)
    snapped = NF4_LEVELS[indices]
    ax.axvspan(-0.5, 7.5, color="#EDEDED", zorder=0)
    for level in NF4_LEVELS:
        ax.axhline(level, color="#BBBBBB", linewidth=0.7, zorder=1)
    ax.vlines(positions, scaled, snapped, colors=INK, linewidth=0.8, zorder=2)
    ax.scatter(positions, scaled, s=16, color=VALUE, zorder=3, label="value / absmax")
    ax.scatter(positions, snapped, s=42, color=SNAPPED, marker="_", linewidths=2.0, zorder=4,
               label="nearest NF4 level")
    ax.set_xlim(-0.5, scaled.size - 0.5)
    ax.set_ylim(-1.07, 1.07)
    ax.set_yticks(NF4_LEVELS, [f"{v:+.3f}" for v in NF4_LEVELS], fontsize=7.5)
    ax.set_xlabel("position in block 0", fontsize=10)
    ax.tick_params(axis="x", labelsize=9)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(NF4_LEVELS, [str(i) for i in range(16)], fontsize=7.5)
    right.set_ylabel("4-bit index q", fontsize=10)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.07), fontsize=9, ncol=2,
              frameon=False)
    ax.set_title("2.  Block 0 / absmax lies in [-1, 1]; each value snaps to the nearest NF4 level",
                 fontsize=10.5, loc="left")


def _nf4_table_axes(ax: Axes, weights: np.ndarray, absmax: float, indices: np.ndarray) -> None:
    """Step 3: the first 8 values of block 0, worked through, and their 4 packed bytes."""
    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("3.  Positions 0-7 of block 0 (grey in 2); two indices per byte, first in the"
                 " high nibble", fontsize=10.5, loc="left")
    rows = [("weight  x", [f"{v:+.4f}" for v in weights]),
            ("x / absmax", [f"{v / absmax:+.4f}" for v in weights]),
            ("nearest level", [f"{NF4_LEVELS[q]:+.4f}" for q in indices]),
            ("index  q", [str(q) for q in indices]),
            ("4 bits", [f"{q:04b}" for q in indices])]
    col0, col_w, row_h, top = 0.0, 0.1, 0.13, 0.92
    for r, (name, cells) in enumerate(rows):
        y = top - r * row_h
        ax.text(col0, y, name, ha="left", va="center", fontsize=10, weight="bold")
        for c, cell in enumerate(cells):
            ax.text(0.19 + (c + 0.5) * col_w, y, cell, ha="center", va="center", fontsize=10,
                    family="monospace", color=SNAPPED if r == 4 else INK)
    y = top - len(rows) * row_h - 0.06
    ax.text(col0, y, "packed byte", ha="left", va="center", fontsize=10, weight="bold")
    for pair in range(4):
        high, low = int(indices[2 * pair]), int(indices[2 * pair + 1])
        x = 0.19 + 2 * pair * col_w
        ax.add_patch(FancyBboxPatch((x + 0.01, y - 0.07), 2 * col_w - 0.02, 0.14,
                                    boxstyle="round,pad=0,rounding_size=0.02",
                                    facecolor="white", edgecolor=SNAPPED, linewidth=1.2,
                                    transform=ax.transAxes, mutation_aspect=0.3))
        ax.text(x + col_w, y, f"{high:04b} {low:04b} = 0x{(high << 4) | low:02X}",
                ha="center", va="center", fontsize=10, family="monospace")
    ax.text(col0, 0.0, "Per block: 32 bytes + a float32 absmax = 4.5 bits per weight;"
            " x ≈ level[q] × absmax", ha="left", va="center", fontsize=9.5, color=MUTED)


def draw_nf4() -> None:
    """nf4.png: blockwise absmax scaling, snapping to the NF4 levels, and nibble packing."""
    weights, absmax, indices = _nf4_example()
    fig = plt.figure(figsize=(WIDTH, 10.4), facecolor="white")
    grid = fig.add_gridspec(3, 1, height_ratios=[1.5, 3.6, 2.0], hspace=0.42, left=0.09,
                            right=0.9, top=0.91, bottom=0.04)
    fig.suptitle("NF4: 4-bit NormalFloat quantisation, block by block", fontsize=14,
                 weight="bold", y=0.975)
    _nf4_blocks_axes(fig.add_subplot(grid[0]), weights, absmax)
    block0 = weights[:NF4_BLOCKSIZE]
    _nf4_levels_axes(fig.add_subplot(grid[1]), block0 / absmax[0], indices[:NF4_BLOCKSIZE])
    _nf4_table_axes(fig.add_subplot(grid[2]), block0[:8], float(absmax[0]), indices[:8])
    _save(fig, "nf4.png")


# ------------------------------------------------------------------------------- LoRA in a layer

def _trapezoid(ax: Axes, cx: float, y: float, bottom: float, top: float, h: float,
               text: str, fontsize: float = 10, text_y: float | None = None) -> None:
    """A trainable projection as a trapezoid; widths `bottom` -> `top` show d -> r or r -> d."""
    ax.add_patch(Polygon([(cx - bottom / 2, y), (cx + bottom / 2, y), (cx + top / 2, y + h),
                          (cx - top / 2, y + h)], facecolor=TRAINABLE, edgecolor=INK,
                         linewidth=1.2))
    ax.text(cx, y + h / 2 if text_y is None else text_y, text, ha="center", va="center",
            fontsize=fontsize)


def _lora_branch(ax: Axes, bx: float, proj_x: float, bus_y: float, plus_y: float,
                 label_x: float) -> None:
    """A (d -> r) and B (r -> d) beside a projection at proj_x, added to its output at plus_y."""
    _arrow(ax, (bx, bus_y), (bx, 1.55))
    _trapezoid(ax, bx, 1.55, 0.6, 0.18, 0.3, "A")
    _arrow(ax, (bx, 1.85), (bx, 2.0))
    _trapezoid(ax, bx, 2.0, 0.18, 0.6, 0.3, "B")
    side = 0.16 if proj_x > bx else -0.16
    _arrow(ax, (bx, 2.3), (bx, plus_y), (proj_x - side, plus_y))
    ax.text(label_x, plus_y + 0.05, r"$\times\,\alpha/r$", ha="center", va="bottom",
            fontsize=9.5)
    _plus(ax, (proj_x, plus_y), radius=0.16)


def _lora_layer_panel(ax: Axes) -> None:
    """Left part: one frozen encoder layer with LoRA on query and value, and the trained head."""
    cx, bw = 3.1, 2.6
    bx = cx - bw / 2
    skip_x, bus_y, plus_y, attn_y = 0.45, 1.3, 2.55, 2.95
    ax.text(cx, 7.85, "Training: LoRA on query and value of every layer", ha="center",
            va="center", fontsize=12, weight="bold")
    ax.text(cx, 7.6, 'target_modules=["query", "value"],  r = 8,  α = 16', ha="center",
            va="center", fontsize=9.5, color=MUTED)

    # The encoder layer's frame, with its input from the embeddings below.
    ax.add_patch(Rectangle((0.25, 0.85), 5.55, 5.35, facecolor=PANEL, edgecolor=MUTED,
                           linestyle="--", linewidth=1.0))
    ax.text(5.12, 4.1, "× 6 layers", ha="center", va="center", fontsize=13, weight="bold")
    ax.text(5.12, 3.65, "(MiniLM; one\nlayer shown)", ha="center", va="center", fontsize=9,
            color=MUTED)
    _box(ax, bx, 0.25, bw, 0.35, FROZEN, "embeddings")
    ax.plot([cx, cx], [0.6, bus_y], color=INK, linewidth=1.3)

    # Query, key and value read the same hidden states; A and B sit beside query and value.
    projections = ((1.85, "query"), (cx, "key"), (4.35, "value"))
    ax.plot([0.95, 5.25], [bus_y, bus_y], color=INK, linewidth=1.3)
    for px, name in projections:
        _dot(ax, (px, bus_y))
        _arrow(ax, (px, bus_y), (px, 1.65))
        _box(ax, px - 0.475, 1.65, 0.95, 0.4, FROZEN, name)
    _lora_branch(ax, 0.95, 1.85, bus_y, plus_y, 1.38)
    _lora_branch(ax, 5.25, 4.35, bus_y, plus_y, 4.82)
    _arrow(ax, (1.85, 2.05), (1.85, plus_y - 0.16))
    _arrow(ax, (4.35, 2.05), (4.35, plus_y - 0.16))
    for px in (1.85, 4.35):
        _arrow(ax, (px, plus_y + 0.16), (px, attn_y))
    _arrow(ax, (cx, 2.05), (cx, attn_y))

    # The rest of the layer, bottom-up, and its two residual connections.
    _box(ax, 1.6, attn_y, 3.0, 0.4, ACTIVATION, r"softmax$(QK^\top/\sqrt{d})\,V$, 12 heads",
         fontsize=9.5)
    stack = ((3.55, 0.33, "attention output"), (4.05, 0.28, "Add & LayerNorm"),
             (4.7, 0.32, "feed-forward in + GELU"), (5.2, 0.32, "feed-forward out"),
             (5.72, 0.28, "Add & LayerNorm"))
    below = attn_y + 0.4
    for y, h, name in stack:
        _arrow(ax, (cx, below), (cx, y))
        _box(ax, bx, y, bw, h, FROZEN, name)
        below = y + h
    ax.text(bx + bw + 0.08, 4.86, "384 → 1536", ha="left", va="center", fontsize=8.5,
            color=MUTED)
    ax.text(bx + bw + 0.08, 5.36, "1536 → 384", ha="left", va="center", fontsize=8.5,
            color=MUTED)
    for start, end in ((1.05, 4.19), (4.45, 5.86)):
        _dot(ax, (cx, start))
        _arrow(ax, (cx, start), (skip_x, start), (skip_x, end), (bx, end))

    # Pooler (frozen) and the new classifier, trained in full as a saved module.
    _arrow(ax, (cx, below), (cx, 6.45))
    _box(ax, bx, 6.45, bw, 0.32, FROZEN, "pooler ([CLS])")
    _arrow(ax, (cx, 6.77), (cx, 6.97))
    _box(ax, bx, 6.97, bw, 0.36, TRAINABLE, "classifier  384 → 2")
    ax.text(bx + bw + 0.12, 7.15, "modules_to_save:\na trainable copy\nof the new head",
            ha="left", va="center", fontsize=9, linespacing=1.25)


def _merge_panel(ax: Axes) -> None:
    """Right part: W0 + (alpha / r) B A folded into one square, and the way back."""
    mid, side = 8.2, 1.1
    ax.text(mid, 7.85, "Inference: merge into one W", ha="center", va="center", fontsize=12,
            weight="bold")

    # W0 + (alpha / r) B A, with B tall and thin and A short and wide.
    y0 = 5.55
    _box(ax, 6.45, y0, side, side, FROZEN, "$W_0$", fontsize=14)
    ax.text(6.45 + side / 2, y0 - 0.1, "384 × 384", ha="center", va="top", fontsize=9.5)
    ax.text(7.72, y0 + side / 2, "+", ha="center", va="center", fontsize=16)
    ax.text(8.02, y0 + side / 2, r"$\dfrac{\alpha}{r}$", ha="center", va="center", fontsize=14)
    _box(ax, 8.28, y0, 0.2, side, TRAINABLE, "B", fontsize=9)
    _box(ax, 8.58, y0 + side - 0.2, side, 0.2, TRAINABLE, "A", fontsize=9)
    ax.text(8.58 + side / 2, y0 + side - 0.32, "B: 384 × 8\nA: 8 × 384", ha="center",
            va="top", fontsize=9.5, color=MUTED)

    # merge down, unmerge up.
    top, bottom = y0 - 0.45, 4.3
    _arrow(ax, (mid - 0.3, top), (mid - 0.3, bottom + 0.05))
    ax.text(mid - 0.4, (top + bottom) / 2, "merge", ha="right", va="center", fontsize=10.5)
    _arrow(ax, (mid + 0.3, bottom + 0.05), (mid + 0.3, top))
    ax.text(mid + 0.4, (top + bottom) / 2, "unmerge", ha="left", va="center", fontsize=10.5)

    # The merged weight: frozen base with the update folded in (orange hatching).
    wx, wy = mid - side / 2, bottom - side
    _box(ax, wx, wy, side, side, FROZEN)
    ax.add_patch(Rectangle((wx, wy), side, side, fill=False, hatch="//", edgecolor=TRAINABLE,
                           linewidth=0))
    _box(ax, wx, wy, side, side, "none")
    ax.text(mid, wy + side / 2, "$W$", ha="center", va="center", fontsize=14,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none"})
    ax.text(mid, wy - 0.12, "one plain Linear, 384 × 384, again:\nno extra matmul, no extra cost",
            ha="center", va="top", fontsize=9.5, linespacing=1.3)

    ax.text(6.55, 1.85, r"merge:      $W = W_0 + \dfrac{\alpha}{r}\,B\,A$", ha="left",
            va="center", fontsize=12.5)
    ax.text(6.55, 1.1, r"unmerge:  $W_0 = W - \dfrac{\alpha}{r}\,B\,A$", ha="left",
            va="center", fontsize=12.5)
    ax.text(6.55, 0.45, r"$\alpha / r = 16 / 8 = 2$; unmerge gives $W_0$ back (to float" "\n"
            "rounding), to train further or to swap adapters", ha="left", va="center",
            fontsize=9, color=MUTED, linespacing=1.3)


def draw_lora_in_block() -> None:
    """lora_in_block.png: LoRA on query/value in a frozen BERT layer, then merged for inference."""
    height = 8.5
    fig, ax = _canvas(height, "LoRA in practice: adapters inside a frozen BERT layer")
    _legend(ax, (8.2, 7.55), height)
    ax.plot([6.2, 6.2], [0.2, 8.0], color="#BBBBBB", linewidth=1.0)
    _lora_layer_panel(ax)
    _merge_panel(ax)
    _save(fig, "lora_in_block.png")


# -------------------------------------------------------------------------------------------- QLoRA

def draw_qlora() -> None:
    """qlora.png: Y = X doubleDequant(c1, c2, W0_NF4)^T + s X A^T B^T, and where parts live."""
    height = 6.2
    fig, ax = _canvas(height, "QLoRA: LoRA trained through a frozen 4-bit base")
    _legend(ax, (8.9, 5.5), height, ncol=1)
    d, r = 2.0, 0.32

    _box(ax, 0.45, 2.3, r, d, ACTIVATION, r"input $X$  (bf16)", rotation=90)
    ax.plot([0.45 + r, 1.3], [3.3, 3.3], color=INK, linewidth=1.3)
    _dot(ax, (1.3, 3.3))
    ax.plot([1.3, 1.3], [3.3, 4.4], color=INK, linewidth=1.3)
    _arrow(ax, (1.3, 3.3), (1.3, 1.9), (2.0, 1.9))

    # Frozen path: stored as 4-bit codes and two levels of constants, dequantised per forward.
    _box(ax, 1.7, 4.85, 1.45, 0.7, FROZEN, "$W_0$: NF4 codes\n4 bits each", fontsize=9)
    _box(ax, 3.25, 4.85, 1.0, 0.7, FROZEN, "$c_2$: 8-bit\nper 64", fontsize=9)
    _box(ax, 4.35, 4.85, 0.85, 0.7, FROZEN, "$c_1$: fp32\nper 256·64", fontsize=8)
    _arrow(ax, (5.2, 5.2), (6.25, 5.2), (6.25, 4.97))
    ax.text(5.72, 5.28, "doubleDequant", ha="center", va="bottom", fontsize=9, color=MUTED)
    ax.add_patch(Rectangle((5.6, 3.75), 1.3, 1.2, facecolor="white", edgecolor=INK,
                           linewidth=1.2, linestyle="--"))
    ax.text(6.25, 4.35, "$W_0$ in bf16\n(one layer,\nthis step only)", ha="center",
            va="center", fontsize=9)
    _arrow(ax, (1.3, 4.4), (5.6, 4.4))
    _arrow(ax, (6.9, 4.4), (8.0, 4.4), (8.0, 3.52))
    ax.text(7.45, 4.5, "$X W_0^\\top$", ha="center", va="bottom", fontsize=11)

    # Trainable path: LoRA in fp32.
    _box(ax, 2.0, 1.74, d, r, TRAINABLE, "A  (fp32)")
    _arrow(ax, (2.0 + d, 1.9), (4.5, 1.9))
    _box(ax, 4.5, 0.9, r, d, TRAINABLE, "B  (fp32)", rotation=90)
    _arrow(ax, (4.5 + r, 1.9), (6.55, 1.9))
    ax.add_patch(Circle((6.85, 1.9), 0.3, facecolor="white", edgecolor=INK, linewidth=1.3))
    ax.text(6.85, 1.9, r"$\times\, s$", ha="center", va="center", fontsize=12)
    _arrow(ax, (7.15, 1.9), (8.0, 1.9), (8.0, 3.08))

    _plus(ax, (8.0, 3.3))
    _arrow(ax, (8.22, 3.3), (8.95, 3.3))
    _box(ax, 8.95, 2.3, r, d, ACTIVATION, r"output $Y$", rotation=90)

    ax.text(0.45, 0.45, r"$Y = X\,\mathrm{doubleDequant}(c_1, c_2, W_0^{\mathrm{NF4}})^\top"
            r" + s\,X A^\top B^\top$", ha="left", va="center", fontsize=14)
    ax.text(WIDTH - 0.3, 0.45,
            "gradients flow through $W_0$ to the layers below;\n$W_0$ gets none. AdamW's "
            "state for A and B\ncan live in host memory (paged optimizers)",
            ha="right", va="center", fontsize=9.5, color=MUTED, linespacing=1.5)
    _save(fig, "qlora.png")


def _gpu_column(ax: Axes, x: float, name: str, shard: bool, mirror: bool = False) -> float:
    """One GPU: three transformer blocks (frozen, with a LoRA adapter beside each, on the left
    when `mirror`), whole or as its half. Returns the column's width."""
    width, block = (1.45, 0.75) if shard else (1.9, 1.2)
    ax.add_patch(Rectangle((x, 0.95), width, 3.55, facecolor=PANEL, edgecolor=MUTED,
                           linewidth=1.0))
    ax.text(x + width / 2, 4.3, name, ha="center", va="center", fontsize=10, weight="bold")
    for i, y in enumerate((3.35, 2.45, 1.55)):
        label = f"block {3 - i}" + ("\n(half)" if shard else "")
        block_x, adapter_x = (x + 0.52, x + 0.12) if mirror else (x + 0.12, x + 0.22 + block)
        _box(ax, block_x, y, block, 0.7, FROZEN, label, fontsize=8)
        _box(ax, adapter_x, y + 0.15, 0.3, 0.4, TRAINABLE, "½" if shard else "", fontsize=7)
    ax.text(x + width / 2, 1.15, "its slice of the batch", ha="center", va="center", fontsize=8,
            color=MUTED)
    return width


def draw_distributed() -> None:
    """distributed.png: DDP (whole copies, LoRA gradients all-reduced) beside FSDP (halves,
    one block gathered at a time)."""
    height = 5.6
    fig, ax = _canvas(height, "Two GPUs: DDP copies the model, FSDP shards it")
    _legend(ax, (WIDTH / 2, 0.72), height)

    ax.text(2.45, 4.75, "DDP", ha="center", fontsize=12, weight="bold", color=INK)
    _gpu_column(ax, 0.3, "GPU 0", shard=False)
    _gpu_column(ax, 2.6, "GPU 1", shard=False, mirror=True)
    for y in (3.7, 2.8, 1.9):           # each adapter's gradients, between the two copies
        ax.annotate("", xy=(2.72, y), xytext=(2.02, y),
                    arrowprops={"arrowstyle": "<|-|>", "color": INK, "linewidth": 1.1})
    ax.text(2.45, 0.15, r"all-reduce LoRA's gradients, $g = \frac{1}{N}\sum_k g_k$",
            ha="center", va="center", fontsize=10)

    ax.plot([5.0, 5.0], [0.9, 5.0], color=MUTED, linewidth=0.8, linestyle=":")
    ax.text(7.55, 4.75, "FSDP", ha="center", fontsize=12, weight="bold", color=INK)
    left = _gpu_column(ax, 5.25, "GPU 0", shard=True)
    _gpu_column(ax, 8.4, "GPU 1", shard=True, mirror=True)
    ax.add_patch(Rectangle((6.95, 2.3), 1.2, 1.0, facecolor="white", edgecolor=INK,
                           linewidth=1.2, linestyle="--"))
    ax.text(7.55, 2.8, "block 2\ngathered whole\n(this step only)", ha="center", va="center",
            fontsize=8)
    _arrow(ax, (5.25 + left - 0.12, 2.8), (6.95, 2.8))
    _arrow(ax, (8.52, 2.8), (8.15, 2.8))           # from GPU 1's adapter shard and block half
    ax.text(7.55, 0.15, "all-gather a block before it runs; reduce-scatter its gradients",
            ha="center", va="center", fontsize=9.5)
    _save(fig, "distributed.png")


# ------------------------------------------------------------------------------------- choosing

def _question(ax: Axes, center: Point, text: str) -> None:
    """A decision: a white diamond-ended box with the question in it."""
    x, y = center
    ax.add_patch(Polygon([(x - 1.45, y), (x - 1.2, y + 0.38), (x + 1.2, y + 0.38),
                          (x + 1.45, y), (x + 1.2, y - 0.38), (x - 1.2, y - 0.38)],
                         closed=True, facecolor="white", edgecolor=INK, linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=9.5, color=INK)


def draw_choosing() -> None:
    """choosing.png: memory decides first (the planner), then the task picks among what fits."""
    height = 5.4
    fig, ax = _canvas(height, "Choosing a method: what fits first, then what the task needs")
    x = 2.0
    steps = [(4.3, "full fine-tuning fits?\n(planner: weights, grads, AdamW)",
              "full fine-tuning\n(or LoRA: same accuracy, §1)"),
             (3.1, "16-bit LoRA fits?", "LoRA"),
             (1.9, "QLoRA fits?\n(base in NF4)", "QLoRA")]
    for y, question, answer in steps:
        _question(ax, (x, y), question)
        _arrow(ax, (x + 1.45, y), (4.3, y))
        ax.text(3.85, y + 0.08, "yes", ha="center", va="bottom", fontsize=8.5, color=MUTED)
        _box(ax, 4.3, y - 0.32, 1.9, 0.64, TRAINABLE, answer, fontsize=9)
        _arrow(ax, (x, y - 0.38), (x, y - 0.82))
        ax.text(x + 0.1, y - 0.6, "no", ha="left", va="center", fontsize=8.5, color=MUTED)
    _box(ax, x - 1.3, 0.45, 2.6, 0.62, FROZEN, "several GPUs: FSDP shards it\n(lesson 9)",
         fontsize=9)
    ax.add_patch(Rectangle((6.55, 0.45), 3.2, 4.3, facecolor=PANEL, edgecolor=MUTED,
                           linewidth=1.0))
    ax.text(8.15, 4.5, "then, among what fits", ha="center", va="center", fontsize=10,
            weight="bold", color=INK)
    needs = ["many tasks, one base:\nLoRA or adapter files (KiB-MiB)",
             "lowest latency:\nmerge LoRA into W (adapters cannot)",
             "huge model, little data:\nprompt tuning catches up at scale",
             "then diagnose (§3) and evaluate\nbeyond accuracy (§4)"]
    for i, text in enumerate(needs):
        ax.text(6.75, 3.85 - 0.95 * i, text, ha="left", va="center", fontsize=9, color=INK,
                linespacing=1.35)
    _save(fig, "choosing.png")


def embed_in_lessons() -> None:
    """Attach each figure a lesson's markdown refers to (`attachment:NAME.png`) to that cell."""
    for path in sorted(HERE.parent.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        for cell in notebook["cells"]:
            names = re.findall(r"attachment:([\w.-]+\.png)", "".join(cell["source"]))
            if cell["cell_type"] == "markdown" and names:
                cell["attachments"] = {name: {"image/png": base64.b64encode(
                    (HERE / name).read_bytes()).decode("ascii")} for name in names}
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    """Draw all eight figures into this script's folder, and embed them in the lessons."""
    draw_lora()
    draw_adapters()
    draw_prompts()
    draw_nf4()
    draw_lora_in_block()
    draw_qlora()
    draw_distributed()
    draw_choosing()
    embed_in_lessons()


if __name__ == "__main__":
    main()
