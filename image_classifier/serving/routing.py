"""Which loaded model answers a request: the primary, or a candidate beside it (canary, shadow).

A request may pin a version (`v2` or `name:v2`, sent in the `X-Model-Version` header); otherwise
`canary_fraction` of requests go to the candidate. With `shadow_fraction`, the candidate also
scores some of the primary's requests off the response path, and only the agreement is counted.
Every answer names the version that gave it, and its metrics and drift are kept per version.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from ..core.classifier import Classifier
from ..core.errors import ClassifierError, ErrorCode
from ..core.postprocessing import Prediction
from . import metrics
from .drift import DriftMonitor


class ModelRef(BaseModel):
    """A model version as answers name it."""

    name: str
    version: str


@dataclass
class ServedVersion:
    """A model version this worker serves: its classifier once loaded, its drift and metrics."""

    ref: ModelRef
    role: str  # "primary" or "candidate"
    path: Path = Path()  # the model's folder (model.onnx + card.json)
    drift_window: int = 500
    drift_max_drop: float = 0.05
    # Both set once the model is loaded and warm (the drift baseline comes from its card).
    classifier: Classifier | None = field(default=None, repr=False)
    drift: DriftMonitor | None = field(default=None, repr=False)

    @property
    def tag(self) -> str:
        return f"{self.ref.name}:{self.ref.version}"

    def ready_classifier(self) -> Classifier:
        if self.classifier is None:
            raise ClassifierError(ErrorCode.NOT_READY, f"model {self.tag} is not loaded yet")
        return self.classifier

    def loaded(self, classifier: Classifier) -> None:
        baseline = classifier.card.metrics.mean_top1_confidence
        self.drift = DriftMonitor(baseline, self.drift_window, self.drift_max_drop)
        self.classifier = classifier
        metrics.observe_model_loaded(self.ref.name, self.ref.version, self.role, baseline)

    def record(self, prediction: Prediction) -> None:
        """Count an answer this model gave and feed its confidence to the drift alarm."""
        metrics.observe_prediction(prediction, self.ref.version)
        assert self.drift is not None, "record() before loaded()"
        metrics.observe_drift(self.ref.version, self.drift.observe(prediction.confidence))


class ModelRouter:
    def __init__(
        self,
        primary: ServedVersion,
        candidate: ServedVersion | None = None,
        canary_fraction: float = 0.0,
        shadow_fraction: float = 0.0,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.primary = primary
        self.candidate = candidate
        self.canary_fraction = canary_fraction if candidate else 0.0
        self.shadow_fraction = shadow_fraction if candidate else 0.0
        self._draw = draw

    @property
    def models(self) -> list[ServedVersion]:
        return [self.primary] + ([self.candidate] if self.candidate else [])

    def all_loaded(self) -> bool:
        return all(model.classifier is not None for model in self.models)

    def route(self, pinned: str | None = None) -> ServedVersion:
        """The model for one request: the pinned version, else a canary draw, else the primary."""
        if pinned:
            return self.find(pinned.strip())
        if self.candidate is not None and self._draw() < self.canary_fraction:
            return self.candidate
        return self.primary

    def drop_candidate(self) -> None:
        """Serve the primary alone: the candidate cannot be served."""
        self.candidate = None
        self.canary_fraction = self.shadow_fraction = 0.0

    def find(self, wanted: str) -> ServedVersion:
        for model in self.models:
            if wanted in (model.ref.version, model.tag):
                return model
        served = ", ".join(model.ref.version for model in self.models)
        raise ClassifierError(
            ErrorCode.UNKNOWN_MODEL_VERSION,
            f"model version {wanted[:80]!r} is not served here (served: {served})",
        )

    def shadow_for(self, answered: ServedVersion) -> ServedVersion | None:
        """The candidate, for a share of the primary's answers; None otherwise."""
        if answered is self.primary and self.candidate and self._draw() < self.shadow_fraction:
            return self.candidate
        return None
