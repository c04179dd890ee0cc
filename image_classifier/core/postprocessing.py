"""Model output row -> the prediction a client reads: label, confidence, grade, top-k."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel

Grade = Literal["high", "medium", "low"]


class LabelProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    label: str
    confidence: float
    grade: Grade
    top_k: list[LabelProbability]
    probabilities: dict[str, float]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, numerically stable (shifts by the row maximum)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def grade(confidence: float, high: float, medium: float) -> Grade:
    """`low` results are the ones a client should route to human review."""
    if confidence >= high:
        return "high"
    if confidence >= medium:
        return "medium"
    return "low"


def to_prediction(
    probabilities: np.ndarray, labels: list[str], top_k: int, high: float, medium: float
) -> Prediction:
    """Built without validation: every field comes from the model's row and the card's labels
    (validating a 1,000-class dict cost more than the rest of the answer)."""
    row = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    # Stable sort: equal probabilities keep label order, so answers are reproducible.
    order = np.argsort(-row, kind="stable")[:top_k]
    best = int(order[0])
    confidence = float(row[best])
    return Prediction.model_construct(
        label=labels[best],
        confidence=confidence,
        grade=grade(confidence, high, medium),
        top_k=[
            LabelProbability.model_construct(label=labels[i], probability=float(row[i]))
            for i in order
        ],
        probabilities=dict(zip(labels, row.tolist(), strict=True)),  # one C call, not 1 per item
    )
