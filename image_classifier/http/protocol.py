"""The HTTP/1.1 protocol the workers speak: uvicorn's httptools protocol, with two checks made
while a request's head is parsed, before any ASGI work (and, with several workers, the
connection balance of `balance.py` asked there too).

Caps on the head. uvicorn reads a request's headers for as long as they keep coming: one 10 MB
header line, or 100,000 headers, were read whole and answered 200 (measured on this service);
a URL is counted as it comes, too.
Here the head's bytes and headers are counted as the parser goes and, over either cap, the answer
is 431 HEADERS_TOO_LARGE in the envelope and the connection is closed, so a head costs at most one
read buffer beyond its cap.

Early refusals. Under overload most requests are refused, so a refusal must cost far less than
an answer, or the refusals eat the capacity they protect. Through BentoML's and Starlette's
middlewares and our own boundary, a 503 cost about 350 CPU-µs, against 2.6 CPU-ms for a digit
classified (measured with `hey` on this service). So when the admission gate has no work slot (or
the worker drains), a POST to a route that does work gets its 503 from here, when its head is
complete: no task, no middleware, one write. Its body, if any, is read and dropped within the
body deadline (`_refused_early` says when the answer goes). These refusals are counted in
`image_classifier_errors_total` and `image_classifier_refused_at_head_total` (BentoML's request
metrics never see them) and logged once a second as a sum, not one access line each.

A deadline on the head. uvicorn stops its keep-alive timer at a head's first byte and sets no
other, so a head that never ends held its connection for good (a slowloris: 1,000 connections
that each sent "POST /analyze HTTP/1.1" and a header were all still open 130 s later, in a
review). A head that does not arrive whole in the read it began in must be in within
BODY_TIMEOUT_S, the upload body's deadline: else 408 REQUEST_TIMEOUT and the connection closes.

A lingering close. An answer given before its request's body is all in (413 over the cap, 408,
401 or 429 to an upload) ends the connection; closed at once, the kernel answers the bytes still
coming with a reset, which can destroy the answer before the client reads it (a review saw
`bentoml.AsyncHTTPClient` get an empty ReadError for an 11 MB upload, 11 times in 11, and curl
lose the 413 in 3 of 21). So such a connection is half-closed after its answer (the answer, then
our FIN), what still comes is dropped unparsed, and it closes when the client closes or after
LINGER_S, as nginx's `lingering_close` does (RFC 9112 9.6).

A body after an Upgrade header. The parser reads a request with `Connection: Upgrade` as the end
of HTTP/1.1 on its connection, and skipped its body: `curl --http2 -F image=@x http://...` (an
h2c upgrade) reached /analyze with an empty body and got 400 "malformed". The service upgrades to
nothing, so a declared Content-Length is read here as the body it is, and the request answered as
the plain HTTP request it also is; the connection then closes (nothing after it is parsed).

One write per answer. uvicorn writes an answer's head and its body apart; here the head waits for
the body (`_HeadHeldUntilBody`), so a small answer is one segment and one wake-up of its client.
"""

from __future__ import annotations

import functools
import logging
import sys
import urllib.parse
import weakref
from collections import Counter
from http import HTTPStatus

import httptools
from uvicorn.protocols.http import auto
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.errors import ClassifierError, ErrorCode
from ..serving import metrics
from ..serving.settings import Settings
from . import logs
from .admission import Gate
from .balance import ConnectionBalance
from .body import PROTOCOL_REFUSALS
from .envelope import (
    HTTP_STATUS,
    RETRY_AFTER_S,
    error_body,
    error_headers,
    is_open_inference_path,
)
from .headers import REQUEST_ID_HEADER, new_request_id, request_id_for
from .uploads import UploadRoute, route_for

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # what nginx allows by default (4 buffers of 8 KiB) is less
MAX_HEADERS = 100  # Apache's LimitRequestFields
_REQUEST_ID_KEY = REQUEST_ID_HEADER.encode("latin-1")
_SUMMARY_EVERY_S = 1.0
# After an early refusal its connection is not read for this long: half the Retry-After the
# client was told, so one that honours it never notices, and one that retries the moment it is
# refused is paced to 2 refusals a second per connection (tests/http/test_load_behaviour.py
# measures what 512 of them leave of the capacity).
REFUSED_CONNECTION_PAUSE_S = RETRY_AFTER_S / 2
# How long a connection answered before its body was all in keeps reading and dropping it: time
# for the answer to reach the client and the client to stop sending (nginx waits up to 30 s).
LINGER_S = 2.0


