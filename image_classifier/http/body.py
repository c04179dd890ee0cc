"""Reading an upload's body against the clock: a byte cap, a body deadline and a minimum rate.

Without them a client that sends its headers and then one byte a second (or nothing) keeps its
connection and its place until the request deadline, and a few hundred such clients lock honest
ones out. So the body must arrive within `timeout_s` and, judged from the first half of that
on, at `min_bytes_per_s` on average; otherwise the request is cut with 408 REQUEST_TIMEOUT.

Why half, not the first second: every cut connection is opened again by its attacker, and
handling a connection costs the server the same as a small request. Cut after 1 s, 500 slow
connections from 50 addresses, reopened as soon as cut, cost honest clients 40 % of their
throughput; cut after 2.5 s, 17 % (measured with BODY_TIMEOUT_S 5).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import Receive

from ..core.errors import ClassifierError, ErrorCode
from ..serving.settings import Settings


class ClientGone(Exception):
    """The client hung up before its body's end: no one to answer (logged as 499, not counted
    as a bad request: the refused-uploads alarm would ring for clients that gave up)."""


# Set per request by the protocol (`protocol._run`): the refusal it answered itself when it could
# not read the body on (broken chunk framing) and closed the connection. Then the handler, told
# the client is gone, logs and counts that answer, not a client that left.
PROTOCOL_REFUSALS: ContextVar[list[ClassifierError]] = ContextVar("protocol_refusals")


def protocol_refusal() -> ClassifierError | None:
    """What the protocol already answered this request's client, if it did: that answer, not
    the handler's own (dropped: the connection is closed), is the one to log and count."""
    refused = PROTOCOL_REFUSALS.get(None)
    return refused[0] if refused else None


@dataclass(frozen=True)
class BodyPace:
    timeout_s: float = Settings.body_timeout_s
    min_bytes_per_s: int = Settings.body_min_bytes_per_s

    @property
    def grace_s(self) -> float:
        """Until then the rate is not judged (slow starts, cheap attackers reconnecting)."""
        return self.timeout_s / 2

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyPace:
        return cls(settings.body_timeout_s, settings.body_min_bytes_per_s)

    def next_bytes_due(self, started: float, received: int) -> float:
        """When more bytes must have come (loop time): the body deadline, or the moment the
        average rate since the grace period would fall below the minimum."""
        by_rate = started + self.grace_s + received / self.min_bytes_per_s
        return min(started + self.timeout_s, by_rate)


async def read_body(
    receive: Receive,
    declared: str | None,
    max_bytes: int,
    pace: BodyPace,
    encoding: str | None = None,
) -> list[bytes]:
    """The whole body, as the chunks it came in, or ClassifierError: 413 over `max_bytes` (a
    Content-Length over it is refused before a byte is read), 408 too slow; ClientGone when the
    client hangs up. A body sent gzip or deflate (`encoding`: its Content-Encoding) comes inflated.

    Chunks, not one joined copy: a multipart upload is parsed chunk by chunk, so a photo's bytes
    are copied once (into its part), not twice. Each copy of a few MB is a fresh block of pages
    (memory.py has malloc map blocks over 1 MB), and with phone photos the join alone was a
    fifth of the event loop's time in a py-spy profile."""
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    inflater = _Inflater.for_encoding(encoding)
    chunks: list[bytes] = []
    size = 0
    async for chunk in _paced_chunks(receive, pace):
        pieces = [chunk] if inflater is None else inflater.inflate(chunk)
        for piece in pieces:
            size += len(piece)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(piece)
            if inflater is not None:
                await asyncio.sleep(0)  # a few KB may inflate to the cap: others go between
    if inflater is not None:
        inflater.check_whole()
    return chunks


class _Inflater:
    """A gzip or deflate body (what tritonclient's `request_compression_algorithm` sends),
    inflated as it comes; the byte cap counts inflated bytes, so a zip bomb stops at it."""

    _ENCODINGS = {"gzip", "x-gzip", "deflate"}
    STEP = 1 << 20

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(32 + zlib.MAX_WBITS)  # either header, found by zlib

    @classmethod
    def for_encoding(cls, encoding: str | None) -> _Inflater | None:
        name = (encoding or "identity").strip().lower()
        if name == "identity":
            return None
        if name not in cls._ENCODINGS:
            raise ClassifierError(
                ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Encoding {name[:40]!r} is not accepted; send the body as it is, or "
                "gzip or deflate",
            )
        return cls()

    def inflate(self, chunk: bytes) -> Iterator[bytes]:
        """The chunk inflated, in pieces of at most `STEP` bytes (the caller stops at its cap).
        Members that follow one another (`cat a.gz b.gz`, pigz; RFC 1952 2.2) are one body."""
        while True:
            if self._zlib.eof:
                chunk = self._zlib.unused_data + chunk
                if not chunk:
                    return
                self._zlib = zlib.decompressobj(32 + zlib.MAX_WBITS)  # the next member
            try:
                piece = self._zlib.decompress(chunk, self.STEP)
            except zlib.error:
                raise self._corrupt() from None
            chunk = self._zlib.unconsumed_tail
            yield piece
            # A full step may leave output pending, and a member's end the next one's bytes.
            if not chunk and len(piece) < self.STEP and not self._zlib.unused_data:
                return

    def check_whole(self) -> None:
        if not self._zlib.eof or self._zlib.unused_data:
            raise self._corrupt()

    @staticmethod
    def _corrupt() -> ClassifierError:
        return ClassifierError(
            ErrorCode.INVALID_REQUEST,
            "the body is not whole gzip or deflate data, as its Content-Encoding says",
        )


async def discard_body(receive: Receive, pace: BodyPace) -> bool:
    """Read and drop the body (so a refusal is not a reset under the client), at most until the
    pace gives up on it; False when it did (or the client left) before the body's end."""
    try:
        async for _ in _paced_chunks(receive, pace):
            pass
    except (ClassifierError, ClientGone):
        return False
    return True


async def _paced_chunks(receive: Receive, pace: BodyPace):
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0
    while True:
        try:
            async with asyncio.timeout_at(pace.next_bytes_due(started, received)):
                message = await receive()
        except TimeoutError:
            elapsed = loop.time() - started
            raise ClassifierError(
                ErrorCode.REQUEST_TIMEOUT,
                f"the request body came too slowly ({received:,} bytes in {elapsed:.1f} s): send "
                f"it within {pace.timeout_s:g} s, at {pace.min_bytes_per_s:,} bytes/s or more",
            ) from None
        if message["type"] == "http.disconnect":
            raise protocol_refusal() or ClientGone
        chunk = message.get("body", b"")
        received += len(chunk)
        yield chunk
        if not message.get("more_body", False):
            return


def _too_large(max_bytes: int) -> ClassifierError:
    return ClassifierError(
        ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is over the limit of {max_bytes:,} bytes"
    )
