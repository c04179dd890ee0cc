"""Workarounds for BentoML 1.4.39 behaviour, each with the reason it was needed here.

Kept apart from `service.py` so the service reads as the API it is, and so each workaround can be
dropped in one place when BentoML fixes it.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import starlette.routing
from _bentoml_sdk.service import openapi as bentoml_openapi
from bentoml._internal.server.http import instruments as bentoml_instruments
from bentoml._internal.server.http import traffic as bentoml_traffic
from bentoml._internal.service.openapi.specification import OpenAPISpecification
from circus import process as circus_process
from circus import sockets as circus_sockets

from image_classifier.http.logs import UNMATCHED_ENDPOINT
from image_classifier.http.routes import UPLOAD_ERRORS
from image_classifier.serving.settings import Settings, start_refused

OPENAPI_VERSION = "3.1.0"
API_SERVER_NAME = "_bento_api_server"  # _bentoml_impl.server.serving's name for the HTTP socket


class _UntimedMiddleware:
    """Stands in for BentoML 1.4.39's TimeoutMiddleware, which never cancels its per-request
    timer: each finished request's context (span, scope, upload) then lived on for `timeout`
    (60 s) — +175 MiB RSS in a 60 s soak at 140 req/s. The deadline is ours instead
    (REQUEST_TIMEOUT_S, enforced in BoundaryMiddleware, answered in the envelope)."""

    def __init__(self, app, timeout: float) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        await self.app(scope, receive, send)


def mend_bentoml() -> None:
    """Call before the server app is built (importing service.py does): BentoML's timeout
    middleware replaced, its request metrics labelled by route, no slash redirects, and the
    apis' error answers and the document's OpenAPI version declared as they are."""
    bentoml_openapi._get_api_routes = _api_routes_answering_the_envelope
    OpenAPISpecification.asdict = _as_openapi_31(OpenAPISpecification.asdict)
    bentoml_traffic.TimeoutMiddleware = _UntimedMiddleware
    bentoml_instruments.RunnerTrafficMetricsMiddleware.__call__ = _metrics_by_route
    starlette.routing.Router.__init__ = _without_slash_redirects(starlette.routing.Router.__init__)


def _as_openapi_31(asdict: Callable[[OpenAPISpecification], dict]) -> Callable:
    """The document as the OpenAPI version its schemas are written in. They are pydantic 2's
    JSON Schema 2020-12 (`type: "null"`, `const`, `prefixItems`): OpenAPI 3.1's dialect, not the
    3.0.2 BentoML declares; and BentoML types an uploaded file `file`, which no OpenAPI version
    has (3.1 writes a string of format binary). Validators and code generators refused it."""

    def as_31(spec: OpenAPISpecification) -> dict:
        document = asdict(spec)
        document["openapi"] = OPENAPI_VERSION
        return _files_as_binary_strings(document)

    return functools.wraps(asdict)(as_31)


def _files_as_binary_strings(node: object) -> object:
    if isinstance(node, list):
        return [_files_as_binary_strings(item) for item in node]
    if not isinstance(node, dict):
        return node
    mended = {key: _files_as_binary_strings(value) for key, value in node.items()}
    if mended.get("type") == "file":
        mended.update(type="string", format="binary")
    return mended


def _api_routes_answering_the_envelope(svc) -> dict:  # noqa: ANN001 - a BentoML Service
    """BentoML documents every api's errors as its own three (400, 404, 500, with its own
    schemas); ours answer in the envelope, with the statuses of `UPLOAD_ERRORS`. Code generated
    from the document, and schemathesis' checks, got every error wrong."""
    envelope = bentoml_openapi.MediaType(
        schema=bentoml_openapi.Reference(bentoml_openapi.REF_TEMPLATE.format(model="ErrorEnvelope"))
    )
    errors = {
        status: bentoml_openapi.Response(description=why, content={"application/json": envelope})
        for status, why in UPLOAD_ERRORS.items()
    }
    routes = _bentoml_api_routes(svc)
    for item in routes.values():
        item.post["responses"] = {
            HTTPStatus.OK.value: item.post["responses"][HTTPStatus.OK.value],
            **errors,
        }
    return routes