class EarlyRefusal:
    """Which requests are refused at their head: POSTs to a work route while the gate is full."""

    def __init__(self, gate: Gate, work_routes: dict[str, UploadRoute], body_timeout_s: float):
        self.gate = gate
        self.work_routes = work_routes
        self.body_timeout_s = body_timeout_s
        self._refused: Counter[str] = Counter()  # since the last summary line
        self._counters = {}  # the counter of each code refused, looked up once

    def refusal_for(self, method: bytes, url: bytes) -> tuple[ClassifierError, str] | None:
        """The refusal and the request's path, or None to let the request in."""
        refusal = self.gate.capacity_refusal()  # first: the common case costs one comparison
        if refusal is None or method != b"POST":
            return None
        path = _path_of(url)
        return (refusal, path) if route_for(self.work_routes, path) is not None else None

    def count(self, refusal: ClassifierError, loop) -> None:  # noqa: ANN001 - an event loop
        if refusal.code not in self._counters:
            code = refusal.code.value
            self._counters[refusal.code] = (
                metrics.ERRORS.labels(code=code),
                metrics.REFUSED_AT_HEAD.labels(code=code),
            )
        for counter in self._counters[refusal.code]:
            counter.inc()
        if not self._refused:
            loop.call_later(_SUMMARY_EVERY_S, self._log_summary)
        self._refused[refusal.code.value] += 1

    def _log_summary(self) -> None:
        counts = ", ".join(f"{count} {code}" for code, count in sorted(self._refused.items()))
        log.warning("refused at their headers in the last %g s: %s", _SUMMARY_EVERY_S, counts)
        self._refused.clear()


class _HeadTooLarge(Exception):
    pass


class _Unreadable(Exception):
    """A head the parser read, that HTTP/1.1 still refuses (`_unreadable_because` says why)."""


