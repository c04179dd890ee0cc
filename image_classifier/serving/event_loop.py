"""What stalls a worker's event loop, on /metrics: how late the loop runs, and the garbage
collector's pauses.

Every request of a worker, refusals and probes included, waits for its event loop; a stall
shows in its lateness whatever its cause (a long callback, a garbage collection, a wait for a CPU
or for the interpreter lock), where from outside it looks like a slow network."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque

from . import metrics


def watch() -> None:
    """Both watches below; call in the worker's running event loop."""
    watch_garbage_collector()
    watch_lag()


def watch_lag(every_s: float = 0.02) -> None:
    """Observe, every `every_s`, how late the loop ran a timer that was due (call in the worker's
    running event loop). 50 timers a second cost a worker well under a millisecond of CPU."""
    loop = asyncio.get_running_loop()

    def tick(due: float) -> None:
        now = time.monotonic()
        metrics.EVENT_LOOP_LAG_SECONDS.observe(max(0.0, now - due))
        loop.call_later(every_s, tick, now + every_s)

    loop.call_later(every_s, tick, time.monotonic() + every_s)


def watch_garbage_collector(every_s: float = 1.0) -> None:
    """Time every garbage collection of this process into /metrics, with what it freed; call in
    the worker's running event loop.

    A collection holds the worker's event loop, refusals included: under overload, cyclic
    garbage that each request left (fixed in http/protocol.py) made collections of 6-13 ms
    about once a second (measured by hand with this same hook), invisible from outside.
    The hook only notes (a deque's append takes no lock): it runs inside whatever allocation
    set the collection off, prometheus_client's own locked writes included, and a metric
    written from there deadlocked the worker for good. The event loop moves the notes to the
    metrics every `every_s`."""
    loop = asyncio.get_running_loop()
    pauses = [metrics.GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]
    freed = [metrics.GC_COLLECTED.labels(str(g)) for g in range(3)]
    notes: deque[tuple[int, float, int]] = deque(maxlen=100_000)
    started = [0.0]

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            notes.append((info["generation"], time.perf_counter() - started[0], info["collected"]))

    def publish() -> None:
        while notes:
            generation, seconds, collected = notes.popleft()
            pauses[generation].observe(seconds)
            if collected:
                freed[generation].inc(collected)
        loop.call_later(every_s, publish)

    gc.callbacks.append(note)
    publish()
