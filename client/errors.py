"""Typed errors for the clients, built from the service's one error envelope.

Every non-2xx answer of the service is `{"success": false, "error": {"code", "message"},
"request_id"}`; callers switch on the exception class (or on `.code`), never on messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class ClassifierClientError(Exception):
    """A request the service refused or failed. `status` is 0 when no HTTP answer came back."""

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        status: int = 0,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.status = status
        self.retry_after = retry_after  # seconds, from the Retry-After header (429 and 503)


class InvalidInput(ClassifierClientError):
    """The image or the request is wrong (400, 404, 405, 413, 415, 422): retrying will not help."""


class Unauthorized(ClassifierClientError):
    """No valid `Authorization: Bearer` token (401, 403)."""


class RateLimited(ClassifierClientError):
    """Over this client's RATE_LIMIT (429): come back after `retry_after` seconds."""


class Overloaded(ClassifierClientError):
    """Busy, loading or shutting down (503): come back after `retry_after` seconds."""


class ServerError(ClassifierClientError):
    """The service failed (500, 504, anything else unexpected)."""


class Unreachable(ClassifierClientError):
    """No HTTP answer at all: wrong URL, server down, connection cut."""


class TimedOut(ClassifierClientError):
    """No answer within the client's timeout: the server is up (it took the request) but slow or
    stuck, so this request failed, not the server; sending it again may work."""


RETRYABLE = (RateLimited, Overloaded)


def error_for(
    status: int, body: str, headers: Mapping[str, str] | None = None
) -> ClassifierClientError:
    """The typed error for one non-2xx answer: its status, raw body text and headers."""
    headers = headers or {}
    code, message, request_id = _read_envelope(body)
    request_id = request_id or headers.get("x-request-id")
    return _class_for(status)(
        code or f"HTTP_{status}",
        message or body[:500],
        request_id=request_id,
        status=status,
        retry_after=_seconds(headers.get("retry-after")),
    )


def _class_for(status: int) -> type[ClassifierClientError]:
    if status in (401, 403):
        return Unauthorized
    if status == 429:
        return RateLimited
    if status == 503:
        return Overloaded
    if 400 <= status < 500:
        return InvalidInput
    return ServerError


def _read_envelope(body: str) -> tuple[str | None, str | None, str | None]:
    """(code, message, request_id) from the envelope; Nones when the body is not one."""
    try:
        data = json.loads(body)
        error = data["error"]
        return str(error["code"]), str(error["message"]), data.get("request_id")
    except (ValueError, KeyError, TypeError):
        return None, None, None


def _seconds(value: str | None) -> float | None:
    """Retry-After in its delta-seconds form (the only form this service sends)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