class ServiceHttpProtocol(HttpToolsProtocol):
    early_refusal: EarlyRefusal | None = None  # set by `install`
    balance: ConnectionBalance | None = None  # set by `install`
    _in_head = False  # between a request's first byte and the end of its headers
    _head_refused = False
    _chunked = False  # the head says Transfer-Encoding
    _unreadable_because = ""  # set when a parsed head is refused as not valid HTTP/1.1
    _dropping_body = False  # a refused request's body is being read and dropped
    _held_answer: bytes | None = None  # a refusal sent once that body is in (then the end)
    _body_deadline = None  # the timer that gives up on a refused request's body
    _resume_reading = None  # the timer that ends a refused connection's pause
    _running = None  # the request whose handler runs (uvicorn keeps only the latest one)
    _balanced = False  # counted in the connection balance (from its first answer on)
    _began_in_this_read = False  # a request's head began in the read being parsed
    _head_deadline = None  # the timer that gives up on a head arriving in several reads
    _lingering = None  # the timer that closes a connection half-closed after its answer
    _refusal_after_answers: ClassifierError | None = None  # an unreadable head's, once earlier
    # pipelined requests are answered (`_refuse_unreadable`)
    _upgrade_body_left: int | None = None  # an Upgrade request's body bytes still to come (then
    # 0: its body is in, and nothing more on the connection is parsed)
    _read = b""  # the read being parsed (an Upgrade request's body may begin in it)

    def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio's transport
        """A connection that never sends a byte is idle, as one between requests is: it gets
        uvicorn's keep-alive timer, which stops at the first byte (the head's deadline takes it
        from there). uvicorn arms it only after an answer: a connection opened and left silent
        was held for good (still open after 150 s, in a review), one file descriptor each."""
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0
        self._began_in_this_read = True  # what of the read is this head's is not known
        self._header_bytes = 0  # as parsed: a head that came whole in one read is counted too
        self._hosts = 0
        self._chunked = False
        self._head_refused = False

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_HEAD_BYTES:  # a URL that comes in several reads counts whole
            self._head_refused = True
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > MAX_HEADERS or self._header_bytes + len(self.url) > MAX_HEAD_BYTES:
            self._head_refused = True
            raise _HeadTooLarge  # the parser stops; uvicorn calls send_400_response
        lowered = name.lower()
        if lowered == b"host":
            self._hosts += 1
        elif lowered == b"transfer-encoding":
            self._chunked = True
            if value.strip().lower() != b"chunked":
                # The parser frames "gzip, chunked" by its last coding and would pass the body
                # on still gzipped, as if it were the upload. A transfer coding is refused
                # (RFC 9112 6.1), a compressed upload is said with Content-Encoding.
                self._unreadable_because = (
                    "only Transfer-Encoding: chunked is read; say a compressed upload with "
                    "Content-Encoding: gzip"
                )
                raise _Unreadable
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_deadline()
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):  # httptools reads "HTTP/2.0" or "HTTP/0.9" heads too
            self._unreadable_because = f"HTTP/{version} is not served here: HTTP/1.1 or 1.0"
            raise _Unreadable
        if version == "1.1" and self._hosts != 1:
            self._unreadable_because = "an HTTP/1.1 request has one Host header (RFC 9112 3.2)"
            raise _Unreadable  # the parser stops; uvicorn calls send_400_response
        if version == "1.0" and self._chunked:  # HTTP/1.0 has no chunked framing to trust
            self._unreadable_because = (
                "Transfer-Encoding in an HTTP/1.0 request is not read (RFC 9112 6.1): send "
                "Content-Length"
            )
            raise _Unreadable
        if not self._refused_early():
            super().on_headers_complete()
            if self.parser.should_upgrade() or (
                self.balance is not None and self.balance.close_after_this_request()
            ):
                self.cycle.keep_alive = False  # uvicorn answers `Connection: close`, then closes

    def _should_upgrade_to_ws(self) -> bool:
        """No WebSocket: the service has no WebSocket route, and uvicorn's handshake ended in a
        bare 403 outside the envelope. An Upgrade header (websocket, h2c) is ignored, as RFC 9110
        allows: the request is answered as the plain HTTP request it also is, and its connection
        closed after (the parser reads nothing more on it)."""
        return False

    def _unsupported_upgrade_warning(self) -> None:
        """Not logged (uvicorn's two warnings named a missing library): the access line says how
        the request was answered. Called where the parser stopped at an Upgrade request's end:
        a body it declared begins there (`on_message_complete`)."""
        if self._upgrade_body_left:
            stopped_at = sys.exc_info()[1].args[0]  # uvicorn calls this handling the stop
            self._read_upgrade_body(self._read[stopped_at:])

    def _read_upgrade_body(self, data: bytes) -> None:
        left = self._upgrade_body_left
        if not left:
            return  # after the body: not parsed (the connection ends with the answer)
        self._upgrade_body_left = max(0, left - len(data))
        if data:
            self.on_body(data[:left])
        if not self._upgrade_body_left:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if not self._dropping_body:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._upgrade_body_left is None and self.parser.should_upgrade() and self._has_body():
            return  # its body follows, read by `_read_upgrade_body`, which completes it
        if not self._dropping_body:
            super().on_message_complete()
            return
        self._dropping_body = False
        self._cancel_body_deadline()
        if self._held_answer is not None:
            self._write_held_answer()
            return
        # This connection's next request waits a little; then reading resumes and the
        # keep-alive timer starts, as uvicorn does when an answer is complete (one timer).
        self.flow.pause_reading()
        self._resume_reading = self.loop.call_later(
            REFUSED_CONNECTION_PAUSE_S, self.on_response_complete
        )

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None or self._refusal_after_answers is not None:
            return  # what follows an answered body or an unreadable head: dropped unparsed
        if self._upgrade_body_left is not None:
            self._read_upgrade_body(data)
            return
        self._began_in_this_read = False
        self._read = data
        super().data_received(data)
        self._read = b""
        if self._dropping_body and self._body_deadline is None:
            # A refused request whose body is still coming (most come whole in one read).
            self._body_deadline = self.loop.call_later(
                self.early_refusal.body_timeout_s, self._give_up_on_body
            )
        if self._in_head and self._head_deadline is None and not self.transport.is_closing():
            # Most heads come whole in the read they begin in, and cost no timer.
            self._head_deadline = self.loop.call_later(self._head_timeout_s(), self._head_too_slow)
        if self._in_head and not self.transport.is_closing() and not self._began_in_this_read:
            # This read ended inside a head begun in an earlier one: all of it is that head's.
            # (The read a head begins in may hold pipelined requests before it, so it is not
            # counted: a head gets at most one read beyond its cap, whose complete lines the
            # parser's own count in `on_header` covers.)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def _has_body(self) -> bool:
        """An Upgrade request's declared body (the parser skipped it): its length is what is
        read. A chunked one is refused (rare: an Upgrade is a client's opening request)."""
        if self._chunked:
            self._upgrade_body_left = 0
            self._refuse_unreadable(
                ClassifierError(
                    ErrorCode.INVALID_REQUEST,
                    "a chunked body after an Upgrade header is not read here: send it with "
                    "Content-Length, or without Upgrade",
                )
            )
            return True
        length = next((v for k, v in self.headers if k == b"content-length"), b"0")
        self._upgrade_body_left = int(length)  # (the parser refused a length not a number)
        if not self._upgrade_body_left:
            self._upgrade_body_left = None
        return self._upgrade_body_left is not None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal_after_answers is not None and not self._answer_pending():
            # After this step of the last answer's task: its bytes leave when uvicorn's send
            # returns to it (`_HeadHeldUntilBody`), which is after this call.
            self.loop.call_soon(self._refuse_after_answers)
            return
        if self.balance is not None and not self._balanced:
            # Counted once answered: a connection only opened, or held in its head or body
            # (500 slow uploads), would make its worker look full and send every keep-alive
            # client to the other one.
            self._balanced = True
            self.balance.opened()

    def close_after_answer(self, cycle) -> None:  # noqa: ANN001 - uvicorn's request cycle
        """Close after an answer that ends its connection: lingering (above) when the request's
        body is still coming, at once otherwise."""
        transport = self.transport
        if not cycle.more_body or transport.is_closing() or self._lingering is not None:
            transport.close()
            return
        self._lingering = self.loop.call_later(LINGER_S, transport.close)
        self.flow.resume_reading()
        transport.write_eof()  # once the answer is out; the reading side stays open

    def eof_received(self) -> bool:
        """A client that closes its sending side once its request is sent (`shutdown(SHUT_WR)`:
        `nc -N`, some HTTP/1.0 clients and scripts) still gets its answer. uvicorn answers None
        here, and the transport then closed at once, dropping the request in work unanswered.
        The connection now stays open for that answer and closes after it (the client can send
        nothing more); one idle, or whose request is still sending its body, closes as before."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body:
            return False  # (a lingering connection's answer is complete: it closes)
        cycle.keep_alive = False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        self._cancel_body_deadline()
        self._cancel_head_deadline()
        if self._resume_reading is not None:
            self._resume_reading.cancel()
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            # A client that pipelines and then hangs up: uvicorn tells only the latest request
            # that it is gone, and the one still running would write to a closed transport.
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)
        if self.balance is not None and self._balanced:
            self.balance.closed()

    def send_400_response(self, msg: str) -> None:
        """What the parser cannot read (a bad Content-Length, both Content-Length and chunked,
        a bare LF, an HTTP/2 preface) gets the envelope and a request id too, not plain text."""
        if self._head_refused:
            self._refuse_head()
            return
        reason = self._unreadable_because or "the request is not valid HTTP/1.1 (RFC 9112)"
        self._unreadable_because = ""
        self._refuse_unreadable(ClassifierError(ErrorCode.INVALID_REQUEST, reason))

    def _start_asgi_task(self, cycle, app) -> None:  # noqa: ANN001 - uvicorn's own types
        """Every request let in is counted by the gate until its handler's first step
        (`Gate.capacity_refusal` says why), and answers through `_send_unless_gone`."""
        self._running = cycle
        # What `_refuse_unreadable` answers meanwhile (the task may not have started yet), for
        # the handler's access line.
        cycle.protocol_refusals = []
        gate = self.early_refusal.gate if self.early_refusal is not None else None
        if gate is not None:
            gate.starting += 1
        cycle.transport = _ClosesAfterAnswer(self, cycle)
        super()._start_asgi_task(cycle, functools.partial(_run, gate, cycle, app))

    def _refused_early(self) -> bool:
        """Refuse the request now, if the gate says so and no earlier answer is still pending
        on this connection (pipelined answers keep their order).

        On a keep-alive connection the answer goes at once, and the body that follows is read
        and dropped: a body that comes in several reads would otherwise keep its client waiting
        one turn of the busy event loop per read. A connection that ends with this request is
        answered once the body is in (closing under a body still coming would reset it, and the
        client could lose the answer); one that waits for `100-continue` is answered and closed."""
        if self.early_refusal is None or not (self.cycle is None or self.cycle.response_complete):
            return False
        refused = self.early_refusal.refusal_for(self.parser.get_method(), self.url)
        if refused is None:
            return False
        refusal, path = refused
        self.early_refusal.count(refusal, self.loop)
        given_id = next((v for k, v in self.headers if k == _REQUEST_ID_KEY), b"")
        request_id = request_id_for(given_id.decode("latin-1"))
        keep_alive = self.parser.should_keep_alive() and not self.expect_100_continue
        keep_alive = keep_alive and not self.parser.should_upgrade()  # (nothing after is read)
        answer = _answer(
            refusal,
            request_id,
            is_open_inference_path(path),
            not keep_alive,
            self.server_state.default_headers,
        )
        if self.expect_100_continue:  # the client waits for our word before sending its body
            self.transport.write(answer)
            self.transport.close()
            return True
        self._dropping_body = True
        if keep_alive:
            self.transport.write(answer)
        else:
            self._held_answer = answer
        return True

    def _give_up_on_body(self) -> None:
        """The refused request's body did not come in time: end the connection."""
        self._body_deadline = None
        if self._held_answer is not None:
            self._write_held_answer()
        elif not self.transport.is_closing():
            self.transport.close()

    def _write_held_answer(self) -> None:
        answer, self._held_answer = self._held_answer, None
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _cancel_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _head_timeout_s(self) -> float:
        return (self.early_refusal or Settings).body_timeout_s

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self._in_head and not self.transport.is_closing():
            self._refuse_unreadable(
                ClassifierError(
                    ErrorCode.REQUEST_TIMEOUT,
                    f"the request's headers did not arrive within {self._head_timeout_s():g} s",
                )
            )

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _refuse_head(self) -> None:
        self._refuse_unreadable(
            ClassifierError(
                ErrorCode.HEADERS_TOO_LARGE,
                f"the request's headers are over the limit of {MAX_HEAD_BYTES:,} bytes "
                f"or {MAX_HEADERS} fields",
            )
        )

    def _refuse_unreadable(self, refusal: ClassifierError) -> None:
        """A head refused before any ASGI work: the envelope with a request id, then the
        connection closes; counted, and an access line with that id, as for any other answer.

        A body that breaks off mid-way (bad chunk framing) ends a request whose handler already
        runs: the handler, told the client is gone, counts and logs it, so it is not logged
        twice; its request id is the one of both (the client's, or the handler's: the boundary
        sets it in the head's header list, which the protocol holds too)."""
        if self._answer_pending() and not self.cycle.more_body:
            # Pipelined requests before this head, complete and let in, are still in work: they
            # are answered first, in order, and this refusal after them (closing at once lost
            # their answers). Nothing more is read meanwhile: the parser has stopped.
            self._refusal_after_answers = refusal
            self._in_head = False
            self._cancel_head_deadline()
            return
        in_handler = self._answer_pending()  # a body broken off mid-way: its handler's
        given_id = next((v for k, v in self.headers if k == _REQUEST_ID_KEY), b"")
        request_id = request_id_for(given_id.decode("latin-1")) if in_handler else new_request_id()
        if in_handler and not given_id:  # the handler, not yet begun, adopts it from the head
            self.headers.append((_REQUEST_ID_KEY, request_id.encode("latin-1")))
        try:  # the head's path, when its request line was read: /v2 answers in its own shape
            url = getattr(self, "url", b"")  # none before the first request line
            open_inference = bool(url) and is_open_inference_path(_path_of(url))
        except httptools.HttpParserInvalidURLError:
            open_inference = False
        self.transport.write(
            _answer(refusal, request_id, open_inference, True, self.server_state.default_headers)
        )
        self.transport.close()
        if in_handler:
            getattr(self.cycle, "protocol_refusals", []).append(refusal)
            return
        metrics.ERRORS.labels(code=refusal.code.value).inc()
        with logs.request_context(request_id, "-", logs.UNMATCHED_ENDPOINT) as fields:
            fields["error_code"] = refusal.code.value
            logs.log_request(fields, HTTP_STATUS[refusal.code], 0.0)

    def _refuse_after_answers(self) -> None:
        refusal, self._refusal_after_answers = self._refusal_after_answers, None
        if refusal is not None and not self.transport.is_closing():  # (else: an answer closed)
            self._refuse_unreadable(refusal)

    def _answer_pending(self) -> bool:
        """A request let in on this connection is not yet answered (running, or pipelined)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)


async def _run(gate: Gate | None, cycle, app, scope, receive, send) -> None:  # noqa: ANN001
    if gate is not None:
        gate.starting -= 1
    PROTOCOL_REFUSALS.set(cycle.protocol_refusals)

    async def send_unless_gone(message) -> None:  # noqa: ANN001 - an ASGI message
        """A client that resets while its answer is on the way: the event loop closes the
        transport at once but tells the protocol (`connection_lost`) a step later, and a write
        in between raised RuntimeError in uvicorn (a traceback under overload, seen in
        tests/http/test_load_behaviour.py). A closing transport is a client gone.

        The answer's head waits for its first body part, so that both leave in one write: one
        segment and one wake-up of the client, not two (each write cost about 0.25 ms of the
        answer at one client on loopback, measured inside the service)."""
        if cycle.transport.is_closing() and not cycle.response_complete:
            cycle.disconnected = True  # uvicorn's send then drops the message
        if message["type"] == "http.response.start":
            if cycle.waiting_for_100_continue:
                # Answered before its body was asked for (a 404, a 405): a client that then
                # sends the body, or does not, can no longer be told apart from its next
                # request, which was read as this one's body. The connection ends instead.
                cycle.keep_alive = False
            cycle.transport = _HeadHeldUntilBody(cycle.transport)
            await send(message)
            return
        try:
            await send(message)
        finally:
            if isinstance(cycle.transport, _HeadHeldUntilBody):
                cycle.transport = cycle.transport.release()

    await app(scope, receive, send_unless_gone)


class _ClosesAfterAnswer:
    """A request's transport, whose close (uvicorn's, once an answer that ends the connection is
    out) is the protocol's `close_after_answer`.

    It knows its request through a weak reference: a strong one would make a reference cycle of
    every request (the request holds its transport), freed only by the garbage collector, whose
    collections of that garbage under overload held each worker's event loop for 6-13 ms about
    once a second, and for 15-40 ms every ten (measured with a `gc.callbacks` probe)."""

    def __init__(self, protocol: ServiceHttpProtocol, cycle) -> None:  # noqa: ANN001
        self.protocol = protocol
        self.cycle = weakref.ref(cycle)
        self.transport = protocol.transport

    def close(self) -> None:
        self.protocol.close_after_answer(self.cycle())  # (called by its request: alive)

    def __getattr__(self, name: str):  # noqa: ANN204 - write, is_closing and the rest
        return getattr(self.transport, name)


class _HeadHeldUntilBody:
    """A response's transport while its head is held: writes wait, and leave as one."""

    def __init__(self, transport) -> None:  # noqa: ANN001 - asyncio's transport
        self.transport = transport
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.held.append(data)

    def release(self):  # noqa: ANN201 - the transport, for the rest of the answer
        if self.held and not self.transport.is_closing():
            self.transport.write(b"".join(self.held))
        self.held = []
        return self.transport

    def close(self) -> None:  # the answer ends the connection: what is held goes first
        self.release().close()

    def __getattr__(self, name: str):  # noqa: ANN204 - is_closing and the rest, as they are
        return getattr(self.transport, name)


