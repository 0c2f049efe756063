"""Evaluating a fine-tuned classifier beyond its accuracy (lesson 8).

Accuracy says how often the model is right. Three more questions, each answered from the same
class probabilities (`predict`):

- **Calibration**: when the model says 90 %, is it right 90 % of the time? Sort the predictions
  into bins by confidence and compare each bin's mean confidence with its accuracy (a reliability
  plot); the expected calibration error (Naeini et al., 2015; Guo et al., 2017) is their gap,
  averaged with the bins' weights:

      ECE = sum_b (n_b / n) |accuracy(b) - confidence(b)|

- **Per-class errors**: which label the mistakes fall on (a model can be right 90 % of the time
  by saying "positive" to everything on a 90 % positive set).
- **Robustness**: the accuracy on slices of the test set that share a trait (a negation, a
  contrast with "but"), next to the whole set's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from minipeft.course.training import by_length, make_loader


@dataclass(frozen=True)
class Predictions:
    probabilities: torch.Tensor      # (n, classes), softmax of the logits, float32 on the CPU
    labels: torch.Tensor             # (n,) the true classes

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(1)

    @property
    def confidence(self) -> torch.Tensor:
        """The probability the model gives its own answer."""
        return self.probabilities.max(1).values

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.labels

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item()


@torch.no_grad()
def predict(model: nn.Module, tokenizer, dataset, batch_size: int = 64) -> Predictions:
    """The model's class probabilities on every row of `dataset` (text, label), in the rows'
    order (computed in batches of similar lengths), in eval mode; the model's train/eval mode is
    restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows, order = by_length(dataset)
    probabilities, labels = [], []
    try:
        for batch in make_loader(rows, tokenizer, batch_size):
            labels.append(batch.pop("labels"))
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            probabilities.append(logits.float().softmax(-1).cpu())
    finally:
        model.train(was_training)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))      # sorted position of each row
    return Predictions(torch.cat(probabilities)[back], torch.cat(labels)[back])


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: how many predictions, their mean confidence, and their accuracy."""
    edges: torch.Tensor              # (bins + 1,) from 0 to 1
    counts: torch.Tensor             # (bins,)
    confidence: torch.Tensor         # (bins,) NaN where a bin is empty
    accuracy: torch.Tensor           # (bins,) NaN where a bin is empty

    @property
    def expected_calibration_error(self) -> float:
        """sum_b (n_b / n) |accuracy(b) - confidence(b)| over the bins that hold predictions."""
        filled = self.counts > 0
        weights = self.counts[filled] / self.counts.sum()
        gaps = (self.accuracy[filled] - self.confidence[filled]).abs()
        return (weights * gaps).sum().item()


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> Reliability:
    """Bin predictions (each a `confidence` and whether it was `correct`) by confidence, in
    `bins` equal-width bins [k / bins, (k + 1) / bins) from 0 to 1, the last one closed so that it
    holds 1 (the course's convention; Guo et al. close bins on the right, and torchmetrics gives 1
    a bin of its own). With two classes no confidence is below 0.5: the lower half of the bins
    stays empty."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    edges = torch.linspace(0, 1, bins + 1)
    confidence, correct = confidence.float(), correct.float()
    index = torch.bucketize(confidence, edges, right=True).sub(1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).float()
    sums = torch.zeros(bins).index_add_(0, index, confidence)
    hits = torch.zeros(bins).index_add_(0, index, correct)
    empty = counts == 0
    return Reliability(edges, counts,
                       (sums / counts).masked_fill(empty, float("nan")),
                       (hits / counts).masked_fill(empty, float("nan")))


def per_class_accuracy(predictions: Predictions) -> dict[int, float]:
    """Accuracy on the rows of each true class (recall), for the classes present."""
    labels, correct = predictions.labels, predictions.correct.float()
    return {int(c): correct[labels == c].mean().item() for c in labels.unique()}


def slice_accuracy(predictions: Predictions, texts: list[str],
                   traits: dict[str, Callable[[str], bool]]) -> dict[str, tuple[int, float]]:
    """For each named trait (a test on a row's text), (rows that have it, accuracy on them), with
    the whole set as "all"."""
    if len(texts) != len(predictions.labels):
        raise ValueError(f"{len(texts)} texts for {len(predictions.labels)} predictions: pass "
                         "the texts of the data set that was predicted, in order")
    correct = predictions.correct.float()
    result = {"all": (len(texts), correct.mean().item())}
    for name, has_trait in traits.items():
        mask = torch.tensor([bool(has_trait(t)) for t in texts])
        result[name] = (int(mask.sum()), correct[mask].mean().item() if mask.any()
                        else float("nan"))
    return result
