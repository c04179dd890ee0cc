"""Logs as one JSON object per line, and the one access line written for every request.

`use_json_logs()` gives every handler already configured (BentoML's, uvicorn's, circus') the same
JSON formatter, so the service's lines and BentoML's own read alike. Every line written while a
request is in work carries that request's id. The access line (`log_request`) carries what an
operator asks about a request: endpoint, status, latency, model version, label, confidence, batch
size and error code. Never image bytes, never credentials: only the fields named here are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER = "image_classifier.access"
_REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("request_log_fields", default=None)
# Attributes BentoML's log filter adds for its text format; the JSON line has its own fields.
_BENTOML_TEXT_ATTRS = ("levelname_bracketed", "trace_msg", "service_name", "color_message")
_FRAMEWORK_LOGGERS = ("bentoml", "uvicorn", "uvicorn.error", "uvicorn.access", "circus")
# BentoML gives these their own handler and lets them propagate to the root's as well: each of
# their lines was written twice.
_LOGGED_TWICE = ("uvicorn.error", "circus")
# uvicorn's warning for a request head it cannot parse. The access line already says it (400
# INVALID_REQUEST, with the request id), so a flood of garbage writes one line a request, not three.
_UNPARSABLE_HEAD_WARNING = "Invalid HTTP request received."

# The endpoint (access lines, request metrics) of a request no route serves, or whose head could
# not be read: one label, however many made-up URLs come.
UNMATCHED_ENDPOINT = "unmatched"
# What a client's path may carry once percent-decoded that would end a log line or start a
# forged one in the text format (`%0a2026-12-07 [ERROR] ...`, in a review): written escaped.
_ESCAPED = {code: f"\\x{code:02x}" for code in (*range(32), 127, 0x85)} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class JsonLineFormatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            reserved_attrs=[*RESERVED_ATTRS, *_BENTOML_TEXT_ATTRS, "taskName"],
        )

    def add_fields(self, log_record: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_record, record, message_dict)
        fields = _REQUEST.get()
        if fields is not None:  # the project's X-Request-ID, not BentoML's internal trace id
            log_record["request_id"] = fields["request_id"]
        elif not log_record.get("request_id"):
            log_record.pop("request_id", None)


def configure_logging(log_format: str) -> None:
    """The project's INFO lines on (BentoML leaves the root at WARNING); JSON unless 'text'."""
    logging.getLogger("image_classifier").setLevel(logging.INFO)
    for name in _LOGGED_TWICE:
        logger = logging.getLogger(name)
        logger.propagate = not logger.handlers
    logging.getLogger("uvicorn.error").addFilter(_said_already)
    if log_format == "json":
        use_json_logs()


def use_json_logs() -> None:
    """Re-format every configured handler as JSON lines (call after BentoML set logging up)."""
    formatter = JsonLineFormatter()
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in _FRAMEWORK_LOGGERS)]
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(formatter)
    logging.captureWarnings(True)  # warnings too, instead of bare text on stderr


def logged_with_its_request(error: BaseException) -> BaseException:
    """Mark an error logged (with its traceback and request id) that is raised on to the server,
    which would log it again without either."""
    error.__dict__["logged_with_its_request"] = True
    return error


def _said_already(record: logging.LogRecord) -> bool:
    """uvicorn's lines that repeat what a request's own lines said."""
    if record.msg == _UNPARSABLE_HEAD_WARNING:
        return False
    error = record.exc_info[1] if record.exc_info else None
    return not getattr(error, "logged_with_its_request", False)


@contextmanager
def request_context(request_id: str, method: str, path: str) -> Iterator[dict[str, Any]]:
    """The fields of this request's access line; code running for the request adds to them."""
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": method.translate(_ESCAPED),
        "endpoint": path.translate(_ESCAPED),
    }
    token = _REQUEST.set(fields)
    try:
        yield fields
    finally:
        _REQUEST.reset(token)


def annotate(**fields: Any) -> None:
    """Add facts to the current request's access line (no-op outside a request)."""
    current = _REQUEST.get()
    if current is not None:
        current.update({key: value for key, value in fields.items() if value is not None})


def log_request(fields: dict[str, Any], status: int, latency_ms: float) -> None:
    fields.update(status=status, latency_ms=round(latency_ms, 3))
    level = logging.ERROR if status >= 500 else logging.INFO
    message = f"{fields['method']} {fields['endpoint']} {status} {latency_ms:.1f} ms"
    extra = {key: value for key, value in fields.items() if key != "request_id"}
    logging.getLogger(ACCESS_LOGGER).log(level, message, extra=extra)
