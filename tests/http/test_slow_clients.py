"""Slow uploads and oversized heads against a real server: cut or refused, and honest clients
keep their throughput.

The attacker opens its connections from other loopback addresses (127.0.0.0/8 is all local), as
many machines would; honest clients come from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil
import pytest
import uvloop

from image_classifier.http.protocol import MAX_HEADERS
from loadtest.load import closed_loops, percentile, raw_multipart, throughput
from loadtest.servers import serve
from tests.figures import measured
from tests.http.responses import access_lines, assert_no_traceback
from tests.pictures import encode

SLOW_CONNECTIONS = 500
ATTACKER_ADDRESSES = 50  # 10 slow connections each
# Long enough that the 500 stay open through the honest clients' window (the rate is judged
# from half the deadline on): the shape, "held open". Cut and reopened at once every few
# seconds instead, they cost honest clients 84-102 % of their throughput in five runs at
# BODY_TIMEOUT_S 10: a connection-rate attack on top, which admission does not bound.
BODY_TIMEOUT_S = 30
HONEST_SECONDS = 10


@pytest.fixture(scope="module")
def digit_png(heldout) -> bytes:
    return encode(heldout[0][0], "PNG")


@dataclass
class SlowAttack:
    """Connections that send an upload's headers, then one body byte a second; each one cut is
    opened again at once, so `connections` stay open all along."""

    host: str
    port: int
    connections: int
    lifetimes: list[float] = field(default_factory=list)  # seconds until the server closed it
    statuses: dict[int | None, int] = field(default_factory=dict)

    async def run(self, seconds: float) -> None:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(self._one(i, stop_at) for i in range(self.connections)))

    async def _one(self, index: int, stop_at: float) -> None:
        source = f"127.0.0.{2 + index % ATTACKER_ADDRESSES}"
        head = (
            f"POST /analyze HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        ).encode()
        while time.monotonic() < stop_at:
            opened = time.monotonic()
            reader, writer = await asyncio.open_connection(
                self.host, self.port, local_addr=(source, 0)
            )
            answer = b""
            try:
                writer.write(head)
                while True:
                    writer.write(b"-")
                    await writer.drain()
                    try:
                        async with asyncio.timeout(1.0):  # no task per wait: a cheap attacker
                            chunk = await reader.read(65536)
                    except TimeoutError:
                        if time.monotonic() - opened > 4 * BODY_TIMEOUT_S:
                            break  # never cut: recorded as such
                        continue
                    if not chunk:
                        break  # the server closed the connection
                    answer += chunk
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
            self.lifetimes.append(time.monotonic() - opened)
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
            self.statuses[status] = self.statuses.get(status, 0) + 1


def _attack(host: str, port: int, seconds: float) -> tuple[SlowAttack, float]:
    """The attack, and the CPU its process used (cores): it shares the machine's 2 cores."""
    attack = SlowAttack(host, port, SLOW_CONNECTIONS)
    started, cpu = time.monotonic(), time.process_time()
    uvloop.run(attack.run(seconds))
    return attack, (time.process_time() - cpu) / (time.monotonic() - started)


