"""The interactive tools' logic, without a browser (tests/test_browser.py renders them in one)."""
from __future__ import annotations

import matplotlib
import pytest
import torch

from minipeft import planner, quant
from minipeft.course import widgets

matplotlib.use("Agg")


def test_widget_mode(monkeypatch):
    monkeypatch.setenv("MINIPEFT_WIDGETS", "static")
    assert widgets.widget_mode() == "static" and not widgets.interactive()
    monkeypatch.setenv("MINIPEFT_WIDGETS", "interactive")
    assert not widgets.interactive()          # no Jupyter kernel under pytest
    monkeypatch.setenv("MINIPEFT_WIDGETS", "sliders")
    with pytest.raises(ValueError, match="MINIPEFT_WIDGETS='sliders'.*interactive"):
        widgets.widget_mode()


def test_fit_figure_draws_the_planners_items_and_the_gpu():
    figure = widgets.fit_figure("llama-2-7b", "qlora", "T4 (16 GB)", batch=1, seq_len=512)
    ax = figure.axes[0]
    plan = planner.plan(planner.load_config("llama-2-7b"), "qlora", batch=1, seq_len=512,
                        rank=16)
    widths = [bar.get_width() for bar in ax.patches]
    assert sum(widths) == pytest.approx(plan.total / widgets.GIB)
    assert ax.lines[0].get_xdata()[0] == widgets.GPUS["T4 (16 GB)"]
    assert "fits" in ax.get_title() and "does not" not in ax.get_title()
    full = widgets.fit_figure("llama-2-7b", "full", "T4 (16 GB)", batch=1, seq_len=512)
    assert "does not fit" in full.axes[0].get_title()


def test_fit_figure_takes_any_config():
    bert = {"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536,
            "num_hidden_layers": 6, "num_attention_heads": 12, "vocab_size": 30522,
            "max_position_embeddings": 512}
    figure = widgets.fit_figure("MiniLM", "full", "T4 (16 GB)", 8, 128, configs={"MiniLM": bert})
    assert "MiniLM" in figure.axes[0].get_title()


def test_relative_errors_are_those_of_the_truncated_svd():
    torch.manual_seed(0)
    delta = torch.randn(40, 3) @ torch.randn(3, 30) + 0.01 * torch.randn(40, 30)
    errors = widgets.relative_errors(delta)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    for r in (1, 3, 10):
        truncated = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        assert errors[r - 1] == pytest.approx(((delta - truncated).norm() / delta.norm()).item(),
                                              abs=1e-4)
    assert errors[2] < 0.01 < errors[1] and errors[-1] < 1e-3


def test_rank_figure_marks_the_accuracy_of_the_largest_measured_rank_not_above_r():
    errors = widgets.relative_errors(torch.randn(20, 16))
    figure = widgets.rank_figure(errors, 6, (20, 16), {1: 0.6, 4: 0.8, 8: 0.9})
    assert len(figure.axes) == 2
    assert "r=4: 0.800" in figure.axes[1].get_title()
    assert f"{6 * 36:,} numbers" in figure.axes[0].get_title()


@pytest.mark.parametrize("fmt", list(widgets.LEVELS))
def test_roundtrip_snaps_each_weight_to_its_blocks_nearest_level(fmt):
    torch.manual_seed(1)
    weights = torch.randn(256)
    restored = widgets.roundtrip(weights, fmt)
    blocks, levels = weights.reshape(-1, 64), widgets.LEVELS[fmt]
    absmax = blocks.abs().amax(1, keepdim=True)
    candidates = levels.view(1, 1, -1) * absmax.unsqueeze(-1)            # (blocks, 1, levels)
    nearest = (blocks.unsqueeze(-1) - candidates).abs().min(-1).values
    assert torch.allclose((blocks - restored.reshape(-1, 64)).abs(), nearest, atol=1e-6)


def test_nf4_roundtrip_is_minipefts():
    weights = torch.randn(4096)
    assert torch.allclose(widgets.roundtrip(weights, "NF4"),
                          quant.dequantize_nf4(*quant.quantize_nf4(weights)), atol=1e-6)


def test_nf4_figure_reports_the_error_and_shows_sixteen_levels_at_most():
    weights = torch.randn(64 * 5)
    figure = widgets.nf4_figure(weights, 2, "NF4")
    title = figure.axes[0].get_title()
    assert "NF4: relative error" in title
    assert len(figure.axes[0].lines) == 16          # one line per level
    assert len(widgets.nf4_figure(weights, 0, "int8").axes[0].lines) == 0
    with pytest.raises(ValueError, match="at least one block of 64"):
        widgets.nf4_explorer(torch.randn(10))


def test_static_mode_draws_the_default_figure(monkeypatch, capsys):
    monkeypatch.setenv("MINIPEFT_WIDGETS", "static")
    assert widgets.will_it_fit() is None
    assert widgets.nf4_explorer(torch.randn(128)) is None
    assert widgets.rank_explorer(torch.randn(8, 8)) is None
    assert "Figure" in capsys.readouterr().out           # outside a kernel: the figure's repr


def test_training_figure():
    figure = widgets.training_figure([0.7, 0.6, 0.4], [(0, 0.5), (3, 0.9)], 10, "LoRA")
    assert figure.axes[0].get_title() == "LoRA: step 3 of 10, loss 0.400"
    assert len(figure.axes) == 2


def test_training_in_a_notebook_draws_a_live_view_instead_of_a_bar(monkeypatch, bert, sentiment):
    from transformers import BertConfig, BertForSequenceClassification

    from minipeft.course import training

    _, tokenizer = bert
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=2))
    drawn = []
    monkeypatch.setattr(widgets, "interactive", lambda: True)      # as in a Jupyter kernel
    monkeypatch.setattr(widgets.TrainingView, "update",
                        lambda self, losses, val, force=False: drawn.append((len(losses), force)))
    training.train(model, tokenizer, sentiment["train"].select(range(24)), batch_size=8,
                   progress="live")
    assert drawn == [(1, False), (2, False), (3, False), (3, True)]   # every step, then final
