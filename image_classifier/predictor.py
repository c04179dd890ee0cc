"""From an upload's bytes to its answer, for the service's apis; no HTTP and no BentoML here.

It holds what one worker serves with: the models (`routing`), the duplicate-input cache, a bounded
pool of decode threads, one batcher per model version, and the shadow scoring of a candidate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import anyio
import numpy as np

from . import metrics
from .batching import MicroBatcher
from .cache import PredictionCache
from .classifier import Classifier
from .errors import ClassifierError, model_failure
from .postprocessing import Prediction
from .routing import ModelRouter, ServedModel
from .runtime import ModelLoadError
from .settings import Settings

log = logging.getLogger(__name__)


class Predictor:
    def __init__(self, router: ModelRouter, settings: Settings) -> None:
        self.router = router
        self.settings = settings
        self.decode_limiter = anyio.CapacityLimiter(settings.threads)
        self.cache = (
            PredictionCache(settings.cache_size, settings.cache_ttl_s)
            if settings.cache_size
            else None
        )
        self.batchers: dict[str, MicroBatcher] = {}  # per model version, once it is loaded
        self._shadow_tasks: set[asyncio.Task] = set()

    def load_models(self) -> None:
        """Load and warm up every served model (slow: call it off the event loop).

        ModelLoadError names the model that cannot be served."""
        for served in self.router.models:
            try:
                classifier = Classifier(served.path, self.settings, served.ref.version)
                classifier.warm_up()
            except Exception as exc:
                raise ModelLoadError(f"model {served.tag} cannot be served: {exc}") from exc
            served.loaded(classifier)
            self.batchers[served.ref.version] = MicroBatcher(
                classifier.predict_each, self.settings.batch_max_size, self.settings.threads
            )
            log.info("model %s (%s) loaded and warmed up", served.tag, served.role)

    async def prepare(
        self, classifier: Classifier, data: bytes, content_type: str | None
    ) -> np.ndarray:
        """Decode, validate and preprocess on the bounded thread pool (ClassifierError: 4xx)."""
        return await anyio.to_thread.run_sync(
            classifier.prepare, data, content_type, limiter=self.decode_limiter
        )

    async def answer(
        self, served: ServedModel, data: bytes, content_type: str | None, top_k: int
    ) -> tuple[Prediction, int, bool]:
        """One image's prediction, how many images shared its model run, and whether it came
        from the duplicate-input cache (when on). A fresh answer may be shadowed too."""
        cache = self.cache
        key = None if cache is None else cache.key(data, served.ref.version, top_k)
        if key is not None and (hit := cache.get(key)) is not None:
            return hit, 0, True
        classifier = served.ready_classifier()
        tensor = await self.prepare(classifier, data, content_type)
        probabilities, merged = await self.run_one(served, tensor)
        prediction = classifier.describe(probabilities, top_k)
        if key is not None:
            cache.put(key, prediction)
        self._maybe_shadow(served, data, content_type, prediction.label)
        return prediction, merged, False

    async def run_one(self, served: ServedModel, tensor: np.ndarray) -> tuple[np.ndarray, int]:
        """Through the batcher when batching is on, so concurrent requests share a model run.

        Returns the probabilities and how many images shared the model run."""
        if self.settings.batching:
            row, merged = await self.batchers[served.ref.version].submit(tensor)
        else:
            classifier = served.ready_classifier()
            row, merged = (await anyio.to_thread.run_sync(classifier.predict_each, [tensor]))[0], 1
        if row is None:
            raise model_failure()
        return row, merged

    async def answer_each(
        self,
        served: ServedModel,
        uploads: Sequence[tuple[bytes | ClassifierError, str | None]],
        top_k: int,
    ) -> list[Prediction | ClassifierError]:
        """Many images in shared model runs; an image refused (or failed) stays in its place."""
        classifier = served.ready_classifier()

        async def prepared(data: bytes | ClassifierError, content_type: str | None):
            if isinstance(data, ClassifierError):
                return data
            try:
                return await self.prepare(classifier, data, content_type)
            except ClassifierError as exc:
                return exc

        items = await asyncio.gather(*(prepared(data, kind) for data, kind in uploads))
        outcomes = await anyio.to_thread.run_sync(classifier.describe_batch, items, top_k)
        for outcome in outcomes:
            if isinstance(outcome, ClassifierError):
                metrics.observe_item_error(outcome)
            else:
                served.record(outcome)
        return outcomes

    def _maybe_shadow(
        self, answered: ServedModel, data: bytes, content_type: str | None, label: str
    ) -> None:
        """Let the candidate score a share of the primary's traffic, after the answer is sent."""
        shadow = self.router.shadow_for(answered)
        if shadow is None:
            return
        task = asyncio.create_task(self._shadow(shadow, data, content_type, label))
        self._shadow_tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self, shadow: ServedModel, data: bytes, content_type: str | None, answered_label: str
    ) -> None:
        try:
            classifier = shadow.ready_classifier()
            tensor = await self.prepare(classifier, data, content_type)
            probabilities, _ = await self.run_one(shadow, tensor)
            label = classifier.describe(probabilities, 1).label
            metrics.observe_shadow(shadow.ref.version, agreed=label == answered_label)
        except Exception:
            log.warning("shadow scoring by %s failed", shadow.tag, exc_info=True)
