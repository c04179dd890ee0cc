"""The service's HTTP boundary as plain ASGI middleware: request ids, body caps, one error envelope.

It sits in front of the framework's request handling, so:
- every response carries `X-Request-ID` (the client's, when it is a safe token, else a new UUID4),
  and the handlers see the same id in the request headers;
- upload routes get their byte cap enforced while the body streams in (Content-Length over the cap
  is refused before a byte is read); their multipart body is parsed once, in memory, and handed
  to the api that answers it (`uploads.py`), below the framework's own IO layer (which would
  parse it again and write each file to a temporary file first);
- API routes pass the admission gate (token, rate limit, in-flight cap, deadline; `admission.py`);
- every non-2xx answer, whoever produced it, leaves in the project's envelope with a stable code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.errors import ClassifierError, ErrorCode
from ..serving import metrics
from . import logs
from .admission import AdmissionPolicy, Gate, is_open_path
from .body import BodyPace, ClientGone, discard_body, protocol_refusal, read_body
from .envelope import (
    CODE_FOR_STATUS,
    HTTP_STATUS,
    INTERNAL_MESSAGE,
    RETRY_AFTER_S,
    error_body,
    error_headers,
    is_error_envelope,
    is_open_inference_error,
    is_open_inference_path,
    json_headers,
)
from .headers import ERROR_CODE_HEADER, MODEL_VERSION_HEADER, REQUEST_ID_HEADER, request_id_for
from .uploads import Upload, UploadRoute, multipart_boundary, parse_multipart, route_for

log = logging.getLogger(__name__)
_REQUEST_ID_KEY = REQUEST_ID_HEADER.encode("latin-1")
_ERROR_CODE_KEY = ERROR_CODE_HEADER.encode("latin-1")
_MODEL_VERSION_KEY = MODEL_VERSION_HEADER.encode("latin-1")
_REPLACED_HEADERS = (b"content-length", b"content-type", b"retry-after", _ERROR_CODE_KEY)
# Not access-logged (as BentoML's own access log): polled every few seconds, they would drown it.
_UNLOGGED_PATHS = frozenset({"/metrics", "/healthz", "/livez", "/readyz", "/v2/health/live",
                             "/v2/health/ready"})  # fmt: skip


class BoundaryMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        upload_routes: dict[str, UploadRoute],
        gate: Gate | None = None,
        readiness_path: str = "/readyz",
        pace: BodyPace | None = None,
    ) -> None:
        self.app = app
        self.upload_routes = upload_routes
        self.gate = gate or Gate(AdmissionPolicy())
        self.pace = pace or BodyPace()
        self.readiness_path = readiness_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _adopt_request_id(scope)
        path = scope["path"]
        readiness = None
        if path == self.readiness_path:  # its 503 says why
            readiness = ErrorCode.SHUTTING_DOWN if self.gate.draining else ErrorCode.NOT_READY
        send = _EnvelopingSend(send, request_id, readiness, is_open_inference_path(path))
        with logs.request_context(request_id, scope["method"], scope["path"]) as log_fields:
            try:
                await self._answer(scope, receive, send, request_id)
            finally:
                if scope["path"] not in _UNLOGGED_PATHS:
                    if send.error_code is not None:
                        log_fields["error_code"] = send.error_code
                    status = send.status or 499  # 499: the client left before any answer
                    logs.log_request(log_fields, status, (time.perf_counter() - started) * 1000)

    async def _answer(self, scope: Scope, receive: Receive, send: _EnvelopingSend, request_id: str):
        try:
            async with asyncio.timeout(self.gate.policy.request_timeout_s) as deadline:
                with self.gate.cut_short_at_shutdown(deadline):
                    await self._admit(scope, receive, send, request_id)
        except ClientGone:
            return  # no answer to send: the access line says 499
        except ClassifierError as exc:
            # (Refused from its head while the protocol refused its broken body: the client got
            # the protocol's answer.)
            await send.error(protocol_refusal() or exc)
        except TimeoutError:
            if send.started:  # too late for an answer of our own; the client sees a cut response
                raise
            if self.gate.cut_short:
                await send.error(self.gate.shutdown_cut())
                return
            message = f"no answer within {self.gate.policy.request_timeout_s:g} s"
            await send.error(ClassifierError(ErrorCode.TIMEOUT, message))
        except Exception as error:  # a bug: logged with its traceback, the client gets the envelope
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if send.started:  # too late for the envelope: the server cuts the answer
                logs.logged_with_its_request(error)
                raise
            await send.error(ClassifierError(ErrorCode.INTERNAL_ERROR, INTERNAL_MESSAGE))

    async def _admit(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        path = scope["path"]
        # Who sent it, on its access line: a 401 or 429 must be traceable to a client.
        logs.annotate(client=_client_address(scope).removeprefix("addr:"))
        client = None
        if not is_open_path(path):
            client = self.gate.authenticate(_header(scope, "authorization"))
            client = client or _client_address(scope)
            await self.gate.check_rate(client)
        _refuse_two_pins(scope)
        route = route_for(self.upload_routes, path)
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        client = client or _client_address(scope)
        body_bytes = _body_bytes(scope, route.max_bytes)
        send.close_connection = True  # an answer before the whole body is in ends the connection
        try:
            # A SIGTERM drain also waits for bodies coming in.
            self.gate.start_receiving(client, body_bytes)
        except ClassifierError:
            # Answer after the body (no reset under the client), unless it comes too slowly.
            send.close_connection = not await discard_body(receive, self.pace)
            raise
        try:
            await self._upload(scope, receive, send, request_id, route, client)
        finally:
            self.gate.release_body(body_bytes)

    async def _upload(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, route: UploadRoute,
        client: str,
    ) -> None:  # fmt: skip
        """Its body read against the clock and the cap, then worked on in a slot, then answered."""
        path = scope["path"]
        try:
            receiving = time.perf_counter()
            if route.rule is not None and route.answer is not None:
                # Refused from its head, before its body is asked for: a client waiting on
                # `Expect: 100-continue` (curl, above 1 MB) then sends nothing in vain.
                multipart_boundary(_header(scope, "content-type"), route.rule)
            body = await read_body(
                receive, _header(scope, "content-length"), route.max_bytes, self.pace,
                encoding=_all_values(scope, "content-encoding"),
            )  # fmt: skip
            metrics.BODY_SECONDS.observe(time.perf_counter() - receiving)
            send.close_connection = False
        finally:
            self.gate.stop_receiving(client)
        await self.gate.enter()
        try:
            if route.answer_body is not None:  # a body format of its own (Open Inference)
                whole = b"".join(body)
                del body  # its chunks: the joined copy is what the work holds (one, not two)
                response = await route.answer_body(path, Headers(scope=scope), whole)
            elif route.rule is None or route.answer is None:  # capped only: the framework parses
                await self.app(scope, _replay(b"".join(body), receive), send)
                return
            else:
                files, integers = parse_multipart(
                    _header(scope, "content-type"), body, route.rule, scope.get("query_string", b"")
                )
                del body  # the files hold their own bytes now
                upload = Upload(request_id, _header(scope, MODEL_VERSION_HEADER), files, integers)
                response = await route.answer(upload)
        finally:
            self.gate.leave()
        with self.gate.responding():  # a client that never reads its answer holds no work slot
            answered = time.perf_counter()
            await response(scope, receive, send)
            metrics.RESPOND_SECONDS.observe(time.perf_counter() - answered)


def _body_bytes(scope: Scope, max_bytes: int) -> int:
    """What a body will hold in memory at most: its declared length (one over the cap is refused
    before it is read), else (chunked, or compressed) the route's cap."""
    declared = _header(scope, "content-length")
    if (
        declared is None
        or not (declared.isascii() and declared.isdigit())
        or _header(scope, "content-encoding")
    ):
        return max_bytes
    return min(int(declared), max_bytes)


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.encode("latin-1")
    for key, value in scope.get("headers", []):
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


