"""Workarounds for BentoML 1.4.39 behaviour, each with the reason it was needed here.

Kept apart from `service.py` so the service reads as the API it is, and so each workaround can be
dropped in one place when BentoML fixes it.
"""

from __future__ import annotations

import bentoml
from bentoml._internal.server.http import traffic as bentoml_traffic

MODEL_HELP = (
    "Run `python -m training_export ensure-default` for the default model, or "
    "`python -m training_export import-onnx` for your own, then start again."
)


def model_in_store(tag: str) -> str:
    """A missing model stops the start with one line saying what to run (not a cloud error)."""
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise SystemExit(f"model {tag} is not in the BentoML model store. {MODEL_HELP}") from None
    return tag


class _UntimedMiddleware:
    """Stands in for BentoML 1.4.39's TimeoutMiddleware, which never cancels its per-request
    timer: each finished request's context (span, scope, upload) then lived on for `timeout`
    (60 s) — +175 MiB RSS in a 60 s soak at 140 req/s. The deadline is ours instead
    (REQUEST_TIMEOUT_S, enforced in BoundaryMiddleware, answered in the envelope)."""

    def __init__(self, app, timeout: float) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        await self.app(scope, receive, send)


def replace_leaking_timeout_middleware() -> None:
    """Call before the server app is built (importing service.py does)."""
    bentoml_traffic.TimeoutMiddleware = _UntimedMiddleware