def _path_of(url: bytes) -> str:
    """A request target's path, percent-decoded as the router sees it."""
    path = httptools.parse_url(url).path.decode("latin-1")
    return urllib.parse.unquote(path) if "%" in path else path


def _answer(
    refusal: ClassifierError,
    request_id: str,
    open_inference: bool,
    close: bool,
    default_headers: list[tuple[bytes, bytes]],
) -> bytes:
    """A whole HTTP/1.1 error answer in the envelope, as bytes for one write. Built once per kind
    of refusal; only the request id (and so the length) and uvicorn's `default_headers` (Date,
    which it renews every second, and any configured) differ from one answer to the next."""
    template, id_count, body_length = _answer_template(
        refusal.code, refusal.message, refusal.retry_after_s, open_inference, close
    )
    request_id_bytes = request_id.encode("latin-1")
    length = str(body_length + id_count * len(request_id_bytes)).encode()
    defaults = b"".join(b"%s: %s\r\n" % header for header in default_headers)
    return (
        template.replace(_DEFAULTS_SLOT, defaults, 1)
        .replace(_LENGTH_SLOT, length)
        .replace(_ID_SLOT, request_id_bytes)
    )


# Slots no JSON escaping changes; the default headers' slot takes a whole header line.
_ID_SLOT, _LENGTH_SLOT, _DEFAULTS_SLOT = b"@request-id@", b"@length@", b"@defaults@\r\n"


