"""State shared by every replica through Redis (`REDIS_URL`), and what happens when it is gone.

Redis is an optimisation and a fairness tool here, never a dependency of an answer: each call has
a short timeout, and after a failure the part (`rate_limit`, `cache`) goes on without Redis for
`RETRY_AFTER_S` before it tries again. So a dead Redis costs at most one short wait per part and
worker every few seconds, one log line per outage, and one count per failed call.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis

from . import metrics

log = logging.getLogger(__name__)

# A Redis on the same network answers in well under a millisecond; a dead one must not hold a
# request longer than this (connect and each read/write).
TIMEOUT_S = 0.25
RETRY_AFTER_S = 5.0
CONNECTION_OPTIONS = {"socket_timeout": TIMEOUT_S, "socket_connect_timeout": TIMEOUT_S}


def redis_client(url: str) -> Redis:
    """An asyncio client; it connects on first use, in the running event loop."""
    return Redis.from_url(url, **CONNECTION_OPTIONS)


class SharedStateHealth:
    """Whether one part should use Redis now: off for `RETRY_AFTER_S` after a failure."""

    def __init__(self, part: str) -> None:
        self.part = part
        self._down_until: float | None = None  # None: up

    def usable(self) -> bool:
        return self._down_until is None or time.monotonic() >= self._down_until

    def failed(self, error: BaseException, fallback: str) -> None:
        metrics.SHARED_STATE_ERRORS.labels(part=self.part).inc()
        if self._down_until is None:  # once per outage, not per request
            log.error(
                "Redis unreachable for the %s (%s: %s); %s, retrying every %g s",
                self.part.replace("_", " "),
                type(error).__name__,
                error,
                fallback,
                RETRY_AFTER_S,
            )
        self._down_until = time.monotonic() + RETRY_AFTER_S

    def succeeded(self) -> None:
        if self._down_until is not None:
            log.warning("Redis reachable again for the %s", self.part.replace("_", " "))
            self._down_until = None
