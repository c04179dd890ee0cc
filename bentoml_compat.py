"""Workarounds for BentoML 1.4.39 behaviour, each with the reason it was needed here.

Kept apart from `service.py` so the service reads as the API it is, and so each workaround can be
dropped in one place when BentoML fixes it.
"""

from __future__ import annotations

from bentoml._internal.server.http import traffic as bentoml_traffic


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
