"""How late a worker's event loop runs, on /metrics.

Every request of a worker, refusals and probes included, waits for its event loop; a stall
shows here whatever its cause (a long callback, a garbage collection, a wait for a CPU or for the
interpreter lock), where from outside it looks like a slow network."""

from __future__ import annotations

import asyncio
import time

from . import metrics


def watch_lag(every_s: float = 0.02) -> None:
    """Observe, every `every_s`, how late the loop ran a timer that was due (call in the worker's
    running event loop). 50 timers a second cost a worker well under a millisecond of CPU."""
    loop = asyncio.get_running_loop()

    def tick(due: float) -> None:
        now = time.monotonic()
        metrics.EVENT_LOOP_LAG_SECONDS.observe(max(0.0, now - due))
        loop.call_later(every_s, tick, now + every_s)

    loop.call_later(every_s, tick, time.monotonic() + every_s)