def _all_values(scope: Scope, name: str) -> str | None:
    """A header sent several times, as the one comma-separated list it means (RFC 9110 5.3)."""
    wanted = name.encode("latin-1")
    values = [value for key, value in scope.get("headers", []) if key.lower() == wanted]
    return b", ".join(values).decode("latin-1") if values else None


def _refuse_two_pins(scope: Scope) -> None:
    """X-Model-Version given twice with two versions: which was meant is unknown (the first was
    served, silently), as for two Inference-Header-Content-Length values."""
    pins = {v for k, v in scope.get("headers", []) if k.lower() == _MODEL_VERSION_KEY}
    if len(pins) > 1:
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST,
            f"{MODEL_VERSION_HEADER} is given {len(pins)} different versions; give one",
        )


def _set_header(scope: Scope, name: str, value: str) -> None:
    """In the list itself, which the protocol holds too (`protocol.py` reads the request id
    there when it answers for the handler)."""
    key = name.encode("latin-1")
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != key]
    headers.append((key, value.encode("latin-1")))
    if isinstance(scope.get("headers"), list):
        scope["headers"][:] = headers
    else:
        scope["headers"] = headers


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def _adopt_request_id(scope: Scope) -> str:
    """Keep the client's id when safe; either way, downstream sees exactly one valid id."""
    request_id = request_id_for(_header(scope, REQUEST_ID_HEADER))
    _set_header(scope, REQUEST_ID_HEADER, request_id)
    return request_id


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _EnvelopingSend:
    """Adds X-Request-ID to every response and rewrites foreign error bodies into the envelope
    (into the protocol's error shape on Open Inference routes)."""

    def __init__(
        self,
        send: Send,
        request_id: str,
        readiness: ErrorCode | None,
        open_inference: bool = False,
    ) -> None:
        self.send = send
        self.request_id = request_id
        self.readiness = readiness  # on the readiness probe: the code of its 503
        self.open_inference = open_inference
        self.held_start: Message | None = None
        self.held_body: list[bytes] = []
        self.started = False
        self.status: int | None = None
        self.error_code: str | None = None
        self.close_connection = False  # answering before the request's body was read

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            headers = [
                (k, v) for k, v in message.get("headers", []) if k.lower() != _REQUEST_ID_KEY
            ]
            headers.append((_REQUEST_ID_KEY, self.request_id.encode("latin-1")))
            message["headers"] = headers
            if message["status"] >= 400:
                self.held_start = message
                return
        elif message["type"] == "http.response.body" and self.held_start is not None:
            self.held_body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await self._send_enveloped()
            return
        await self.send(message)

    async def error(self, exc: ClassifierError) -> None:
        """Our own error: already in the envelope, so sent straight on (a refusal stays cheap)."""
        body = error_body(exc, self.request_id, self.open_inference)
        headers = error_headers(exc, self.request_id, body, close=self.close_connection)
        self.started, self.status, self.error_code = True, HTTP_STATUS[exc.code], exc.code.value
        metrics.ERRORS.labels(code=self.error_code).inc()
        await self.send({"type": "http.response.start", "status": self.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def _send_enveloped(self) -> None:
        start, body = self.held_start, b"".join(self.held_body)
        assert start is not None
        self.held_start = None
        status = start["status"]
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        extra: list[tuple[bytes, bytes]] = []
        retry_after = _header({"headers": start["headers"]}, "retry-after") or str(RETRY_AFTER_S)
        given_code = _header({"headers": start["headers"]}, ERROR_CODE_HEADER)
        if is_error_envelope(parsed):
            code = parsed["error"]["code"]
        elif given_code and self.open_inference and is_open_inference_error(parsed):
            code = given_code  # our own, already in the protocol's shape
        else:
            code = self._code_for(status)
            message = _message_from(status, parsed, body)
            body = error_body(ClassifierError(code, message), self.request_id, self.open_inference)
        self.error_code = str(code)
        metrics.ERRORS.labels(code=self.error_code).inc()
        if status in (429, 503):
            extra.append((b"retry-after", retry_after.encode("latin-1")))
        kept = [
            (k, _with_head(v) if k.lower() == b"allow" else v)
            for k, v in start["headers"]
            if k.lower() not in _REPLACED_HEADERS
        ]
        extra.append((_ERROR_CODE_KEY, str(code).encode("latin-1")))
        start["headers"] = kept + json_headers(body) + extra
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body})

    def _code_for(self, status: int) -> ErrorCode:
        if status == 503 and self.readiness is not None:
            return self.readiness
        if status in CODE_FOR_STATUS:
            return CODE_FOR_STATUS[status]
        return ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.INVALID_REQUEST


def _with_head(allow: bytes) -> bytes:
    """A 405's Allow with HEAD wherever GET is (RFC 9110 9.3.2; every GET route answers HEAD,
    `routes._answer_head`): Starlette names the methods of the first route matching the path."""
    methods = [method.strip() for method in allow.decode("latin-1").split(",")]
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")
    return ", ".join(methods).encode("latin-1")


def _message_from(status: int, parsed: Any, raw: bytes) -> str:
    """A client-safe message from a framework error body; 5xx details are never passed on."""
    if status >= 500 and status not in (503, 504):
        return INTERNAL_MESSAGE
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    if isinstance(parsed, dict):
        detail = parsed.get("detail")
        if isinstance(detail, list) and detail:
            return "; ".join(_describe_validation_error(item) for item in detail[:5])
        for key in ("error", "detail", "message"):
            if isinstance(parsed.get(key), str):
                return parsed[key]
    text = raw.decode("utf-8", "replace").strip()
    return text[:200] if text else f"HTTP {status}"


def _describe_validation_error(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)[:200]
    location = ".".join(str(part) for part in item.get("loc", []) if part != "body")
    message = str(item.get("msg", "invalid value"))
    return f"{location}: {message}" if location else message
