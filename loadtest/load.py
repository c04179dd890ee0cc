"""An asyncio load generator for the benchmark and the server tests: closed loops or open arrivals.

Every request is recorded with when it started, how long it took and how it ended, so a test can
assert on each one (status, envelope, Retry-After, latency) rather than on averages. aiohttp, not
httpx: client and server share 2 cores, and httpx spent so much CPU at ~500 req/s that the client,
not the server, fell over (measured: aiohttp sends 480 req/s for 3 s of client CPU per 10 s).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp


@dataclass
class Outcome:
    started: float  # time.monotonic()
    seconds: float
    status: int | None  # None: no HTTP answer
    code: str | None = None  # error envelope code, for non-2xx
    retry_after: str | None = None
    failure: str | None = None  # exception name when there was no HTTP answer

    @property
    def enveloped(self) -> bool:
        return self.status is not None and (self.status < 400 or self.code is not None)


async def post_image(
    client: aiohttp.ClientSession,
    url: str,
    image: bytes | list[bytes],
    content_type: str = "image/png",
    field: str = "image",
) -> Outcome:
    """One multipart POST; a list of images goes as repeated `field` parts (/analyze_batch)."""
    form = aiohttp.FormData()
    for index, data in enumerate(image if isinstance(image, list) else [image]):
        form.add_field(field, data, filename=f"picture{index}", content_type=content_type)
    return await post(client, url, data=form)


async def post(client: aiohttp.ClientSession, url: str, **request: Any) -> Outcome:
    """One POST (`request`: aiohttp's data=, headers=), recorded as an Outcome."""
    started = time.monotonic()
    try:
        async with client.post(url, **request) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(started, time.monotonic() - started, None, failure=type(exc).__name__)
    outcome = Outcome(started, time.monotonic() - started, response.status)
    if response.status >= 400:
        outcome.code = response.headers.get("x-error-code")
        if outcome.code is None:  # an answer from outside the service's own error writers
            try:
                parsed = json.loads(body)
                outcome.code = parsed["error"]["code"] if parsed.get("success") is False else None
            except (ValueError, KeyError, TypeError, AttributeError):
                outcome.code = None
        outcome.retry_after = response.headers.get("retry-after")
    return outcome


def _client(max_connections: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def closed_loops(
    url: str,
    image: bytes | list[bytes],
    *,
    concurrency: int,
    seconds: float,
    stop_on_refusal: bool = False,
    **post_options: Any,
) -> list[Outcome]:
    """`concurrency` clients, each sending its next request when the last one is answered.
    `post_options` go to `post_image` (content_type, field); with `raw_headers`, `image` is
    posted as the whole body with those headers instead of as a multipart upload."""
    raw_headers = post_options.pop("raw_headers", None)
    async with _client(concurrency, timeout=60) as client:
        if raw_headers is not None:
            send = partial(post, client, url, data=image, headers=raw_headers)
        else:
            send = partial(post_image, client, url, image, **post_options)
        return await repeat(send, concurrency=concurrency, seconds=seconds,
                            stop_on_refusal=stop_on_refusal)  # fmt: skip


async def repeat(
    send: Callable[[], Awaitable[Outcome]],
    *,
    concurrency: int,
    seconds: float,
    stop_on_refusal: bool = False,
) -> list[Outcome]:
    """Closed loops of any client call (HTTP here, gRPC in the benchmark)."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            outcome = await send()
            outcomes.append(outcome)
            if stop_on_refusal and outcome.status != 200:
                return

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcomes


async def open_rate(
    url: str, image: bytes, *, rate: float, seconds: float, max_in_flight: int = 512
) -> list[Outcome]:
    """Requests arriving at `rate` per second whatever the answers (how overload really comes)."""
    tasks: list[asyncio.Task] = []
    start = time.monotonic()
    async with _client(max_in_flight, timeout=60) as client:
        sent = 0
        while (now := time.monotonic()) < start + seconds:
            due = int((now - start) * rate) + 1
            for _ in range(due - sent):
                tasks.append(asyncio.create_task(post_image(client, url, image)))
            sent = due
            await asyncio.sleep(0.005)
        return list(await asyncio.gather(*tasks))


def raw_multipart(parts: list[tuple[str, str | None, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body built by hand (the hostile corpus breaks it on purpose; h2load
    sends it as it is): (name, filename or None for a text field, content type or None, value)
    parts -> body, content type."""
    boundary = "loadtest-multipart-boundary"
    body = bytearray()
    for name, filename, mime, value in parts:
        body += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"Content-Disposition: {disposition}\r\n".encode()
        if mime is not None:
            body += f"Content-Type: {mime}\r\n".encode()
        body += b"\r\n" + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def throughput(outcomes: list[Outcome]) -> float:
    ok = [o for o in outcomes if o.status == 200]
    if len(ok) < 2:
        return 0.0
    span = max(o.started + o.seconds for o in ok) - min(o.started for o in ok)
    return len(ok) / span


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