def test_slow_uploads_are_cut_and_do_not_starve_honest_clients(trained_store, artifacts, digit_png):
    env = {"BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    with serve(trained_store, artifacts / "server-slow-bodies.log", env=env) as server:
        url = f"{server.url}/analyze"
        address = urlsplit(server.url)
        before = asyncio.run(closed_loops(url, digit_png, concurrency=4, seconds=HONEST_SECONDS))
        # The attacker runs in a process of its own (on other machines in real life): sharing
        # the honest clients' event loop would slow them down by itself.
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            attacking = pool.apply_async(
                _attack, (address.hostname, address.port, HONEST_SECONDS + 5)
            )
            time.sleep(3)  # every slow connection is open
            answered_before = len(access_lines(server.log()))
            during = asyncio.run(
                closed_loops(url, digit_png, concurrency=4, seconds=HONEST_SECONDS)
            )
            honest_lines = access_lines(server.log())[answered_before:]
            attack, attacker_cores = attacking.get(timeout=4 * BODY_TIMEOUT_S + 30)
        after = asyncio.run(closed_loops(url, digit_png, concurrency=4, seconds=HONEST_SECONDS))
        log = server.log()

    # Usual throughput: the mean of the windows before and after, so that the machine's own
    # drift in speed (shared, noisy) does not count for or against the attack.
    usual = (throughput(before) + throughput(after)) / 2
    # The honest clients' keep-alive connections stay spread over both workers: the slow ones
    # (hashed unevenly) do not count in the balance, so neither worker looks full to it.
    by_worker = Counter(line["component"] for line in honest_lines if line["status"] == 200)
    ok = [o.seconds for o in during if o.status == 200]
    ratio = throughput(during) / usual
    measured(
        f"slow bodies: {SLOW_CONNECTIONS} connections from {ATTACKER_ADDRESSES} addresses at "
        f"1 byte/s, reopened when cut: {len(attack.lifetimes)} cut, statuses {attack.statuses}, "
        f"longest held {max(attack.lifetimes):.1f} s (BODY_TIMEOUT_S {BODY_TIMEOUT_S}); honest "
        f"clients {throughput(during):.1f} req/s vs {usual:.1f} without the attack "
        f"({ratio:.0%}), p99 {percentile(ok, 0.99) * 1000:.0f} ms, answered by the 2 workers "
        f"{sorted(by_worker.values(), reverse=True)}; the attacker's process used "
        f"{attacker_cores:.2f} of the 2 cores"
    )
    assert all(o.status == 200 for o in during), [o for o in during if o.status != 200][:5]
    # Starved would be under half (before the fix: every honest request refused, 0 %). Issue 13's
    # 90 % is a speed target: reported above and in docs/security.md, not asserted here, because
    # this shared machine's speed moves by more than its margin between windows (measured
    # 84-102 %); a timed assertion on it would fail at random.
    assert ratio >= 0.5
    assert len(by_worker) == 2 and min(by_worker.values()) >= 0.3 * sum(by_worker.values())
    assert percentile(ok, 0.99) < 1.0
    assert len(attack.lifetimes) >= SLOW_CONNECTIONS  # every connection was cut
    assert max(attack.lifetimes) <= BODY_TIMEOUT_S + 1
    assert set(attack.statuses) <= {408, 429, 503}, attack.statuses
    assert_no_traceback(log)


def _send_head(host: str, port: int, parts: list[bytes]) -> tuple[int, dict, bool]:
    """Send a request head in pieces (the server may cut in early); (status, body, closed)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # refused mid-way: the rest is not wanted
            for part in parts:
                sock.sendall(part)
        answer, closed = b"", True
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            closed = False  # the server kept the connection open
        except OSError:
            pass  # reset: closed too
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, json.loads(body) if status != 200 else {}, closed


def test_oversized_request_heads_get_431_and_the_connection_closed(trained_store, artifacts):
    long_line = [b"POST /analyze HTTP/1.1\r\nHost: x\r\nX-Long: ", *[b"a" * 65536] * 160]
    long_line += [b"\r\n\r\n"]
    many = [b"POST /analyze HTTP/1.1\r\nHost: x\r\n"]
    many += [b"".join(b"X-H%d: v\r\n" % (i * 1000 + j) for j in range(1000)) for i in range(100)]
    many += [b"\r\n"]
    near_caps = [b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"]
    near_caps += [b"X-Near-%d: %s\r\n" % (i, b"v" * 500) for i in range(90)] + [b"\r\n"]
    with serve(trained_store, artifacts / "server-heads.log") as server:
        address = urlsplit(server.url)
        worker = max(psutil.Process(server.process.pid).children(recursive=True),
                     key=lambda p: p.memory_info().rss)  # fmt: skip
        before = worker.memory_info().rss
        for _ in range(5):
            for parts in (long_line, many):
                status, body, closed = _send_head(address.hostname, address.port, parts)
                assert status == 431 and body["error"]["code"] == "HEADERS_TOO_LARGE", body
                assert closed
        status, _, _ = _send_head(address.hostname, address.port, near_caps)
        assert status == 200  # 90 fields, 46 KB: under both caps
        grown = (worker.memory_info().rss - before) / 2**20
        log = server.log()
    measured(f"request heads: 10 MB line and 100,000 fields refused with 431 5 times each; "
             f"worker RSS grew {grown:.1f} MiB")  # fmt: skip
    assert grown < 32  # the 10 MB heads were never held whole (5 x 10 MB sent)
    assert_no_traceback(log)


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400,
         "INVALID_REQUEST"),
        (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "INVALID_REQUEST"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "INVALID_REQUEST"),  # HTTP/2 prior knowledge
        (b"G@T /livez HTTP/1.1\r\nHost: x\r\n\r\n", 400, "INVALID_REQUEST"),
        (b"GET /livez?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431,
         "HEADERS_TOO_LARGE"),  # the URL alone is over the head's cap
        (b"GET /info?" + b"a" * 60_000 + b" HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(10)) + b"\r\n", 431,
         "HEADERS_TOO_LARGE"),  # URL and headers together over it, sent in one write
        (b"GET /livez HTTP/1.1\r\n\r\n", 400, "INVALID_REQUEST"),  # RFC 9112 3.2: a MUST
        (b"GET /livez HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "INVALID_REQUEST"),
        # Found by a black-box review: read as HTTP/1.x and answered, with no Host either.
        (b"GET /info HTTP/2.0\r\n\r\n", 400, "INVALID_REQUEST"),
        (b"GET /info HTTP/0.9\r\n\r\n", 400, "INVALID_REQUEST"),
        # A transfer coding before chunked: framed as chunked, the body would pass on gzipped.
        (b"POST /analyze HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
         b"0\r\n\r\n", 400, "INVALID_REQUEST"),
        (b"POST /analyze HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "INVALID_REQUEST"),
    ],
    ids=["bad-content-length", "length-and-chunked", "http2-preface", "bad-method", "long-url",
         "long-url-and-headers", "no-host", "two-hosts", "http-2.0-line", "http-0.9-line",
         "gzip-chunked", "gzip-then-chunked"],
)  # fmt: skip
def test_unreadable_request_heads_get_the_envelope_and_the_connection_closed(
    server, head, status, code
):
    address = urlsplit(server.url)
    answered, body, closed = _send_head(address.hostname, address.port, [head])
    assert (answered, body["error"]["code"]) == (status, code), body
    assert body["request_id"] and closed
    time.sleep(0.2)  # the access line, written as the answer goes
    (line,) = [
        line for line in access_lines(server.log()) if line["request_id"] == body["request_id"]
    ]
    assert (line["status"], line["error_code"]) == (status, code), line


MALFORMED_HEADS = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde",
    b"POST /analyze HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /analyze HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /analyze HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]


UPGRADES = [  # (head, status): answered as the plain requests they also are
    (b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 200),
    (b"GET /analyze HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 405),
    (b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", 200),
]  # fmt: skip


def test_heads_not_served_as_sent_get_the_envelope_one_log_line_and_the_end(
    trained_store, artifacts
):
    """Unparsable heads get a 400 envelope; Upgrade requests (WebSocket got uvicorn's bare 403
    outside the envelope, h2c kept its connection open with nothing more read on it) are
    answered as plain HTTP, then closed. A flood of either writes one access line a request:
    not uvicorn's warnings beside it, nor each warning twice (as BentoML's logging config did)."""
    with serve(trained_store, artifacts / "server-malformed.log", env={"WORKERS": "1"}) as server:
        address = urlsplit(server.url)
        lines_before = len(server.log().splitlines())
        answered_ids = []
        for head in MALFORMED_HEADS:
            status, body, _ = _send_head(address.hostname, address.port, [head])
            assert status == 400 and body["error"]["code"] == "INVALID_REQUEST", (head, body)
            answered_ids.append(body["request_id"])
        for head, expected in UPGRADES:
            status, body, closed = _send_head(address.hostname, address.port, [head])
            assert status == expected and closed, (head, status, body)
            assert expected == 200 or body["error"]["code"] == "METHOD_NOT_ALLOWED", body
        time.sleep(0.5)  # the last access line is written
        new_lines = server.log().splitlines()[lines_before:]
    access = access_lines("\n".join(new_lines))
    logged = [expected for head, expected in UPGRADES if b"/readyz" not in head]  # probes: not
    assert [line["status"] for line in access] == [400] * len(MALFORMED_HEADS) + logged
    # The id a user quotes is the log's (a body broken mid-way once answered another one).
    assert [line["request_id"] for line in access[: len(MALFORMED_HEADS)]] == answered_ids
    # Nothing else about them (other lines may come meanwhile, e.g. the end of the start).
    assert not [line for line in new_lines if '"logger": "uvicorn' in line], new_lines


HEAD_DEADLINE_S = 2.0  # BODY_TIMEOUT_S, which bounds a head too


async def _unfinished_head(host: str, port: int, source: str, parts: list[bytes]) -> tuple:
    """Send `parts` (a head that never ends; the last part is sent again and again, a second
    apart), then wait: (the last answer's status and error code, seconds until the server
    closed the connection)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    started = time.monotonic()
    answer = b""

    async def trickle() -> None:
        for part in parts[:-1]:
            writer.write(part)
        while True:
            writer.write(parts[-1])
            await asyncio.sleep(1)

    sending = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(HEAD_DEADLINE_S + 10):
            while chunk := await reader.read(65536):
                answer += chunk
    except (TimeoutError, OSError):
        pass
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sending
        writer.close()
    last = answer[answer.rfind(b"HTTP/1.1 ") :]  # after any answer to a complete head before
    head, _, body = last.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    code = json.loads(body)["error"]["code"] if body.startswith(b"{") else None
    return status, code, time.monotonic() - started