@functools.lru_cache(maxsize=64)
def _answer_template(
    code: ErrorCode, message: str, retry_after_s: int | None, open_inference: bool, close: bool
) -> tuple[bytes, int, int]:
    """The answer with slots for the request id and the body's length; how many times the id
    is in the body, and the body's length without it."""
    refusal = ClassifierError(code, message, retry_after_s=retry_after_s)
    body = error_body(refusal, _ID_SLOT.decode("latin-1"), open_inference)
    id_count = body.count(_ID_SLOT)
    status = HTTP_STATUS[code]
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("latin-1"), _DEFAULTS_SLOT]
    for name, value in error_headers(refusal, _ID_SLOT.decode("latin-1"), body, close):
        value = _LENGTH_SLOT if name == b"content-length" else value
        head.append(b"%s: %s\r\n" % (name, value))
    return b"".join([*head, b"\r\n", body]), id_count, len(body) - id_count * len(_ID_SLOT)


def install(early_refusal: EarlyRefusal | None = None, workers: int = 1, slot: int = 0) -> None:
    """Make uvicorn's "auto" HTTP protocol (what BentoML's workers use) this one, balancing
    connections when there are several `workers` (`slot`: this worker's number). Call before the
    server loads its config: importing service.py does."""
    ServiceHttpProtocol.early_refusal = early_refusal
    ServiceHttpProtocol.balance = ConnectionBalance(workers, slot) if workers > 1 else None
    auto.AutoHTTPProtocol = ServiceHttpProtocol
