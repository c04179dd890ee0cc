"""What the upload apis do, so `service.py` only declares them.

The boundary middleware admits the request, parses its multipart body in memory and hands the
`Upload` to the method named like the api; the answer is the response model as JSON, or the
error envelope with its status. The BentoML api methods (called in-process, not over HTTP, where
the middleware answers first) reach the same methods through `Upload`s made from their files.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel
from starlette.responses import Response

from ..core.errors import ClassifierError, ErrorCode
from ..serving.predictor import Predictor
from ..serving.routing import ServedVersion
from . import logs
from .envelope import error_response
from .headers import MODEL_VERSION_HEADER, REQUEST_ID_HEADER
from .schemas import AnalyzeBatchResponse, AnalyzeResponse, BatchItem
from .uploads import Upload, UploadPart


class UploadApis:
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.max_upload_bytes = predictor.settings.max_upload_bytes

    async def analyze(self, upload: Upload) -> Response:
        started, served = time.perf_counter(), None
        try:
            served = self._route(upload)
            top_k = _top_k(served, upload)
            (part,) = upload.files
            self._check_size(part)
            answer = await self.predictor.answer(served, part.data, part.content_type, top_k)
        except ClassifierError as exc:
            return _error(exc, upload, served)
        served.record(answer.prediction)
        logs.annotate(
            label=answer.prediction.label, confidence=answer.prediction.confidence,
            batch_size=answer.batch_size, cached=answer.cached,
        )  # fmt: skip
        response = AnalyzeResponse(
            request_id=upload.request_id,
            model=served.ref,
            prediction=answer.prediction,
            latency_ms=_ms_since(started),
            cached=answer.cached,
        )
        return _json(response, served)

    async def analyze_batch(self, upload: Upload) -> Response:
        started, served = time.perf_counter(), None
        try:
            served = self._route(upload)
            top_k = _top_k(served, upload)
        except ClassifierError as exc:
            return _error(exc, upload, served)
        items = [self._bytes_or_error(part) for part in upload.files]
        outcomes = await self.predictor.answer_each(served, items, top_k)
        failed = sum(isinstance(outcome, ClassifierError) for outcome in outcomes)
        logs.annotate(batch_size=len(outcomes), failed_items=failed)
        results = [
            BatchItem.of(i, part.filename, outcome)
            for i, (outcome, part) in enumerate(zip(outcomes, upload.files, strict=True))
        ]
        response = AnalyzeBatchResponse(
            request_id=upload.request_id,
            model=served.ref,
            results=results,
            latency_ms=_ms_since(started),
        )
        return _json(response, served)

    def _route(self, upload: Upload) -> ServedVersion:
        """The version that answers (named in the response and the log)."""
        served = self.predictor.router.route(upload.model_version)
        logs.annotate(model_version=served.ref.version)
        return served

    def _check_size(self, part: UploadPart) -> None:
        if part.size > self.max_upload_bytes:
            raise ClassifierError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the file is over the limit of {self.max_upload_bytes:,} bytes",
            )

    def _bytes_or_error(self, part: UploadPart) -> tuple[bytes | ClassifierError, str | None]:
        """One /analyze_batch item's bytes, or the error that refuses only this item."""
        try:
            self._check_size(part)
        except ClassifierError as exc:
            return exc, part.content_type
        return part.data, part.content_type


def upload_of(files: list[Path], top_k: int | None, headers: Mapping[str, str]) -> Upload:
    """An `Upload` from the files an api method was given in-process (types from the bytes)."""
    parts = []
    for path in files:
        data = path.read_bytes()
        parts.append(UploadPart("file", path.name, None, len(data), data))
    integers = {} if top_k is None else {"top_k": top_k}
    return Upload(
        headers.get(REQUEST_ID_HEADER, ""), headers.get(MODEL_VERSION_HEADER), parts, integers
    )


def _top_k(served: ServedVersion, upload: Upload) -> int:
    return served.ready_classifier().resolve_top_k(upload.integers.get("top_k"))


def _error(exc: ClassifierError, upload: Upload, served: ServedVersion | None) -> Response:
    response = error_response(exc, upload.request_id)
    if served is not None:  # the version that refused it, as on every answer
        response.headers[MODEL_VERSION_HEADER] = served.ref.version
    return response


def _json(body: BaseModel, served: ServedVersion) -> Response:
    return Response(
        body.model_dump_json(),
        media_type="application/json",
        headers={MODEL_VERSION_HEADER: served.ref.version},
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
