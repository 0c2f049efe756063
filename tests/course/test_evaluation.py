from __future__ import annotations

import pytest
import torch

from minipeft.course import evaluation
from minipeft.course.evaluation import Predictions


def _predictions(confidence: list[float], correct: list[bool]) -> Predictions:
    """Two classes; the true class is 1; the model says 1 (with `confidence`) when `correct`."""
    p1 = torch.tensor([c if ok else 1 - c for c, ok in zip(confidence, correct)])
    return Predictions(torch.stack([1 - p1, p1], 1), torch.ones(len(p1), dtype=torch.long))


def test_ece_by_hand():
    # bins of width 0.1: two predictions in [0.5, 0.6), two in [0.9, 1]
    preds = _predictions([0.52, 0.54, 0.97, 0.99], [True, False, True, True])
    table = evaluation.reliability(preds.confidence, preds.correct, bins=10)
    assert table.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    by_hand = 0.5 * abs(0.5 - 0.53) + 0.5 * abs(1.0 - 0.98)
    assert table.expected_calibration_error == pytest.approx(by_hand)
    assert torch.isnan(table.accuracy[1]) and torch.isnan(table.confidence[6])


def test_a_calibrated_model_has_a_small_ece():
    torch.manual_seed(0)
    confidence = torch.rand(20000) * 0.5 + 0.5
    correct = torch.rand(20000) < confidence               # right as often as it says
    preds = _predictions(confidence.tolist(), correct.tolist())
    assert evaluation.reliability(preds.confidence, preds.correct).expected_calibration_error < 0.02
    overconfident = _predictions([0.99] * 1000, [i % 2 == 0 for i in range(1000)])
    table = evaluation.reliability(overconfident.confidence, overconfident.correct)
    assert table.expected_calibration_error == pytest.approx(0.49, abs=1e-5)


def test_edges_and_errors():
    preds = _predictions([0.5, 1.0], [True, True])
    table = evaluation.reliability(preds.confidence, preds.correct, bins=5)   # edges 0, 0.2, ..
    assert table.counts.tolist() == [0, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="bins must be at least 1"):
        evaluation.reliability(preds.confidence, preds.correct, bins=0)


def test_per_class_and_slices():
    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    preds = Predictions(probabilities, torch.tensor([0, 0, 1, 1]))
    assert preds.accuracy == 0.75
    assert evaluation.per_class_accuracy(preds) == {0: 1.0, 1: 0.5}
    texts = ["good", "not bad", "fine but long", "not great"]
    slices = evaluation.slice_accuracy(preds, texts, {"negation": lambda t: "not" in t,
                                                     "nothing": lambda t: False})
    assert slices["all"] == (4, 0.75) and slices["negation"] == (2, 0.5)
    assert slices["nothing"][0] == 0
    with pytest.raises(ValueError, match="3 texts for 4 predictions"):
        evaluation.slice_accuracy(preds, texts[:3], {})


def test_predict_agrees_with_evaluate_and_restores_the_mode(bert, sentiment):
    from transformers import BertConfig, BertForSequenceClassification

    from minipeft.course.training import evaluate

    _, tokenizer = bert
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=2)).train()
    rows = sentiment["test"].select(range(50))
    preds = evaluation.predict(model, tokenizer, rows, batch_size=16)
    assert model.training
    assert preds.probabilities.shape == (50, 2) and preds.labels.tolist() == rows["label"]
    assert torch.allclose(preds.probabilities.sum(1), torch.ones(50))
    assert preds.accuracy == pytest.approx(evaluate(model, tokenizer, rows))
    model.eval()
    with torch.no_grad():                 # batched by length, returned in the rows' order
        one_by_one = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)
                                for text in rows["text"]])
    assert torch.allclose(preds.probabilities, one_by_one, atol=1e-5)
