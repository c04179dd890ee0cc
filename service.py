"""The BentoML service: HTTP shape, adaptive batching and probes over the `image_classifier` core.

All image work lives in `image_classifier`; this file only wires it to BentoML. Run it with
`make serve`, or `bentoml serve service:ImageClassifier` once the model is in the store.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import anyio
import bentoml
from starlette.responses import JSONResponse

import bentoml_compat
import image_classifier
from bentoml_compat import MODEL_HELP
from image_classifier import logs, metrics, runtime, web
from image_classifier.admission import Gate
from image_classifier.errors import ClassifierError, ErrorCode
from image_classifier.http_boundary import (
    REQUEST_ID_HEADER,
    UPLOADS_STATE_KEY,
    BoundaryMiddleware,
    UploadRoute,
)
from image_classifier.predictor import Predictor
from image_classifier.routing import MODEL_VERSION_HEADER, ModelRouter, ServedModel
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
runtime.limit_malloc_arenas()  # before any thread starts: bounded memory per worker
logs.configure_logging(SETTINGS.log_format)  # BentoML configured logging before importing us

bentoml_compat.replace_leaking_timeout_middleware()
GATE = Gate(SETTINGS.admission_policy())  # per worker: the middleware admits, SIGTERM drains
log = logging.getLogger("image_classifier.service")


web_app = web.build_app(bentoml.get_current_service, max_items=SETTINGS.max_batch_images)


def _store_model(tag: str) -> bentoml.models.BentoModel | None:
    return bentoml.models.BentoModel(bentoml_compat.model_in_store(tag)) if tag else None


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.workers,
    # One access line per request is ours (JSON, with model version, label and error code).
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(web_app, path="/")  # passive: it claims only its own routes (web.py)
class ImageClassifier:
    # Class level, so `bentoml build` packages them: the served version and an optional candidate.
    model = _store_model(SETTINGS.model_tag)
    candidate = _store_model(SETTINGS.candidate_model_tag)

    def __init__(self) -> None:
        served = [
            ServedModel(
                ModelRef(name=m.tag.name, version=m.tag.version),
                role,
                Path(m.path),
                drift_window=SETTINGS.drift_window,
                drift_max_drop=SETTINGS.drift_max_drop,
            )
            for m, role in ((self.model, "primary"), (self.candidate, "candidate"))
            if m is not None
        ]
        self.router = ModelRouter(
            *served,
            canary_fraction=SETTINGS.canary_fraction,
            shadow_fraction=SETTINGS.shadow_fraction,
        )
        self.predictor = Predictor(self.router, SETTINGS)
        self.decode_limiter = self.predictor.decode_limiter  # web.py's routes decode there too
        # Load in the background: /livez answers at once, /readyz says 503 until warmed up,
        # and early requests get NOT_READY instead of a refused or hanging connection.
        threading.Thread(target=self._load_models, name="model-loader", daemon=True).start()
        drain_on_sigterm(GATE, SETTINGS.shutdown_grace_s)

    def _load_models(self) -> None:
        try:
            self.predictor.load_models()
        except Exception as exc:
            log.error("%s; /readyz stays 503. %s", exc, MODEL_HELP)
            return
        self.__is_ready__()

    def __is_ready__(self) -> bool:
        ready = self.router.all_loaded() and not GATE.draining
        metrics.READY.set(1 if ready else 0)
        return ready

    def info(self) -> dict:
        candidate = self.router.candidate
        return {
            "service": {"name": "image_classifier", "version": image_classifier.__version__},
            "model": self.router.primary.ref.model_dump(),
            "candidate": candidate
            and {
                **candidate.ref.model_dump(),
                "canary_fraction": self.router.canary_fraction,
                "shadow_fraction": self.router.shadow_fraction,
            },
            **self.router.primary.ready_classifier().describe_setup(),
        }

    @bentoml.api(route="/analyze")
    async def analyze(
        self, image: Path, top_k: int | None = None, ctx: bentoml.Context = None
    ) -> AnalyzeResponse:
        """Classify one image (multipart field `image`). Header `X-Model-Version` pins a version."""
        started = time.perf_counter()
        request_id = ctx.request.headers.get(REQUEST_ID_HEADER, "")
        try:
            served = self._route(ctx)
            classifier = served.ready_classifier()
            k = classifier.resolve_top_k(top_k)
            (part,) = _upload_parts(ctx)
            data = await _read_upload(image, part)
            prediction, merged, cached = await self.predictor.answer(
                served, data, part.content_type, k
            )
        except ClassifierError as exc:
            return _error_response(exc, request_id, ctx)
        served.record(prediction)
        logs.annotate(
            label=prediction.label, confidence=prediction.confidence, batch_size=merged,
            cached=cached,
        )  # fmt: skip
        return AnalyzeResponse(
            request_id=request_id,
            model=served.ref,
            prediction=prediction,
            latency_ms=_ms_since(started),
            cached=cached,
        )

    @bentoml.api(route="/analyze_batch")
    async def analyze_batch(
        self, images: list[Path], top_k: int | None = None, ctx: bentoml.Context = None
    ) -> AnalyzeBatchResponse:
        """Classify many images (multipart field `images`); a bad image fails only its own item."""
        started = time.perf_counter()
        request_id = ctx.request.headers.get(REQUEST_ID_HEADER, "")
        try:
            served = self._route(ctx)
            classifier = served.ready_classifier()
            k = classifier.resolve_top_k(top_k)
        except ClassifierError as exc:
            return _error_response(exc, request_id, ctx)
        parts = _upload_parts(ctx)
        uploads = [
            (await _read_upload_or_error(path, part), part.content_type)
            for path, part in zip(images, parts, strict=True)
        ]
        outcomes = await self.predictor.answer_each(served, uploads, k)
        failed = sum(isinstance(outcome, ClassifierError) for outcome in outcomes)
        logs.annotate(batch_size=len(outcomes), failed_items=failed)
        results = [
            BatchItem.of(i, part.filename, o)
            for i, (o, part) in enumerate(zip(outcomes, parts, strict=True))
        ]
        return AnalyzeBatchResponse(
            request_id=request_id,
            model=served.ref,
            results=results,
            latency_ms=_ms_since(started),
        )

    def _route(self, ctx: bentoml.Context) -> ServedModel:
        served = self.router.route(ctx.request.headers.get(MODEL_VERSION_HEADER))
        ctx.response.headers[MODEL_VERSION_HEADER] = served.ref.version
        logs.annotate(model_version=served.ref.version)
        return served


async def _read_upload(path: Path, part: UploadPart) -> bytes:
    if part.size > SETTINGS.max_upload_bytes:
        raise ClassifierError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the file is over the limit of {SETTINGS.max_upload_bytes:,} bytes",
        )
    return await anyio.Path(path).read_bytes()


async def _read_upload_or_error(path: Path, part: UploadPart) -> bytes | ClassifierError:
    """One /analyze_batch item's bytes, or the error that refuses only this item."""
    try:
        return await _read_upload(path, part)
    except ClassifierError as exc:
        return exc


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
