"""The BentoML service: HTTP shape, adaptive batching and probes over the `image_classifier` core.

All image work lives in `image_classifier`; this file only wires it to BentoML. Run it with
`make serve`, or `bentoml serve service:ImageClassifier` once the model is in the store.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from pathlib import Path

import anyio
import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from image_classifier import metrics
from image_classifier.classifier import Classifier
from image_classifier.errors import ClassifierError, ErrorCode, error_envelope
from image_classifier.handoff import TicketDesk
from image_classifier.http_boundary import (
    REQUEST_ID_HEADER,
    UPLOADS_STATE_KEY,
    BoundaryMiddleware,
    UploadRoute,
)
from image_classifier.schemas import AnalyzeBatchResponse, AnalyzeResponse, BatchItem, ModelRef
from image_classifier.settings import Settings
from image_classifier.uploads import UploadPart, UploadRule

SETTINGS = Settings.from_env()
SERVICE_VERSION = importlib.metadata.version("bento-image-classifier")
log = logging.getLogger("image_classifier.service")


async def _info(request: Request) -> JSONResponse:
    """GET /info: what is being served and how (BentoML apis are POST-only, so a small app)."""
    service = bentoml.get_current_service()
    if service is None:
        return JSONResponse(
            error_envelope(ErrorCode.NOT_READY, "the model is loading", ""), status_code=503
        )
    return JSONResponse(service.info())


info_app = Starlette(routes=[Route("/info", _info, methods=["GET"])])


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.workers,
    # The default (recycle the in-process connection every 100 requests) failed ~5% of self-calls.
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
)
@bentoml.asgi_app(info_app, path="/")  # a passive mount: it only claims GET /info
class ImageClassifier:
    model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        self.classifier = Classifier(Path(self.model.path), SETTINGS)
        self.classifier.warm_up()
        self.model_ref = ModelRef(name=self.model.tag.name, version=self.model.tag.version)
        self.desk = TicketDesk()
        self.decode_limiter = anyio.CapacityLimiter(SETTINGS.threads)
        metrics.MODEL_INFO.labels(name=self.model_ref.name, version=self.model_ref.version).set(1)
        self.ready = True
        log.info("serving %s:%s", self.model_ref.name, self.model_ref.version)

    def __is_ready__(self) -> bool:
        return getattr(self, "ready", False)

    def info(self) -> dict:
        card = self.classifier.card
        return {
            "service": {"name": "image_classifier", "version": SERVICE_VERSION},
            "model": {**self.model_ref.model_dump(), "source": card.source},
            "labels": card.labels,
            "preprocessing": card.preprocessing.model_dump(mode="json"),
            "output_kind": card.output_kind,
            "metrics": card.metrics.model_dump(mode="json"),
            "training_data_sha256": card.training_data_sha256,
            "batching": {
                "enabled": SETTINGS.batching,
                "max_batch_size": SETTINGS.batch_max_size,
                "max_latency_ms": SETTINGS.batch_max_latency_ms,
            },
            "limits": {
                "max_upload_bytes": SETTINGS.max_upload_bytes,
                "max_batch_images": SETTINGS.max_batch_images,
                "max_batch_bytes": SETTINGS.max_batch_bytes,
                "max_image_pixels": SETTINGS.max_image_pixels,
                "allowed_formats": list(SETTINGS.allowed_formats),
            },
            "grades": {"high": SETTINGS.grade_high, "medium": SETTINGS.grade_medium},
        }

    @bentoml.api(route="/analyze")
    async def analyze(
        self, image: Path, top_k: int | None = None, ctx: bentoml.Context = None
    ) -> AnalyzeResponse:
        """Classify one image (multipart field `image`)."""
        started = time.perf_counter()
        request_id = ctx.request.headers.get(REQUEST_ID_HEADER, "")
        try:
            k = self.classifier.resolve_top_k(top_k)
            (part,) = _upload_parts(ctx)
            tensor = await self._prepare(image, part)
            probabilities = await self._run_one(tensor)
            prediction = self.classifier.describe(probabilities, k)
        except ClassifierError as exc:
            return _error_response(exc, request_id)
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
            k = self.classifier.resolve_top_k(top_k)
        except ClassifierError as exc:
            return _error_response(exc, request_id)
        parts = _upload_parts(ctx)
        prepared = await asyncio.gather(
            *(self._prepare_or_error(path, part) for path, part in zip(images, parts, strict=True))
        )
        good = [i for i, item in enumerate(prepared) if not isinstance(item, ClassifierError)]
        probabilities = await anyio.to_thread.run_sync(
            self.classifier.predict, [prepared[i] for i in good]
        )
        predictions = dict(zip(good, probabilities, strict=True))
        results = []
        for index, (item, part) in enumerate(zip(prepared, parts, strict=True)):
            result = BatchItem(index=index, filename=part.filename, success=index in predictions)
            if index in predictions:
                result.prediction = self.classifier.describe(predictions[index], k)
                metrics.observe_prediction(result.prediction, self.model_ref.version)
            else:
                result.error = item.as_dict()
                metrics.ITEM_ERRORS.labels(code=item.code.value).inc()
            results.append(result)
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
            probabilities = self.classifier.predict([tensor for _, tensor in known])
            for (ticket, _), row in zip(known, probabilities, strict=True):
                self.desk.leave_result(ticket, row)
        return [tensor is not None for tensor in tensors]

    async def _prepare(self, path: Path, part: UploadPart) -> np.ndarray:
        if part.size > SETTINGS.max_upload_bytes:
            raise ClassifierError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the file is over the limit of {SETTINGS.max_upload_bytes:,} bytes",
            )
        data = await anyio.Path(path).read_bytes()
        return await anyio.to_thread.run_sync(
            self.classifier.prepare, data, part.content_type, limiter=self.decode_limiter
        )

    async def _prepare_or_error(self, path: Path, part: UploadPart) -> np.ndarray | ClassifierError:
        try:
            return await self._prepare(path, part)
        except ClassifierError as exc:
            return exc

    async def _run_one(self, tensor: np.ndarray) -> np.ndarray:
        """Through BentoML's batcher when batching is on, so concurrent requests share a run."""
        if not SETTINGS.batching:
            probabilities = await anyio.to_thread.run_sync(self.classifier.predict, [tensor])
            return probabilities[0]
        ticket = self.desk.deposit(tensor)
        try:
            await self.to_async.infer([ticket])
            result = self.desk.take_result(ticket)
        except bentoml.exceptions.BentoMLException as exc:
            if getattr(exc, "error_code", None) == 503:
                raise ClassifierError(ErrorCode.OVERLOADED, "the model queue is full") from None
            raise
        finally:
            self.desk.discard(ticket)
        if result is None:
            raise RuntimeError("batched run returned no result for a ticket")
        return result


def _upload_parts(ctx: bentoml.Context) -> list[UploadPart]:
    return ctx.request.scope["state"][UPLOADS_STATE_KEY]


def _error_response(exc: ClassifierError, request_id: str) -> JSONResponse:
    return JSONResponse(error_envelope(exc.code, exc.message, request_id), status_code=exc.status)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


ImageClassifier.add_asgi_middleware(
    BoundaryMiddleware,
    upload_routes={
        "/analyze": UploadRoute(
            UploadRule("image", 1, 1, frozenset({"top_k"})), SETTINGS.max_upload_bytes
        ),
        "/analyze_batch": UploadRoute(
            UploadRule("images", 1, SETTINGS.max_batch_images, frozenset({"top_k"})),
            SETTINGS.max_batch_bytes,
        ),
    },
)
