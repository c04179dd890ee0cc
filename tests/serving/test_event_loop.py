"""The event loop's lateness, as /metrics shows it."""

from __future__ import annotations

import asyncio
import time

from image_classifier.serving import event_loop, metrics


def _lag_samples() -> tuple[float, float]:
    """(observations, observations later than 0.1 s) so far in this process."""
    samples = {
        (s.name, s.labels.get("le")): s.value
        for s in metrics.EVENT_LOOP_LAG_SECONDS.collect()[0].samples
    }
    count = samples[("image_classifier_event_loop_lag_seconds_count", None)]
    return count, count - samples[("image_classifier_event_loop_lag_seconds_bucket", "0.1")]


def test_a_stalled_loop_shows_as_one_late_timer():
    async def scenario() -> None:
        event_loop.watch_lag(every_s=0.01)
        await asyncio.sleep(0.1)
        time.sleep(0.2)  # a callback that holds the loop
        await asyncio.sleep(0.1)

    count, late = _lag_samples()
    asyncio.run(scenario())
    new_count, new_late = _lag_samples()
    assert new_count - count >= 10  # the timer kept running around the stall
    assert new_late - late == 1  # the stall, seen once, and nothing else that late
