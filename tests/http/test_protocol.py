"""The HTTP protocol alone, fed bytes as a socket would: early refusals while the gate is full.

(The head caps are tested against a real server in test_slow_clients.py, and early refusals
under real overload in test_load_behaviour.py.)
"""

from __future__ import annotations

import asyncio
import json

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from image_classifier.http import protocol
from image_classifier.http.admission import AdmissionPolicy, Gate
from image_classifier.http.balance import ConnectionBalance
from image_classifier.http.envelope import is_error_envelope
from image_classifier.http.uploads import UploadRoute

BODY = b"x" * 300
DATE = b"Sat, 05 Dec 2026 09:00:00 GMT"
ROUTE = UploadRoute(rule=None, max_bytes=1000)


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        if self.closed:  # as uvloop's transport does
            raise RuntimeError("unable to perform operation: the handler is closed")
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default=None):  # noqa: ANN001, ANN201
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 50000)}.get(name)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def request(path: str = "/analyze", body: bytes = BODY, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: test", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def answer_of(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest.fixture
def full_gate():
    gate = Gate(AdmissionPolicy(max_concurrency=1))
    gate.in_flight = 1  # every work slot taken
    previous = protocol.ServiceHttpProtocol.early_refusal
    protocol.install(protocol.EarlyRefusal(gate, {"/analyze": ROUTE}, 0.2))
    yield gate
    protocol.install(previous)


async def connected(asgi_app=None) -> tuple[protocol.ServiceHttpProtocol, FakeTransport]:  # noqa: ANN001
    config = Config(app=asgi_app or app, http="httptools", lifespan="off")
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", DATE)]  # what uvicorn's server renews every second
    server = protocol.ServiceHttpProtocol(config=config, server_state=state, app_state={})
    transport = FakeTransport()
    server.connection_made(transport)
    return server, transport


CALLED: list[str] = []


async def app(scope, receive, send) -> None:  # noqa: ANN001
    """What the framework would do: here, note the path and answer 200."""
    if scope["type"] != "http":
        return
    CALLED.append(scope["path"])
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def test_a_connection_counts_in_the_worker_balance_once_answered(tmp_path, monkeypatch):
    """Opened, or held in the middle of its first request's body (a slow upload), it does not
    count: 500 of those would make their worker look full and send honest clients away."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(protocol.ServiceHttpProtocol, "balance", ConnectionBalance(2, slot=1))
    count = protocol.ServiceHttpProtocol.balance.count

    async def after_the_body(scope, receive, send) -> None:  # noqa: ANN001
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def scenario():
        server, _ = await connected(after_the_body)
        slow, _ = await connected(after_the_body)
        whole = request("/readyz", BODY)
        slow.data_received(whole[:-100])  # its body is still coming
        assert count.mine == 0
        server.data_received(request("/readyz", BODY))
        await asyncio.sleep(0.05)  # the app answers
        assert count.mine == 1
        server.connection_lost(None)
        slow.connection_lost(None)
        assert count.mine == 0

    asyncio.run(scenario())


def test_a_refused_request_is_answered_at_its_head_and_its_connection_kept(full_gate):
    async def scenario():
        server, transport = await connected()
        whole = request("/analyze", BODY, "x-request-id: my-id-1")
        server.data_received(whole[:-100])  # the head, and part of the body
        (raw,) = transport.written
        status, headers, body = answer_of(raw)
        assert status == 503 and headers["x-error-code"] == "OVERLOADED"
        assert headers["retry-after"] == "1" and headers["x-request-id"] == "my-id-1"
        assert headers["date"] == DATE.decode()  # RFC 9110 6.6.1: an origin server sends one
        assert is_error_envelope(body) and body["request_id"] == "my-id-1"
        assert "connection" not in headers and not transport.closed
        assert transport.reading  # the rest of the body is read, and dropped
        server.data_received(whole[-100:])
        assert len(transport.written) == 1 and not transport.closed
        assert not transport.reading  # the body is in: paused a little, then read again
        await asyncio.sleep(protocol.REFUSED_CONNECTION_PAUSE_S + 0.05)
        assert transport.reading
        server.data_received(request())  # the next request on the same connection
        assert len(transport.written) == 2
        assert answer_of(transport.written[1])[1]["x-request-id"] != "my-id-1"  # a fresh id

    asyncio.run(scenario())


def test_a_connection_that_ends_with_the_request_is_answered_after_the_body(full_gate):
    async def scenario():
        server, transport = await connected()
        whole = request("/analyze", BODY, "connection: close")
        server.data_received(whole[:-100])
        assert transport.written == []  # closing now would reset the body still coming
        server.data_received(whole[-100:])
        status, headers, _ = answer_of(transport.written[0])
        assert status == 503 and headers["connection"] == "close" and transport.closed

    asyncio.run(scenario())


def test_open_inference_refusals_are_in_the_protocol_s_error_shape(full_gate):
    async def scenario():
        refusal = protocol.EarlyRefusal(full_gate, {"/v2/models/*/infer": ROUTE}, 1)
        protocol.install(refusal)
        server, transport = await connected()
        server.data_received(request("/v2/models/digits/infer"))
        status, headers, body = answer_of(transport.written[0])
        assert status == 503 and body == {"error": f"OVERLOADED: {body['error'][12:]}"}
        assert headers["x-error-code"] == "OVERLOADED"

    asyncio.run(scenario())


def test_a_client_waiting_for_100_continue_is_refused_at_once_and_the_connection_closed(full_gate):
    async def scenario():
        server, transport = await connected()
        server.data_received(request("/analyze", BODY, "expect: 100-continue")[: -len(BODY)])
        status, headers, _ = answer_of(transport.written[0])
        assert status == 503 and headers["connection"] == "close" and transport.closed

    asyncio.run(scenario())


def test_a_refused_body_that_does_not_come_is_cut_at_the_body_deadline(full_gate):
    async def scenario():
        for ending in ([], ["connection: close"]):
            server, transport = await connected()
            server.data_received(request("/analyze", BODY, *ending)[:-10])
            await asyncio.sleep(0.3)  # the deadline is 0.2 s here
            status, _, _ = answer_of(transport.written[0])
            assert status == 503 and transport.closed

    asyncio.run(scenario())


def test_requests_pass_when_a_slot_is_free_or_the_route_does_no_work(full_gate):
    async def scenario():
        for path in ("/info", "/analyze"):
            server, transport = await connected()
            server.data_received(request(path))
            await asyncio.sleep(0.01)
            assert answer_of(b"".join(transport.written))[0] == 200
            full_gate.in_flight = 0  # then a slot is free for /analyze too

    asyncio.run(scenario())
    assert CALLED == ["/info", "/analyze"]


def test_an_answer_s_head_and_body_leave_in_one_write():
    """One segment and one wake-up of the client per answer, not one for the head and one for
    the body; an answer that ends the connection sends what it held first."""

    async def scenario():
        server, transport = await connected()
        server.data_received(request("/readyz", b"", "x-request-id: first"))
        await asyncio.sleep(0.01)
        (raw,) = transport.written
        assert answer_of(raw)[0] == 200
        server.data_received(request("/readyz", b"", "connection: close"))
        await asyncio.sleep(0.01)
        assert len(transport.written) == 2 and answer_of(transport.written[1])[0] == 200
        assert transport.closed

    asyncio.run(scenario())


def test_pipelined_requests_in_one_read_do_not_count_as_one_head():
    """A read of many small pipelined requests (here 150 KB) that ends inside the next head is
    not that head's: before, it counted whole and the pipeline was cut with 431."""
    one = b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n"
    count = 2 * protocol.MAX_HEAD_BYTES // len(one) + 100

    async def scenario():
        server, transport = await connected()
        server.data_received(one * count + one[:20])
        server.data_received(one[20:])
        for _ in range(500):
            await asyncio.sleep(0.01)
            if b"".join(transport.written).count(b"HTTP/1.1 ") > count:
                break
        return b"".join(transport.written)

    written = asyncio.run(scenario())
    assert written.count(b"HTTP/1.1 200 OK") == count + 1, written[:300]
    assert b"431" not in written


def test_heads_let_in_count_as_taken_slots_until_their_handlers_start(full_gate):
    """A busy event loop parses a burst's heads before it runs any of their handlers: those let
    in hold the slots meanwhile, so the rest of the burst is refused at the head."""

    async def scenario():
        full_gate.in_flight = 0  # one free slot
        burst = [await connected() for _ in range(3)]
        for server, _ in burst:
            server.data_received(request())  # no handler has started yet
        assert full_gate.starting == 1
        assert [len(transport.written) for _, transport in burst] == [0, 1, 1]
        await asyncio.sleep(0.01)
        assert full_gate.starting == 0
        statuses = [answer_of(b"".join(transport.written))[0] for _, transport in burst]
        assert statuses == [200, 503, 503]

    asyncio.run(scenario())


def test_an_answer_to_a_client_that_reset_is_dropped_not_raised(full_gate):
    """The event loop closes the transport of a client that resets at once, and tells the
    protocol a step later: an answer written in between must not raise (it did, under load)."""
    full_gate.in_flight = 0
    answered = []

    async def slow_app(scope, receive, send) -> None:  # noqa: ANN001
        await asyncio.sleep(0.02)  # the model runs; meanwhile the client resets
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        answered.append(scope["path"])

    async def scenario():
        server, transport = await connected(slow_app)
        server.data_received(request())
        await asyncio.sleep(0.005)
        transport.close()  # the reset; connection_lost has not run yet
        await asyncio.sleep(0.05)
        assert answered == ["/analyze"] and transport.written == []
        server.connection_lost(ConnectionResetError())

    asyncio.run(scenario())
