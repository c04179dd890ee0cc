"""The one JSON envelope every failure is answered in, and the HTTP status of each error code.

`error_body` is its only writer: the boundary middleware sends it as it is, and the Starlette
routes and the apis answer a `ClassifierError` with `error_response`, which wraps it. Open
Inference routes (`/v2...`) answer in that protocol's own error shape, `{"error": "<CODE>:
<message>"}`, which Triton's and KServe's clients read; every error answer also carries its code in
`X-Error-Code` and the request id in `X-Request-ID`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from ..core.errors import ClassifierError, ErrorCode
from .headers import ERROR_CODE_HEADER, REQUEST_ID_HEADER

INTERNAL_MESSAGE = "internal error; quote the request_id when reporting it"
RETRY_AFTER_S = 1  # on a 429 or 503 that does not say when to come back
BEARER_CHALLENGE = "Bearer"  # a 401 says which scheme it wants (RFC 9110 11.6.1)

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_MODEL_VERSION: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.INVALID_IMAGE: 422,
    ErrorCode.IMAGE_TOO_LARGE: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.HEADERS_TOO_LARGE: 431,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.NOT_READY: 503,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.TIMEOUT: 504,
}

# The code for a non-2xx answer that this project did not write (BentoML's own, Starlette's).
CODE_FOR_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    408: ErrorCode.REQUEST_TIMEOUT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_REQUEST,
    429: ErrorCode.RATE_LIMITED,
    431: ErrorCode.HEADERS_TOO_LARGE,
    503: ErrorCode.OVERLOADED,
    504: ErrorCode.TIMEOUT,
}


def error_envelope(code: ErrorCode | str, message: str, request_id: str) -> dict[str, Any]:
    return {
        "success": False,
        "error": {"code": str(code), "message": message},
        "request_id": request_id,
    }


def error_body(exc: ClassifierError, request_id: str, open_inference: bool = False) -> bytes:
    if open_inference:
        return json.dumps({"error": f"{exc.code}: {exc.message}"}).encode()
    return json.dumps(error_envelope(exc.code, exc.message, request_id)).encode()


def json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


def error_headers(
    exc: ClassifierError, request_id: str, body: bytes, close: bool = False
) -> list[tuple[bytes, bytes]]:
    """The raw headers of an error answer the service writes itself (below any framework):
    JSON type and length, request id, code, Retry-After on 429 and 503, and `Connection: close`
    when the request's body was not read."""
    headers = [
        *json_headers(body),
        (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")),
        (ERROR_CODE_HEADER.encode(), exc.code.value.encode()),
    ]
    headers += [(name.encode(), value.encode()) for name, value in _advice(exc)]
    if close:
        headers.append((b"connection", b"close"))
    return headers


def _advice(exc: ClassifierError) -> list[tuple[str, str]]:
    """What the client should do next: when to retry (429, 503) and how to authenticate (401)."""
    advice = []
    if exc.retry_after_s is not None or HTTP_STATUS[exc.code] in (429, 503):
        retry_after = RETRY_AFTER_S if exc.retry_after_s is None else exc.retry_after_s
        advice.append(("retry-after", str(retry_after)))
    if exc.code is ErrorCode.UNAUTHORIZED:
        advice.append(("www-authenticate", BEARER_CHALLENGE))
    return advice


def is_open_inference_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(exc: ClassifierError, request_id: str, open_inference: bool = False) -> Response:
    """The error body with its status, its code header and the client's advice (`_advice`)."""
    headers = {ERROR_CODE_HEADER: str(exc.code), **dict(_advice(exc))}
    return Response(
        error_body(exc, request_id, open_inference),
        status_code=HTTP_STATUS[exc.code],
        headers=headers,
        media_type="application/json",
    )


def is_open_inference_error(body: Any) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)


def is_error_envelope(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and body.get("success") is False
        and isinstance(body.get("error"), dict)
        and "code" in body["error"]
    )
