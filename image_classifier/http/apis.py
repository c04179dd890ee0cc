"""What the service's upload apis do, so `service.py` only declares them.

Each api gets BentoML's request context (`ctx.request` is a Starlette request, `ctx.response`
takes headers and a status code) and answers a response model, or the error envelope with its
status: the boundary middleware has already admitted the request and scanned its multipart body.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
from starlette.responses import JSONResponse

from ..core.errors import ClassifierError, ErrorCode
from ..serving.predictor import Predictor
from ..serving.routing import ServedVersion
from . import logs
from .envelope import HTTP_STATUS, error_response
from .headers import MODEL_VERSION_HEADER, REQUEST_ID_HEADER
from .schemas import AnalyzeBatchResponse, AnalyzeResponse, BatchItem
from .uploads import UploadPart, scanned_parts


class UploadApis:
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.max_upload_bytes = predictor.settings.max_upload_bytes

    async def analyze(
        self, ctx: Any, image: Path, top_k: int | None
    ) -> AnalyzeResponse | JSONResponse:
        started, request_id = time.perf_counter(), _request_id(ctx)
        try:
            served, k = self._route(ctx, top_k)
            (part,) = scanned_parts(ctx.request.scope)
            data = await self._read(image, part)
            answer = await self.predictor.answer(served, data, part.content_type, k)
        except ClassifierError as exc:
            return _error(exc, request_id, ctx)
        served.record(answer.prediction)
        logs.annotate(
            label=answer.prediction.label, confidence=answer.prediction.confidence,
            batch_size=answer.batch_size, cached=answer.cached,
        )  # fmt: skip
        return AnalyzeResponse(
            request_id=request_id,
            model=served.ref,
            prediction=answer.prediction,
            latency_ms=_ms_since(started),
            cached=answer.cached,
        )

    async def analyze_batch(
        self, ctx: Any, images: list[Path], top_k: int | None
    ) -> AnalyzeBatchResponse | JSONResponse:
        started, request_id = time.perf_counter(), _request_id(ctx)
        try:
            served, k = self._route(ctx, top_k)
        except ClassifierError as exc:
            return _error(exc, request_id, ctx)
        parts = scanned_parts(ctx.request.scope)
        uploads = [
            (await self._read_or_error(path, part), part.content_type)
            for path, part in zip(images, parts, strict=True)
        ]
        outcomes = await self.predictor.answer_each(served, uploads, k)
        failed = sum(isinstance(outcome, ClassifierError) for outcome in outcomes)
        logs.annotate(batch_size=len(outcomes), failed_items=failed)
        results = [
            BatchItem.of(i, part.filename, outcome)
            for i, (outcome, part) in enumerate(zip(outcomes, parts, strict=True))
        ]
        return AnalyzeBatchResponse(
            request_id=request_id, model=served.ref, results=results, latency_ms=_ms_since(started)
        )

    def _route(self, ctx: Any, top_k: int | None) -> tuple[ServedVersion, int]:
        """The version that answers (named in the response headers and the log) and the top_k."""
        served = self.predictor.router.route(ctx.request.headers.get(MODEL_VERSION_HEADER))
        ctx.response.headers[MODEL_VERSION_HEADER] = served.ref.version
        logs.annotate(model_version=served.ref.version)
        return served, served.ready_classifier().resolve_top_k(top_k)

    async def _read(self, path: Path, part: UploadPart) -> bytes:
        if part.size > self.max_upload_bytes:
            raise ClassifierError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the file is over the limit of {self.max_upload_bytes:,} bytes",
            )
        return await anyio.Path(path).read_bytes()

    async def _read_or_error(self, path: Path, part: UploadPart) -> bytes | ClassifierError:
        """One /analyze_batch item's bytes, or the error that refuses only this item."""
        try:
            return await self._read(path, part)
        except ClassifierError as exc:
            return exc


def _request_id(ctx: Any) -> str:
    return ctx.request.headers.get(REQUEST_ID_HEADER, "")


def _error(exc: ClassifierError, request_id: str, ctx: Any) -> JSONResponse:
    ctx.response.status_code = HTTP_STATUS[exc.code]  # BentoML applies it to what an api returns
    return error_response(exc, request_id)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