def test_a_head_that_never_ends_is_cut_at_the_deadline(trained_store, artifacts):
    """uvicorn stops its keep-alive timer at a head's first byte: a head that never ended held
    its connection for good (a slowloris of 1,000 was all still open 130 s later, in a review).
    Each shape is sent by 20 connections from 10 addresses, at once."""
    shapes = {
        "request line only": [b"POST /analyze HTTP/1.1\r\n", b""],
        "one byte": [b"G", b""],
        "a header line a second": [b"POST /analyze HTTP/1.1\r\nHost: x\r\n", b"X-A: b\r\n"],
        "a second head, after an answer": [
            b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /livez HTTP/1.1\r\nHost: x\r\n",
            b"",
        ],
    }
    env = {"BODY_TIMEOUT_S": str(HEAD_DEADLINE_S)}
    with serve(trained_store, artifacts / "server-slow-heads.log", env) as server:
        address = urlsplit(server.url)

        async def all_shapes() -> dict[str, list[tuple]]:
            runs = {
                name: [
                    _unfinished_head(address.hostname, address.port, f"127.0.1.{i % 10 + 1}", parts)
                    for i in range(20)
                ]
                for name, parts in shapes.items()
            }
            results = await asyncio.gather(*(run for name in runs for run in runs[name]))
            return {name: results[i * 20 : (i + 1) * 20] for i, name in enumerate(runs)}

        outcomes = asyncio.run(all_shapes())
        log = server.log()
    longest = max(seconds for results in outcomes.values() for _, _, seconds in results)
    measured(
        f"heads that never end: {sum(map(len, outcomes.values()))} connections in "
        f"{len(shapes)} shapes, answered 408 and closed, the longest after {longest:.1f} s "
        f"(BODY_TIMEOUT_S {HEAD_DEADLINE_S:g})"
    )
    for name, results in outcomes.items():
        for status, code, seconds in results:
            assert (status, code) == (408, "REQUEST_TIMEOUT"), (name, status, code)
            assert HEAD_DEADLINE_S - 0.2 <= seconds <= HEAD_DEADLINE_S + 3, (name, seconds)
    assert_no_traceback(log)
    timed_out = [line for line in access_lines(log) if line.get("error_code") == "REQUEST_TIMEOUT"]
    assert len(timed_out) == 80, len(timed_out)


