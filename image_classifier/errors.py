"""The stable error codes and the one JSON envelope every failure is returned in.

Clients switch on `error.code`, never on messages: codes are part of the API and do not change.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    NOT_FOUND = "NOT_FOUND"
    UNKNOWN_MODEL_VERSION = "UNKNOWN_MODEL_VERSION"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    INVALID_IMAGE = "INVALID_IMAGE"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    NOT_READY = "NOT_READY"
    OVERLOADED = "OVERLOADED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    TIMEOUT = "TIMEOUT"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_MODEL_VERSION: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.INVALID_IMAGE: 422,
    ErrorCode.IMAGE_TOO_LARGE: 422,
    ErrorCode.RATE_LIMITED: 429,
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
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_REQUEST,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.OVERLOADED,
    504: ErrorCode.TIMEOUT,
}


class ClassifierError(Exception):
    """An expected failure with a stable code; its message is safe to show to the client."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # sent as Retry-After (429 and 503 always get one)

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def model_failure() -> ClassifierError:
    """The model itself failed on an input (logged with its traceback); no details leave."""
    return ClassifierError(ErrorCode.INTERNAL_ERROR, "the model failed on this image")


def error_envelope(code: ErrorCode, message: str, request_id: str) -> dict[str, Any]:
    return {
        "success": False,
        "error": {"code": code.value, "message": message},
        "request_id": request_id,
    }


def is_error_envelope(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and body.get("success") is False
        and isinstance(body.get("error"), dict)
        and "code" in body["error"]
    )
