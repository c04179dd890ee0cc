"""All the service does to an image, without HTTP: decode, validate, preprocess, run, describe.

The service and offline tools use this one object, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import metrics
from .decoding import DecodeLimits, check_declared_type, decode_image
from .errors import ClassifierError, ErrorCode
from .model_card import ModelCard
from .postprocessing import Prediction, to_prediction
from .preprocessing import preprocess
from .runtime import OnnxModel
from .settings import Settings


class Classifier:
    def __init__(self, model_dir: Path, settings: Settings) -> None:
        self.settings = settings
        self.model = OnnxModel(Path(model_dir), intra_op_threads=settings.ort_intra_op_threads)
        self.limits = DecodeLimits(settings.allowed_formats, settings.max_image_pixels)

    @property
    def card(self) -> ModelCard:
        return self.model.card

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
        spec = self.card.preprocessing
        image = decode_image(data, self.limits, declared_type, spec.decode_size_hint)
        return preprocess(image, spec)

    def predict(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """Tensors -> probabilities, in model runs of at most BATCH_MAX_SIZE."""
        step = self.settings.batch_max_size
        runs = []
        for start in range(0, len(tensors), step):
            chunk = tensors[start : start + step]
            runs.append(self.model.probabilities(np.stack(chunk)))
            metrics.observe_model_run(len(chunk))
        return np.concatenate(runs) if runs else np.zeros((0, len(self.card.labels)), np.float32)

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
