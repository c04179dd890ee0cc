"""The BentoML service: HTTP shape, adaptive batching and probes over the `image_classifier` core.

All image work lives in `image_classifier`; this file only wires it to BentoML. Run it with
`make serve`, or `bentoml serve service:ImageClassifier` once the model is in the store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import anyio
import bentoml
import numpy as np
from starlette.responses import JSONResponse

import bentoml_compat
import image_classifier
from bentoml_compat import MODEL_HELP
from image_classifier import metrics, web
from image_classifier.admission import Gate
from image_classifier.classifier import Classifier
from image_classifier.errors import ClassifierError, ErrorCode, model_failure
from image_classifier.handoff import TicketDesk
from image_classifier.http_boundary import (
    REQUEST_ID_HEADER,
    UPLOADS_STATE_KEY,
    BoundaryMiddleware,
    UploadRoute,
    internal_call,
)
from image_classifier.schemas import (
    AnalyzeBatchResponse,
    AnalyzeResponse,
    BatchItem,
    ModelRef,
)
from image_classifier.settings import Settings
from image_classifier.shutdown import drain_on_sigterm
from image_classifier.uploads import UploadPart, UploadRule

SETTINGS = Settings.from_env()


bentoml_compat.replace_leaking_timeout_middleware()
GATE = Gate(SETTINGS.admission_policy())  # per worker: the middleware admits, SIGTERM drains
log = logging.getLogger("image_classifier.service")


web_app = web.build_app(bentoml.get_current_service, max_items=SETTINGS.max_batch_images)


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.workers,
    # The default (recycle the in-process connection every 100 requests) failed ~5% of self-calls.
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
)
@bentoml.asgi_app(web_app, path="/")  # passive: it claims only its own routes (web.py)
class ImageClassifier:
    model = bentoml.models.BentoModel(bentoml_compat.model_in_store(SETTINGS.model_tag))

    def __init__(self) -> None:
        self.model_ref = ModelRef(name=self.model.tag.name, version=self.model.tag.version)
        self.classifier: Classifier | None = None
        self.desk = TicketDesk()
        self.decode_limiter = anyio.CapacityLimiter(SETTINGS.threads)
        # Load in the background: /livez answers at once, /readyz says 503 until warmed up,
        # and early requests get NOT_READY instead of a refused or hanging connection.
        threading.Thread(target=self._load_model, name="model-loader", daemon=True).start()
        drain_on_sigterm(GATE, SETTINGS.shutdown_grace_s)

    def _load_model(self) -> None:
        tag = f"{self.model_ref.name}:{self.model_ref.version}"
        try:
            classifier = Classifier(Path(self.model.path), SETTINGS)
            classifier.warm_up()
        except Exception as exc:
            log.error("model %s cannot be served, /readyz stays 503: %s. %s", tag, exc, MODEL_HELP)
            return
        self.classifier = classifier
        metrics.MODEL_INFO.labels(name=self.model_ref.name, version=self.model_ref.version).set(1)
        log.info("model %s loaded and warmed up: ready", tag)

    def __is_ready__(self) -> bool:
        return self.classifier is not None and not GATE.draining

    def ready_classifier(self) -> Classifier:
        if self.classifier is None:
            raise ClassifierError(ErrorCode.NOT_READY, "the model is not loaded yet")
        return self.classifier

    def info(self) -> dict:
        return {
            "service": {"name": "image_classifier", "version": image_classifier.__version__},
            "model": self.model_ref.model_dump(),
            **self.ready_classifier().describe_setup(),
        }

    @bentoml.api(route="/analyze")
    async def analyze(
        self, image: Path, top_k: int | None = None, ctx: bentoml.Context = None
    ) -> AnalyzeResponse:
        """Classify one image (multipart field `image`)."""
        started = time.perf_counter()
        request_id = ctx.request.headers.get(REQUEST_ID_HEADER, "")
        try:
            classifier = self.ready_classifier()
            k = classifier.resolve_top_k(top_k)
            (part,) = _upload_parts(ctx)
            tensor = await self._prepare(classifier, image, part)
            probabilities = await self._run_one(classifier, tensor)
            prediction = classifier.describe(probabilities, k)
        except ClassifierError as exc:
            return _error_response(exc, request_id, ctx)
        metrics.observe_prediction(prediction, self.model_ref.version)
        return AnalyzeResponse(
            request_id=request_id,
            model=self.model_ref,
            prediction=prediction,
            latency_ms=_ms_since(started),
        )

    @bentoml.api(route="/analyze_batch")
    async def analyze_batch(
        self, images: list[Path], top_k: int | None = None, ctx: bentoml.Context = None
    ) -> AnalyzeBatchResponse:
        """Classify many images (multipart field `images`); a bad image fails only its own item."""
        started = time.perf_counter()
        request_id = ctx.request.headers.get(REQUEST_ID_HEADER, "")
        try:
            classifier = self.ready_classifier()
            k = classifier.resolve_top_k(top_k)
        except ClassifierError as exc:
            return _error_response(exc, request_id, ctx)
        parts = _upload_parts(ctx)
        items = await asyncio.gather(
            *(
                self._prepare_or_error(classifier, p, part)
                for p, part in zip(images, parts, strict=True)
            )
        )
        outcomes = await anyio.to_thread.run_sync(classifier.describe_batch, items, k)
        for outcome in outcomes:
            metrics.observe_outcome(outcome, self.model_ref.version)
        results = [
            BatchItem.of(i, part.filename, o)
            for i, (o, part) in enumerate(zip(outcomes, parts, strict=True))
        ]
        return AnalyzeBatchResponse(
            request_id=request_id,
            model=self.model_ref,
            results=results,
            latency_ms=_ms_since(started),
        )

    @bentoml.api(
        route="/internal/infer",
        batchable=True,
        max_batch_size=SETTINGS.batch_max_size,
        max_latency_ms=SETTINGS.batch_max_latency_ms,
    )
    def infer(self, tickets: list[str]) -> list[bool]:
        """One model run for every ticket the batcher merged (see image_classifier.handoff)."""
        tensors = self.desk.take_inputs(tickets)
        known = [(ticket, t) for ticket, t in zip(tickets, tensors, strict=True) if t is not None]
        if known:
            rows = self.ready_classifier().predict_each([tensor for _, tensor in known])
            for (ticket, _), row in zip(known, rows, strict=True):
                if row is not None:
                    self.desk.leave_result(ticket, row)
        return [tensor is not None for tensor in tensors]

    async def _prepare(self, classifier: Classifier, path: Path, part: UploadPart) -> np.ndarray:
        if part.size > SETTINGS.max_upload_bytes:
            raise ClassifierError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the file is over the limit of {SETTINGS.max_upload_bytes:,} bytes",
            )
        data = await anyio.Path(path).read_bytes()
        return await anyio.to_thread.run_sync(
            classifier.prepare, data, part.content_type, limiter=self.decode_limiter
        )

    async def _prepare_or_error(
        self, classifier: Classifier, path: Path, part: UploadPart
    ) -> np.ndarray | ClassifierError:
        try:
            return await self._prepare(classifier, path, part)
        except ClassifierError as exc:
            return exc

    async def _run_one(self, classifier: Classifier, tensor: np.ndarray) -> np.ndarray:
        """Through BentoML's batcher when batching is on, so concurrent requests share a run."""
        if not SETTINGS.batching:
            return (await anyio.to_thread.run_sync(classifier.predict_all, [tensor]))[0]
        ticket = self.desk.deposit(tensor)
        try:
            with internal_call():
                await self.to_async.infer([ticket])
            result = self.desk.take_result(ticket)
        except bentoml.exceptions.BentoMLException as exc:
            if getattr(exc, "error_code", None) == 503:
                raise ClassifierError(ErrorCode.OVERLOADED, "the model queue is full") from None
            raise
        finally:
            self.desk.discard(ticket)
        if result is None:
            raise model_failure()
        return result