KEEP_ALIVE_S = 5  # uvicorn's, which BentoML keeps


def test_a_connection_that_never_sends_a_byte_is_closed_as_an_idle_one(server):
    """Held for good before (still open after 150 s, in a review): a file descriptor each, for
    as long as the client liked. Closed silently, as an idle keep-alive connection is."""

    async def silent(source: str) -> tuple[float, bytes]:
        address = urlsplit(server.url)
        reader, writer = await asyncio.open_connection(
            address.hostname, address.port, local_addr=(source, 0)
        )
        opened, answer = time.monotonic(), b""
        try:
            async with asyncio.timeout(KEEP_ALIVE_S + 10):
                while chunk := await reader.read(65536):
                    answer += chunk
        except (TimeoutError, OSError):
            return float("inf"), answer
        finally:
            writer.close()
        return time.monotonic() - opened, answer

    async def many() -> list[tuple[float, bytes]]:
        return await asyncio.gather(*(silent(f"127.0.2.{i % 10 + 1}") for i in range(20)))

    closed = asyncio.run(many())
    assert all(answer == b"" for _, answer in closed), closed
    assert all(KEEP_ALIVE_S - 0.5 <= after <= KEEP_ALIVE_S + 3 for after, _ in closed), closed


@pytest.mark.parametrize(
    ("path", "content_type", "status"),
    [("/info", "", 405), ("/no-such-route", "", 404), ("/analyze", "image/jpeg", 415)],
)
def test_an_answer_before_a_body_sent_on_100_continue_ends_the_connection(
    server, path, content_type, status
):
    """A 405 or 404 to a request waiting for `100 Continue` was sent on a kept connection, and
    the client's next request on it was read as this one's body (no answer within 4 s, in a
    review): the server cannot tell whether that body comes, so it closes instead. A type
    refused from the head alone is refused before the 100 too (it came after the whole body)."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Length: 60\r\nContent-Type: {content_type or 'text/plain'}\r\n\r\n".encode()
        )
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 %d" % status), answer[:300]
    assert b"\r\nconnection: close" in head, head  # and the server closed: recv ended


def test_a_client_that_half_closes_after_its_request_still_gets_its_answer(server, digit_png):
    """`shutdown(SHUT_WR)` once the request is sent (what `nc -N` does): the connection was
    closed with the request in work and nothing came back. The answer now comes, and then the
    end of the connection (the client can send nothing more)."""
    body, content_type = raw_multipart([("image", "digit.png", "image/png", digit_png)])
    head = (f"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):  # ends when the server closes (a timeout fails)
            answer += chunk
    answer_head, _, payload = answer.partition(b"\r\n\r\n")
    assert answer_head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"\r\nconnection: close" in answer_head.lower(), answer_head
    assert json.loads(payload)["success"] is True


def _answers_until_closed(sock: socket.socket) -> list[tuple[bytes, dict]]:
    """Every answer on a connection, (head, JSON body) each, read until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):  # ends when the server closes (a timeout fails)
        data += chunk
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")))  # fmt: skip
        answers.append((head.lower(), json.loads(rest[:length])))
        data = rest[length:]
    return answers


