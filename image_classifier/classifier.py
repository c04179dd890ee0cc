"""All the service does to an image, without HTTP: decode, validate, preprocess, run, describe.

The service and offline tools use this one object, so the two cannot drift apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import metrics
from .decoding import DecodeLimits, check_declared_type, decode_image
from .errors import ClassifierError, ErrorCode, model_failure
from .model_card import ModelCard
from .postprocessing import Prediction, to_prediction
from .preprocessing import preprocess
from .runtime import OnnxModel
from .settings import Settings

log = logging.getLogger(__name__)


class Classifier:
    def __init__(self, model_dir: Path, settings: Settings, version: str = "") -> None:
        self.settings = settings
        self.version = version  # the store version, for metrics
        self.model = OnnxModel(Path(model_dir), intra_op_threads=settings.ort_intra_op_threads)
        self.limits = DecodeLimits(settings.allowed_formats, settings.max_image_pixels)

    @property
    def card(self) -> ModelCard:
        return self.model.card

    def describe_setup(self) -> dict:
        """What /info shows: the card's contract and the limits requests meet."""
        card, settings = self.card, self.settings
        return {
            "source": card.source,
            "benchmark_only": card.benchmark_only,
            "labels": card.labels,
            "preprocessing": card.preprocessing.model_dump(mode="json"),
            "output_kind": card.output_kind,
            "metrics": card.metrics.model_dump(mode="json"),
            "training_data_sha256": card.training_data_sha256,
            "batching": {
                "enabled": settings.batching,
                "max_batch_size": settings.batch_max_size,
            },
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_batch_images": settings.max_batch_images,
                "max_batch_bytes": settings.max_batch_bytes,
                "max_image_pixels": settings.max_image_pixels,
                "allowed_formats": list(settings.allowed_formats),
            },
            "grades": {"high": settings.grade_high, "medium": settings.grade_medium},
        }

    def warm_up(self) -> None:
        self.model.warm_up((1, self.settings.batch_max_size))

    def resolve_top_k(self, top_k: int | None) -> int:
        classes = len(self.card.labels)
        if top_k is None:
            return min(self.settings.default_top_k, classes)
        if not 1 <= top_k <= classes:
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST, f"top_k must be between 1 and {classes}, got {top_k}"
            )
        return top_k

    def prepare(self, data: bytes, declared_type: str | None = None) -> np.ndarray:
        """Bytes -> model input tensor, or ClassifierError (4xx) for anything wrong with them."""
        check_declared_type(declared_type, self.limits.allowed_formats)
        started = time.perf_counter()
        spec = self.card.preprocessing
        image = decode_image(data, self.limits, declared_type, spec.decode_size_hint)
        tensor = preprocess(image, spec)
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
        return tensor

    def predict(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """Tensors -> probabilities, in model runs of at most BATCH_MAX_SIZE."""
        step = self.settings.batch_max_size
        runs = []
        for start in range(0, len(tensors), step):
            chunk = tensors[start : start + step]
            started = time.perf_counter()
            runs.append(self.model.probabilities(np.stack(chunk)))
            metrics.observe_model_run(len(chunk), time.perf_counter() - started, self.version)
        return np.concatenate(runs) if runs else np.zeros((0, len(self.card.labels)), np.float32)

    def predict_each(self, tensors: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """Like predict, but a run that fails is retried item by item: one poison input fails
        alone (None) instead of taking every request merged with it down."""
        try:
            return list(self.predict(tensors))
        except Exception:
            log.exception("a model run of %d items failed; retrying them one by one", len(tensors))
        results: list[np.ndarray | None] = []
        for tensor in tensors:
            try:
                results.append(self.predict([tensor])[0])
            except Exception:
                log.exception("a model run failed on a single item")
                results.append(None)
        return results

    def predict_all(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """Like predict_each, for callers whose request fails as a whole when any item fails."""
        rows = self.predict_each(tensors)
        if any(row is None for row in rows):
            raise model_failure()
        return np.stack(rows)

    def describe_batch(
        self, items: Sequence[np.ndarray | ClassifierError], top_k: int
    ) -> list[Prediction | ClassifierError]:
        """Prepared tensors -> predictions in shared runs; items refused earlier stay in place."""
        tensors = [item for item in items if not isinstance(item, ClassifierError)]
        rows = iter(self.predict_each(tensors))
        outcomes: list[Prediction | ClassifierError] = []
        for item in items:
            if isinstance(item, ClassifierError):
                outcomes.append(item)
                continue
            row = next(rows)
            outcomes.append(model_failure() if row is None else self.describe(row, top_k))
        return outcomes

    def describe(self, probabilities: np.ndarray, top_k: int) -> Prediction:
        return to_prediction(
            probabilities,
            self.card.labels,
            top_k,
            high=self.settings.grade_high,
            medium=self.settings.grade_medium,
        )

    def classify(self, data: bytes, top_k: int | None = None) -> Prediction:
        """One image end to end in this process (offline use, tests)."""
        k = self.resolve_top_k(top_k)
        return self.describe(self.predict([self.prepare(data)])[0], k)