def _upload_parts(ctx: bentoml.Context) -> list[UploadPart]:
    return ctx.request.scope["state"][UPLOADS_STATE_KEY]


def _error_response(exc: ClassifierError, request_id: str, ctx: bentoml.Context) -> JSONResponse:
    ctx.response.status_code = exc.status  # BentoML applies it to whatever an api returns
    return web.error_response(exc, request_id)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


ImageClassifier.add_asgi_middleware(
    BoundaryMiddleware,
    gate=GATE,
    internal_paths=frozenset({"/internal/infer"}),
    upload_routes={
        "/analyze": UploadRoute(
            UploadRule("image", 1, 1, integer_fields=frozenset({"top_k"})),
            SETTINGS.max_upload_bytes,
        ),
        # Open Inference Protocol: JSON, base64 images (4/3 of their bytes) plus some slack.
        **{
            pattern: UploadRoute(None, SETTINGS.max_batch_bytes * 4 // 3 + 2**20)
            for pattern in ("/v2/models/*/infer", "/v2/models/*/versions/*/infer")
        },
        "/analyze_batch": UploadRoute(
            UploadRule("images", 1, SETTINGS.max_batch_images, integer_fields=frozenset({"top_k"})),
            SETTINGS.max_batch_bytes,
        ),
    },
)
