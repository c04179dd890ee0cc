"""Prometheus metrics of the service (served on BentoML's /metrics with its own).

BentoML runs prometheus_client in multiprocess mode, so gauges say how to merge worker values.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .errors import ClassifierError
from .postprocessing import Prediction

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

MODEL_INFO = Gauge(
    "image_classifier_model_info",
    "The model this service answers with (value 1)",
    ["name", "version"],
    multiprocess_mode="max",
)
MODEL_RUNS = Counter("image_classifier_model_runs", "ONNX Runtime runs (one per merged batch)")
MODEL_RUN_ITEMS = Histogram(
    "image_classifier_model_run_items", "Images per ONNX Runtime run", buckets=_BATCH_BUCKETS
)
PREDICTIONS = Counter(
    "image_classifier_predictions", "Predictions by label", ["label", "model_version"]
)
CONFIDENCE = Histogram(
    "image_classifier_top1_confidence", "Top-1 confidence", buckets=_CONFIDENCE_BUCKETS
)
ERRORS = Counter("image_classifier_errors", "Error responses by error code", ["code"])
ITEM_ERRORS = Counter(
    "image_classifier_batch_item_errors", "Refused images inside /analyze_batch by code", ["code"]
)


def observe_model_run(items: int) -> None:
    MODEL_RUNS.inc()
    MODEL_RUN_ITEMS.observe(items)


def observe_prediction(prediction: Prediction, model_version: str) -> None:
    PREDICTIONS.labels(label=prediction.label, model_version=model_version).inc()
    CONFIDENCE.observe(prediction.confidence)


def observe_outcome(outcome: Prediction | ClassifierError, model_version: str) -> None:
    """One /analyze_batch item: its prediction, or its refusal by code."""
    if isinstance(outcome, ClassifierError):
        ITEM_ERRORS.labels(code=outcome.code.value).inc()
    else:
        observe_prediction(outcome, model_version)
