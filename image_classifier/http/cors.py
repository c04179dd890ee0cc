"""Cross-origin calls (CORS_ORIGINS): Starlette's CORS middleware, its refusals in the envelope.

It is the outermost middleware, so that every answer, the boundary's own refusals too, carries
the origin's headers. A preflight it refuses therefore never reaches the boundary: Starlette's
answer was a bare text 400 with no request id, no error code and no access line. Here it leaves
like every other error of the service.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..core.errors import ClassifierError, ErrorCode
from ..serving import metrics
from . import logs
from .envelope import error_body, error_headers
from .headers import ERROR_CODE_HEADER, MODEL_VERSION_HEADER, REQUEST_ID_HEADER, request_id_for


def cors_options(origins: tuple[str, ...]) -> dict[str, object]:
    """Starlette's CORSMiddleware options for CORS_ORIGINS: the routes' methods, the headers a
    client sends (a token, a request id, a version pin, Triton's binary header) and the ones its
    page may read (the request id, the version that answered, why and how long to wait)."""
    return {
        "allow_origins": list(origins),
        "allow_methods": ["GET", "HEAD", "POST"],
        "allow_headers": [
            "authorization", "content-type", REQUEST_ID_HEADER, MODEL_VERSION_HEADER,
            "inference-header-content-length",
        ],
        "expose_headers": [
            REQUEST_ID_HEADER, MODEL_VERSION_HEADER, ERROR_CODE_HEADER, "retry-after",
        ],
        "max_age": 600,
    }  # fmt: skip


class EnvelopedCORS(CORSMiddleware):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                answer = self.preflight_response(request_headers=headers)
                if answer.status_code >= 400:
                    answer = self._enveloped(scope, headers, answer)
                await answer(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _enveloped(self, scope: Scope, headers: Headers, refusal: Response) -> Response:
        """Starlette's refusal ("Disallowed CORS origin, headers") as the service's error."""
        refused = refusal.body.decode().removeprefix("Disallowed CORS ")
        error = ClassifierError(
            ErrorCode.INVALID_REQUEST,
            f"CORS preflight refused (not allowed: {refused}); allowed origins: "
            f"{', '.join(self.allow_origins)}; methods: {', '.join(sorted(self.allow_methods))}",
        )
        request_id = request_id_for(headers.get(REQUEST_ID_HEADER))
        body = error_body(error, request_id)
        response = Response(body, refusal.status_code)
        response.raw_headers = [
            *(
                (k, v)
                for k, v in refusal.raw_headers
                if k not in (b"content-type", b"content-length")
            ),
            *error_headers(error, request_id, body),
        ]
        metrics.ERRORS.labels(code=error.code.value).inc()
        client = scope.get("client")
        with logs.request_context(request_id, "OPTIONS", scope["path"]) as fields:
            fields.update(client=client[0] if client else "unknown", error_code=error.code.value)
            logs.log_request(fields, refusal.status_code, 0.0)
        return response