def _without_slash_redirects(init):  # noqa: ANN001, ANN202 - Router.__init__ and its wrapper
    """Starlette answers a path with a slash too many or too few (`/info/`) with a 307 to the
    other spelling on the client's own Host header (`Location: http://evil.example/info`, in a
    review): a door to cache poisoning behind a shared cache. Every router is built without:
    such a path is a 404 in the envelope, as any other unknown path."""
    if getattr(init, "without_slash_redirects", False):
        return init

    @functools.wraps(init)
    def build(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        init(self, *args, **kwargs)
        self.redirect_slashes = False

    build.without_slash_redirects = True
    return build


_REAL_SCOPE = "image_classifier.real_scope"


class _RealScope:
    """Between BentoML's request metrics and the app: the app gets the request's own scope."""

    def __init__(self, app) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        await self.app(scope.get(_REAL_SCOPE, scope), receive, send)


async def _metrics_by_route(self, scope, receive, send) -> None:  # noqa: ANN001
    """BentoML labels its request metrics (`bentoml_service_request_*`) with the raw path, so each
    made-up URL, even one refused 401 or 404, added about 20 series to /metrics for good (200
    of them: 4,000 more lines). Here the label is the route's template
    (`/v2/models/{name}/infer`), or `unmatched`."""
    path = scope["path"] if scope["type"] == "http" else None
    label = path and _route_label(scope["app"], path)
    if not label or label == path:
        await _bentoml_request_metrics(self, scope, receive, send)
        return
    if not isinstance(self.app, _RealScope):
        self.app = _RealScope(self.app)
    await _bentoml_request_metrics(
        self, {**scope, "path": label, _REAL_SCOPE: scope}, receive, send
    )


@functools.lru_cache(maxsize=4096)  # bounded: made-up paths only push each other out
def _route_label(app, path: str) -> str:  # noqa: ANN001 - the server's Starlette app
    return next(
        (template for regex, template in _routes(app) if regex.match(path)), UNMATCHED_ENDPOINT
    )


@functools.cache
def _routes(app) -> list[tuple[re.Pattern, str]]:  # noqa: ANN001
    """(regex, template) of every route the app serves, mounted apps' included."""
    found = []

    def collect(routes, prefix: str) -> None:  # noqa: ANN001
        for route in routes:
            sub_routes = getattr(route, "routes", None)
            if sub_routes is not None:  # a Mount
                collect(sub_routes, prefix + route.path)
            elif hasattr(route, "path_regex"):
                pattern = route.path_regex.pattern.removeprefix("^")
                found.append((re.compile("^" + re.escape(prefix) + pattern), prefix + route.path))

    collect(app.routes, "")
    return found


_bentoml_api_routes = bentoml_openapi._get_api_routes
_bentoml_request_metrics = bentoml_instruments.RunnerTrafficMetricsMiddleware.__call__


def _socket_made(sock: circus_sockets.CircusSocket, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - CircusSocket's
    """Where `bentoml serve` makes its HTTP socket, in its arbiter before any worker starts (not
    on `bentoml build`): a taken port stops the start there with one line, and the served
    versions are pinned for the workers (`prepare_serving`).

    With several workers, BentoML binds one listening socket in its arbiter and every worker
    accepts from it: the worker already on a CPU accepts the waiting connections, so 16
    keep-alive clients can all land on one of two workers while the other idles. Here each worker
    gets its own socket (SO_REUSEPORT, as nginx's `reuseport` and gunicorn's `--reuse-port` do)
    and the kernel spreads new connections over the listening ones by a hash of their addresses.
    Each copy is bound before the worker forks but not listened on: the worker's server calls
    `listen` when it starts accepting, so no connection waits in the queue of a worker that is
    still loading (a replacement loads its model first), and one that drains leaves the group."""
    _circus_socket_init(sock, *args, **kwargs)
    sock.copy_per_worker = None
    if sock.name != API_SERVER_NAME:
        return
    if not _serving.started:  # once: a replaced worker's socket is made when the others run
        _serving.started = True
        _refuse_taken_ports(sock)
        _serving.before_workers()
    if _serving.workers > 1 and not sock.so_reuseport and hasattr(socket, "SO_REUSEPORT"):
        sock.so_reuseport = True  # circus then leaves it unbound in the arbiter
        sock.copy_per_worker = lambda: _bound_copy(args, kwargs)


def _refuse_taken_ports(sock: circus_sockets.CircusSocket) -> None:
    """A port another process holds stops the start with one line, not a traceback (HTTP) or a
    worker that fails to bind, dies and is restarted for ever (gRPC)."""
    grpc_port = _serving.grpc_port
    if grpc_port and grpc_port == sock.port:
        raise start_refused(
            f"GRPC_PORT {grpc_port} is the HTTP port too; give gRPC a port of its own, or 0 for "
            "no gRPC"
        )
    for name, port, otherwise in (
        ("the HTTP port", sock.port, "choose another with --port (make serve PORT=...)"),
        (f"GRPC_PORT {grpc_port}", grpc_port, "set GRPC_PORT to a free port, or 0 for no gRPC"),
    ):
        try:
            if port:
                _refuse_a_taken_port(sock.family, sock.host, port)
        except OSError as exc:
            raise start_refused(
                f"{name} ({sock.host}:{port}) cannot be used ({exc.strerror}): another process "
                f"holds it; {otherwise}"
            ) from None


def _bound_copy(args: tuple, kwargs: dict) -> circus_sockets.CircusSocket:
    copy = circus_sockets.CircusSocket(*args, **kwargs, so_reuseport=True)
    copy.bind((copy.host, copy.port))  # the worker's server listens on it once it accepts
    return copy


def _refuse_a_taken_port(family: int, host: str, port: int) -> None:
    """SO_REUSEPORT would let this server join another one already listening on the port (same
    user) and share its connections; a plain bind fails there, as it does without the option."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def _sockets_fds_with_own_listener(process) -> dict[str, int]:  # noqa: ANN001 - circus Process
    fds = _circus_sockets_fds(process)
    watcher = process.watcher  # (a Watcher with no process yet is falsy: it has a length)
    for name, sock in (watcher.sockets or {}).items() if watcher is not None else ():
        if getattr(sock, "copy_per_worker", None):
            own = sock.copy_per_worker()
            process._sockets.append(own)  # circus lets go of it once the worker has forked
            fds[name] = own.fileno()
    return fds


_circus_socket_init = circus_sockets.CircusSocket.__init__
_circus_sockets_fds = circus_process.Process._get_sockets_fds


@dataclass
class _Serving:
    workers: int = 1
    grpc_port: int = 0
    started: bool = False
    before_workers: Callable[[], None] = lambda: None


_serving = _Serving()


def prepare_serving(settings: Settings, before_workers: Callable[[Settings], None]) -> None:
    """Call before `bentoml serve` builds its sockets (importing service.py does: the CLI loads
    the service first): a socket per worker when there are several, and the gRPC port checked;
    `before_workers` runs in the arbiter then, before the workers (and their environment) are
    made."""
    _serving.workers, _serving.grpc_port = settings.workers, settings.grpc_port
    _serving.before_workers = functools.partial(before_workers, settings)
    circus_sockets.CircusSocket.__init__ = _socket_made
    circus_process.Process._get_sockets_fds = _sockets_fds_with_own_listener
