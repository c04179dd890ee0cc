"""Overload and soak against a real server: honest refusals, bounded latency, no leak.

Figures are printed (run with -s) for docs/security.md; assertions are on behaviour, not speed.
"""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from loadtest.load import closed_loops, open_rate, percentile, throughput
from loadtest.servers import serve
from tests.figures import measured
from tests.pictures import encode

REQUEST_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def digit_png(heldout) -> bytes:
    return encode(heldout[0][0], "PNG")


def test_four_times_capacity_gets_fast_honest_refusals(trained_store, artifacts, digit_png):
    env = {"REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)}
    with serve(trained_store, artifacts / "server-overload.log", env=env) as server:
        url = f"{server.url}/analyze"
        warm = asyncio.run(closed_loops(url, digit_png, concurrency=8, seconds=5))
        capacity = throughput(warm)
        assert capacity > 0, warm[:5]
        outcomes = asyncio.run(open_rate(url, digit_png, rate=4 * capacity, seconds=20))
        after = asyncio.run(closed_loops(url, digit_png, concurrency=2, seconds=3))
        log = server.log()

    latencies = [o.seconds for o in outcomes]
    statuses = {s: sum(o.status == s for o in outcomes) for s in {o.status for o in outcomes}}
    measured(
        f"\noverload: capacity {capacity:.1f} req/s, offered {4 * capacity:.1f} req/s for 20 s, "
        f"{len(outcomes)} requests, statuses {statuses}, served {throughput(outcomes):.1f} req/s, "
        f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms"
    )
    unanswered = [o for o in outcomes if o.status is None]
    assert not unanswered, unanswered[:5]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.get(200, 0) > 0
    for outcome in outcomes:
        if outcome.status != 200:
            assert outcome.code in ("OVERLOADED", "RATE_LIMITED"), outcome
            assert outcome.retry_after is not None
    assert max(latencies) <= REQUEST_TIMEOUT_S + 1
    assert after and all(o.status == 200 for o in after), after[:5]
    assert "Traceback" not in log


@pytest.mark.parametrize(
    "seconds", [60, pytest.param(600, marks=pytest.mark.slow, id="10min")], ids=str
)
def test_soak_memory_stays_flat(trained_store, artifacts, heldout, seconds):
    images = [encode(image, "PNG") for image, _ in heldout[:50]]
    with serve(trained_store, artifacts / f"server-soak-{seconds}.log") as server:
        url = f"{server.url}/analyze"
        asyncio.run(_rotate(url, images, seconds=10))  # warm-up: allocator and caches settle
        before = _tree_rss(server.process.pid)
        started = time.monotonic()
        outcomes = asyncio.run(_rotate(url, images, seconds=seconds))
        after = _tree_rss(server.process.pid)
    growth = (after - before) / before
    measured(
        f"\nsoak {seconds} s: {len(outcomes)} requests in {time.monotonic() - started:.0f} s, "
        f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth:+.2%})"
    )
    assert all(o.status == 200 for o in outcomes), [o for o in outcomes if o.status != 200][:5]
    assert growth < 0.05


async def _rotate(url: str, images: list[bytes], seconds: float) -> list:
    """Four clients cycling through different images (so nothing is a lucky repeat)."""
    results = await asyncio.gather(
        *(
            closed_loops(url, image, concurrency=1, seconds=seconds)
            for image in (images[i::4][0] for i in range(4))
        )
    )
    return [o for group in results for o in group]


def _tree_rss(pid: int) -> int:
    """RSS of the server and its workers (the whole process tree)."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
