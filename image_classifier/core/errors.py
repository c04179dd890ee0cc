"""The stable error codes: every expected failure is a `ClassifierError` carrying one.

Clients switch on the code, never on messages: codes are part of the API and do not change. How a
code travels (an HTTP status, a gRPC status) is the boundary's business (`http/envelope.py`).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    NOT_FOUND = "NOT_FOUND"
    UNKNOWN_MODEL_VERSION = "UNKNOWN_MODEL_VERSION"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    INVALID_IMAGE = "INVALID_IMAGE"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    NOT_READY = "NOT_READY"
    OVERLOADED = "OVERLOADED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    TIMEOUT = "TIMEOUT"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"  # the request's body came too slowly


MAX_MESSAGE_CHARS = 1_000


class ClassifierError(Exception):
    """An expected failure with a stable code; its message is safe to show to the client, and
    short: one that quotes what the client sent (a 100 KB model name) is cut, since a gRPC client
    cannot even read a status whose message is over its 16 KB metadata limit."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: int | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + " [...]"
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # when to try again (overload, rate limit, draining)

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def model_failure() -> ClassifierError:
    """The model itself failed on an input (logged with its traceback); no details leave."""
    return ClassifierError(ErrorCode.INTERNAL_ERROR, "the model failed on this image")
