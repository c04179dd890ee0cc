"""From an upload's bytes to its answer, for every route of the service; no HTTP here.

It holds what one worker serves with: the model versions (`routing`), the duplicate-input cache, a
bounded pool of worker threads, one batcher per model version, and the shadow scoring of a
candidate. It times and counts what the core does (metrics, drift).

Every image, whichever route brought it (/analyze, /analyze_batch, Open Inference `infer`),
makes one thread hand-off: a worker thread decodes and preprocesses it and hands the tensor to
the batcher, which runs it in that thread or in the one already running the model
(`batching.py`), and the event loop gets the row back (from the thread's return, or through a
future the running thread resolves). Encoded images
are answered from the duplicate-input cache when it is on, whichever route brought them (a
prediction keeps every class's probability, so Open Inference answers come from it too).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import numpy as np

from .. import __version__
from ..core.classifier import Classifier, ModelLoadError, NonFiniteOutput
from ..core.errors import ClassifierError, ErrorCode, model_failure
from ..core.postprocessing import Prediction
from . import metrics
from .batching import MicroBatcher, Row
from .cache import PredictionCache, SharedPredictionCache
from .evaluation_record import EvaluationRecord, evaluated_card, read_evaluations
from .machine import int8_saturates, yield_to_the_event_loop
from .routing import ModelRef, ModelRouter, ServedVersion
from .settings import Settings
from .shared_state import redis_client
from .worker_state import InWork

log = logging.getLogger(__name__)

Upload = tuple[bytes | ClassifierError, str | None]  # bytes (or why they were refused), type


@dataclass(frozen=True)
class Answer:
    prediction: Prediction
    batch_size: int  # images that shared its model run (0: from the cache)
    cached: bool


class Predictor:
    def __init__(self, router: ModelRouter, settings: Settings, worker_slot: int = 0) -> None:
        self.router = router
        self.settings = settings
        self.in_work = InWork(worker_slot)  # this worker's images in work, seen by the others
        self.threads = anyio.CapacityLimiter(settings.threads)  # decoding and model runs
        self.decoding = settings.decoding_budget()  # and the pixels they decode at once
        self.cache = prediction_cache(settings)
        self.batchers: dict[str, MicroBatcher] = {}  # per model version, once it is loaded
        self._background: set[asyncio.Task] = set()  # shadow scoring, threads left running

    @classmethod
    def for_models(
        cls, settings: Settings, models: Sequence[tuple[str, Path]], worker_slot: int = 0
    ) -> Predictor:
        """`(name:version, folder)` of the primary model, then of an optional candidate;
        `worker_slot`: this worker's number among the server's (`InWork`)."""
        served = [
            ServedVersion(
                ModelRef(name=tag.split(":")[0], version=tag.split(":")[1]),
                role,
                path,
                drift_window=settings.drift_window,
                drift_max_drop=settings.drift_max_drop,
            )
            for (tag, path), role in zip(models, ("primary", "candidate"), strict=False)
        ]
        if len(served) == 1 and (settings.canary_fraction or settings.shadow_fraction):
            log.warning(
                "CANARY_FRACTION=%g and SHADOW_FRACTION=%g have no candidate to send requests to: "
                "set CANDIDATE_MODEL_TAG or run `models candidate`",
                settings.canary_fraction, settings.shadow_fraction,
            )  # fmt: skip
        router = ModelRouter(
            *served,
            canary_fraction=settings.canary_fraction,
            shadow_fraction=settings.shadow_fraction,
        )
        return cls(router, settings, worker_slot)

    def load_models(self) -> None:
        """Load and warm up every served model (slow: call it off the event loop).

        ModelLoadError names the model that cannot be served. A version's latest saved
        evaluation is merged into its card: the drift alarm's baseline."""
        file = self.settings.evaluations_file
        evaluations = read_evaluations(file) if file else EvaluationRecord()
        for served in list(self.router.models):
            version = served.ref.version
            try:
                classifier = Classifier(
                    served.path,
                    self.settings.classifier_options(),
                    on_run=partial(metrics.observe_model_run, model_version=version),
                    decoding=self.decoding,
                )
                classifier.card = evaluated_card(
                    classifier.card, served.tag, served.path, evaluations
                )
                classifier.warm_up()
                if self.cache is not None:
                    classifier.fingerprint  # noqa: B018 - hashed here, off the event loop
            except Exception as exc:
                if served is self.router.candidate:  # it must not take the primary's readiness
                    log.error(
                        "candidate %s cannot be served, so the primary is served alone (no "
                        "canary, no shadow): %s", served.tag, exc,
                    )  # fmt: skip
                    self.router.drop_candidate()
                    continue
                raise ModelLoadError(f"model {served.tag} cannot be served: {exc}") from exc
            served.loaded(classifier)
            self.batchers[version] = self._batcher_for(classifier)
            log.info("model %s (%s) loaded and warmed up", served.tag, served.role)
            _warn_if_int8_saturates(served.tag, classifier)

    def _batcher_for(self, classifier: Classifier) -> MicroBatcher:
        """Merging pays for a model whose runs cost mostly per call (small models); one whose
        cost grows with the images runs each image alone. Either way at most MODEL_RUNS runs at
        once: MobileNetV2 at 16 clients on 2 cores served as much with one run at a time per
        worker as with THREADS runs at once, and the extra runs only shared the cores, so the
        slowest answers took longer (a higher p99 in runs interleaved with the default's)."""
        settings = self.settings
        merges = settings.batching and classifier.merging_gain >= settings.batching_min_gain
        if not merges:
            log.info(
                "model %s: no merging (BATCHING %s, a full run %.2fx cheaper per image, "
                "minimum %g)",
                classifier.card.name, settings.batching, classifier.merging_gain,
                settings.batching_min_gain,
            )  # fmt: skip
        return MicroBatcher(
            classifier.run_isolating_faults,
            max_batch=settings.batch_max_size if merges else 1,
            runners=settings.model_runs,
            in_work=self.in_work,
        )

    def info(self) -> dict:
        """What /info shows: the service, its versions, the card's contract and the limits."""
        primary, candidate, settings = self.router.primary, self.router.candidate, self.settings
        card = primary.ready_classifier().card
        return {
            "service": {"name": "image_classifier", "version": __version__},
            "model": primary.ref.model_dump(),
            "candidate": candidate
            and {
                **candidate.ref.model_dump(),
                "canary_fraction": self.router.canary_fraction,
                "shadow_fraction": self.router.shadow_fraction,
            },
            "source": card.source,
            "benchmark_only": card.benchmark_only,
            "labels": card.labels,
            "preprocessing": card.preprocessing.model_dump(mode="json"),
            "output_kind": card.output_kind,
            "metrics": card.metrics.model_dump(mode="json"),
            "training_data_sha256": card.training_data_sha256,
            "batching": {
                "enabled": settings.batching,
                "merges": self.batchers[primary.ref.version].max_batch > 1,
                "measured_gain": round(primary.ready_classifier().merging_gain, 2),
                "min_gain": settings.batching_min_gain,
                "max_batch_size": settings.batch_max_size,
            },
            "sizing": {
                "workers": settings.workers,
                "threads": settings.threads,
                "model_runs": settings.model_runs,
                "ort_intra_op_threads": settings.ort_intra_op_threads,
                "ort_solo_threads": settings.ort_solo_threads,
                "gil_switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),  # in effect
                "thread_nice": settings.thread_nice,
                "chosen_from": settings.sizing,
            },
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_batch_images": settings.max_batch_images,
                "max_batch_bytes": settings.max_batch_bytes,
                "max_image_pixels": settings.max_image_pixels,
                "decoding_pixels": self.decoding.pixels,
                "allowed_formats": list(settings.allowed_formats),
                "max_body_memory": settings.max_body_memory,
            },
            "admission": {
                "auth": bool(settings.api_tokens),
                "rate_limit": settings.rate_limit,
                "shared_state": bool(settings.redis_url),
                **{name: getattr(settings, name) for name in _ADMISSION_SETTINGS},
            },
            "grades": {"high": settings.grade_high, "medium": settings.grade_medium},
        }

    async def answer(
        self, served: ServedVersion, data: bytes, content_type: str | None, top_k: int
    ) -> Answer:
        """One image's prediction (from the cache when on); a fresh one may be shadowed too."""
        cache, classifier = self.cache, served.ready_classifier()
        key = None
        if cache is not None:  # a cached answer is for these bytes as the image they were
            classifier.check_declared_type(data, content_type)
            key = cache.key(data, f"{served.tag}:{classifier.fingerprint}", top_k)
            if (hit := await cache.lookup(key)) is not None:
                return Answer(hit, batch_size=0, cached=True)
        probabilities, merged = await self._predict_one(served, classifier, data, content_type)
        prediction = classifier.to_prediction(probabilities, top_k)
        if key is not None:
            await cache.store(key, prediction)
        self._maybe_shadow(served, data, content_type, prediction.label)
        return Answer(prediction, batch_size=merged, cached=False)

    async def answer_each(
        self, served: ServedVersion, uploads: Sequence[Upload], top_k: int
    ) -> list[Prediction | ClassifierError]:
        """Many images, each on /analyze's path, `answer` (the cache, shadow scoring, model runs
        shared with other requests), at most half the threads at once: one big batch cannot
        starve single requests. An image refused (or failed) stays in its place."""
        fair_share = self._share_of_a_many_image_request()

        async def outcome(data: bytes | ClassifierError, content_type: str | None):
            if isinstance(data, ClassifierError):
                return data
            async with fair_share:
                try:
                    return (await self.answer(served, data, content_type, top_k)).prediction
                except ClassifierError as exc:
                    return exc
                except Exception:  # a fault of ours on one image fails that image, not the rest
                    log.exception("unexpected error on one image of a many-image request")
                    return ClassifierError(
                        ErrorCode.INTERNAL_ERROR, "internal error; quote the request_id"
                    )

        outcomes = await asyncio.gather(*(outcome(data, kind) for data, kind in uploads))
        for item in outcomes:
            if isinstance(item, ClassifierError):
                metrics.observe_item_error(item)
            else:
                served.record(item)
        return outcomes

    async def probabilities(
        self, served: ServedVersion, items: Sequence[bytes | np.ndarray]
    ) -> np.ndarray:
        """Every item's probabilities, or one error for all (Open Inference requests fail as a
        whole). Encoded images take /analyze's own path, `answer` (the cache, shadow scoring: a
        prediction holds every class's probability); tensors already preprocessed go straight to
        the batcher. Both share model runs with every other request."""
        classifier = served.ready_classifier()
        fair_share = self._share_of_a_many_image_request()

        async def prediction(index: int, item: bytes | np.ndarray) -> Prediction:
            async with fair_share:
                try:
                    if isinstance(item, bytes):
                        return (await self.answer(served, item, None, 1)).prediction
                    row, _ = await self._predict_one(served, classifier, item, None)
                    return classifier.to_prediction(row, 1)
                except ClassifierError as error:
                    raise _naming_the_item(error, index) from None

        predictions = await asyncio.gather(*(prediction(i, item) for i, item in enumerate(items)))
        labels = classifier.card.labels
        for answered in predictions:
            served.record(answered)
        rows = [_in_label_order(answered.probabilities, labels) for answered in predictions]
        return np.array(rows, dtype=np.float32)

    def _share_of_a_many_image_request(self) -> anyio.CapacityLimiter:
        """Half the threads at most for one request's images, so single requests keep the rest."""
        return anyio.CapacityLimiter(max(1, self.settings.threads // 2))

    async def _predict_one(
        self,
        served: ServedVersion,
        classifier: Classifier,
        data: bytes | np.ndarray,
        content_type: str | None,
    ) -> tuple[np.ndarray, int]:
        """The probabilities and how many images shared the model run, in one worker thread
        (`data`: an encoded image, or a tensor already preprocessed)."""
        batcher = self.batchers[served.ref.version]
        loop = asyncio.get_running_loop()
        handed_over: asyncio.Future[tuple[Row, int]] = loop.create_future()

        def deliver(row: Row, merged: int) -> None:  # from the thread that ran it
            loop.call_soon_threadsafe(_resolve, handed_over, (row, merged))

        if isinstance(data, np.ndarray):
            prepare = partial(np.asarray, data)  # preprocessed by the client: nothing to do
        else:
            prepare = partial(_timed_prepare, classifier, data, content_type)

        def prepare_and_hand_over() -> tuple[Row, int] | None:
            yield_to_the_event_loop(self.settings.thread_nice)
            return batcher.hand_over(prepare, deliver)

        with self.in_work.counting():  # from its wait for a thread until its row is here
            # Not awaited: the thread may become the runner and go on running the images queued
            # behind this one, for as long as they keep coming (seconds under load). This
            # request's row is delivered as soon as it is known, and it leaves then.
            in_thread = self._keep(
                asyncio.ensure_future(
                    anyio.to_thread.run_sync(prepare_and_hand_over, limiter=self.threads)
                )
            )
            in_thread.add_done_callback(partial(_thread_outcome, handed_over))
            try:
                row, merged = await handed_over
            except asyncio.CancelledError:
                in_thread.cancel()  # while it waits for a thread: nobody wants its work now
                raise
        if isinstance(row, NonFiniteOutput) and isinstance(data, np.ndarray):
            # Values a client chose (finite, but far outside what preprocessing gives) made the
            # model answer NaN or infinity: the request's doing, not a failing model to page for.
            # A model that raises stays a model failure, as does NaN for a picture we preprocessed.
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST,
                "the model answered NaN or infinity for this tensor: send values preprocessed "
                "as the model's config says",
            )
        if isinstance(row, Exception):
            raise model_failure()
        return row, merged

    def _maybe_shadow(
        self, answered: ServedVersion, data: bytes, content_type: str | None, label: str
    ) -> None:
        """Let the candidate score a share of the primary's traffic, after the answer is sent."""
        shadow = self.router.shadow_for(answered)
        if shadow is None:
            return
        self._keep(asyncio.create_task(self._shadow(shadow, data, content_type, label)))

    def _keep(self, task: asyncio.Task) -> asyncio.Task:
        """Keep a reference to a task nobody awaits until it is done (the loop keeps none)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _shadow(
        self, shadow: ServedVersion, data: bytes, content_type: str | None, answered_label: str
    ) -> None:
        try:
            classifier = shadow.ready_classifier()
            probabilities, _ = await self._predict_one(shadow, classifier, data, content_type)
            label = classifier.to_prediction(probabilities, 1).label
            metrics.observe_shadow(shadow.ref.version, agreed=label == answered_label)
        except Exception:
            log.warning("shadow scoring by %s failed", shadow.tag, exc_info=True)


_ADMISSION_SETTINGS = (
    "max_concurrency", "max_receiving", "max_receiving_per_client", "request_timeout_s",
    "body_timeout_s", "body_min_bytes_per_s", "shutdown_grace_s", "grpc_port", "cache_size",
    "cache_ttl_s", "default_top_k",
)  # fmt: skip
_ITEM_ERRORS = {
    ErrorCode.INVALID_IMAGE,
    ErrorCode.IMAGE_TOO_LARGE,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ErrorCode.INVALID_REQUEST,
    ErrorCode.INTERNAL_ERROR,
}


def _naming_the_item(error: ClassifierError, index: int) -> ClassifierError:
    """An error about one item of a request that fails as a whole says which item it was."""
    if error.code not in _ITEM_ERRORS:  # overload, shutdown: about the request, not the item
        return error
    return ClassifierError(error.code, f"item {index}: {error.message}", error.retry_after_s)


def _in_label_order(probabilities: dict[str, float], labels: list[str]) -> list[float]:
    """A prediction's probabilities as the model's row (built in label order: one C-level check
    instead of a lookup per class)."""
    if list(probabilities) == labels:
        return list(probabilities.values())
    return [probabilities[label] for label in labels]


def prediction_cache(settings: Settings) -> PredictionCache | None:
    """None with CACHE_SIZE=0; shared by every replica through Redis when REDIS_URL is set."""
    if not settings.cache_size:
        return None
    if settings.redis_url:
        redis = redis_client(settings.redis_url)
        return SharedPredictionCache(settings.cache_size, settings.cache_ttl_s, redis)
    return PredictionCache(settings.cache_size, settings.cache_ttl_s)


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():  # a request cancelled meanwhile (its client left) has no one to tell
        future.set_result(value)


def _thread_outcome(answer: asyncio.Future, in_thread: asyncio.Task) -> None:
    """What the thread itself says of its image: the row when it ran the image and had nothing
    left to run, why it failed (a bad image), or None: the row comes through `deliver`."""
    if in_thread.cancelled():
        answer.cancel()
    elif (error := in_thread.exception()) is not None:
        if answer.done():  # the row was delivered: the run that followed it failed outside
            log.error("a model runner's thread failed", exc_info=error)
        else:
            answer.set_exception(error)
    elif (ran := in_thread.result()) is not None:
        _resolve(answer, ran)


def _timed_prepare(classifier: Classifier, data: bytes, content_type: str | None) -> np.ndarray:
    started = time.perf_counter()
    tensor = classifier.prepare(data, content_type)
    metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
    return tensor


def _warn_if_int8_saturates(tag: str, classifier: Classifier) -> None:
    """An INT8 model with 8-bit weights answers differently on a CPU without VNNI than its gate
    measured (`machine.int8_saturates`): say so once, at start."""
    gate = classifier.card.metrics.int8_gate
    if gate is not None and gate.get("weight_bits", 8) == 8 and int8_saturates():
        log.warning(
            "model %s is INT8 with 8-bit weights and this CPU has no VNNI: ONNX Runtime's INT8 "
            "kernels saturate here, so its answers may differ from what its gate measured "
            "(quantize it on this kind of CPU for 7-bit weights, or serve the fp32 model)",
            tag,
        )