@pytest.mark.parametrize(
    ("unreadable", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "INVALID_REQUEST"),
        (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
         400, "INVALID_REQUEST"),
        (b"GET /livez HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
         431, "HEADERS_TOO_LARGE"),
    ],
)  # fmt: skip
def test_pipelined_requests_before_an_unreadable_head_are_answered_first(
    server, digit_png, unreadable, status, code
):
    """Requests pipelined in one read with a head that cannot be read after them: each is
    answered, in order, then the refusal, counted and logged under its own id, and the end.
    The refusal used to be written at once and the connection closed: the requests before it
    ran, their access lines said 200, and their answers were never sent (a review)."""
    body, content_type = raw_multipart([("image", "digit.png", "image/png", digit_png)])
    analyze = (f"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(analyze + analyze + unreadable)
        answers = _answers_until_closed(sock)
    statuses = [int(head.split(b" ")[1]) for head, _ in answers]
    assert statuses == [200, 200, status], answers
    assert all(answer["success"] for _, answer in answers[:2]), answers
    head, refusal = answers[2]
    assert refusal["error"]["code"] == code and b"\r\nconnection: close" in head, answers[2]
    time.sleep(0.3)  # the access line, written as the answer goes
    logged = [
        line for line in access_lines(server.log()) if line["request_id"] == refusal["request_id"]
    ]
    assert [(line["status"], line["error_code"]) for line in logged] == [(status, code)], logged


_UPGRADE_HEADS = {  # what `curl --http2` sends on http://, and a WebSocket opening
    "h2c": "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    "websocket": "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
}


@pytest.mark.parametrize("upgrade", sorted(_UPGRADE_HEADS))
@pytest.mark.parametrize("pieces", [1, 4])
def test_a_body_after_an_upgrade_header_is_read_and_answered(
    server, heldout, digit_png, upgrade, pieces
):
    """The parser took a request with an Upgrade header for the end of HTTP/1.1 and skipped its
    body: `curl --http2 -F image=@digit.png http://...` got 400 "the multipart body is
    malformed" (a review). The body is read (in the head's read, or in later ones), the
    request answered as plain HTTP, and the connection closed; a next request on it is not."""
    body, content_type = raw_multipart([("image", "digit.png", "image/png", digit_png)])
    request = (
        f"POST /analyze HTTP/1.1\r\nHost: x\r\n{_UPGRADE_HEADS[upgrade]}"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    request += body  # fmt: skip
    cut = len(request) - len(body) + len(body) // 3  # pieces: the head and a third of the body,
    parts = [request] if pieces == 1 else [request[:cut], *_thirds(request[cut:])]
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        for part in parts:  # then the rest in thirds, a moment apart
            sock.sendall(part)
            time.sleep(0.05)
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")  # after an upgrade: not read
        answers = _answers_until_closed(sock)
    assert len(answers) == 1, answers
    head, answer = answers[0]
    assert head.startswith(b"http/1.1 200") and b"\r\nconnection: close" in head, answers
    assert answer["prediction"]["label"] == str(heldout[0][1]), answer  # the picture's digit


def _thirds(data: bytes) -> list[bytes]:
    step = -(-len(data) // 3)
    return [data[i : i + step] for i in range(0, len(data), step)]


def test_a_chunked_body_after_an_upgrade_header_is_refused_in_the_envelope(server):
    request = (f"POST /analyze HTTP/1.1\r\nHost: x\r\n{_UPGRADE_HEADS['h2c']}"
               "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n"
               "\r\n5\r\nhello\r\n0\r\n\r\n").encode()  # fmt: skip
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request)
        answers = _answers_until_closed(sock)
    assert len(answers) == 1, answers
    head, answer = answers[0]
    assert head.startswith(b"http/1.1 400"), answers
    assert answer["error"]["code"] == "INVALID_REQUEST", answer
    assert "Upgrade" in answer["error"]["message"], answer
