"""Model scores -> the prediction clients read."""

from __future__ import annotations

import numpy as np
import pytest

from image_classifier.core.postprocessing import grade, softmax, to_prediction

LABELS = ["cat", "dog", "fox", "owl"]


def test_softmax_is_stable_and_normalised():
    logits = np.array([[1000.0, 1001.0, 999.0], [-5.0, 0.0, 5.0]])
    probs = softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs[0].argmax() == 1 and probs[1].argmax() == 2


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [(0.95, "high"), (0.9, "high"), (0.89, "medium"), (0.6, "medium"), (0.59, "low")],
)
def test_grade_thresholds(confidence, expected):
    assert grade(confidence, high=0.9, medium=0.6) == expected


def test_prediction_top_k_order_and_probabilities():
    prediction = to_prediction(np.array([0.1, 0.6, 0.25, 0.05]), LABELS, 3, 0.9, 0.6)
    assert prediction.label == "dog"
    assert prediction.confidence == pytest.approx(0.6)
    assert prediction.grade == "medium"
    assert [item.label for item in prediction.top_k] == ["dog", "fox", "cat"]
    assert prediction.probabilities == pytest.approx(
        {"cat": 0.1, "dog": 0.6, "fox": 0.25, "owl": 0.05}
    )


def test_ties_resolve_in_label_order():
    prediction = to_prediction(np.full(4, 0.25), LABELS, 2, 0.9, 0.6)
    assert [item.label for item in prediction.top_k] == ["cat", "dog"]
    assert prediction.grade == "low"
