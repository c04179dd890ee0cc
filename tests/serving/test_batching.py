"""The in-process adaptive batcher, with a stand-in model that records its runs."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from image_classifier.serving.batching import MicroBatcher


class RecordingModel:
    """Doubles each input; returns None for negative inputs (a model fault on that item)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.runs: list[int] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def run_each(self, tensors):
        with self.lock:
            self.runs.append(len(tensors))
        time.sleep(self.seconds)
        return [None if t[0] < 0 else t * 2 for t in tensors]


def test_a_lone_request_runs_at_once():
    model = RecordingModel()
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)

    async def one():
        started = time.perf_counter()
        row, merged = await batcher.submit(np.array([1.0]))
        return row, merged, time.perf_counter() - started

    row, merged, seconds = asyncio.run(one())
    assert row.tolist() == [2.0] and merged == 1 and model.runs == [1]
    assert seconds < 0.5  # no waiting for a batch to fill


def test_requests_arriving_while_the_model_is_busy_share_a_run():
    model = RecordingModel(seconds=0.05)
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)

    async def many():
        results = await asyncio.gather(*(batcher.submit(np.array([float(i)])) for i in range(20)))
        return results

    results = asyncio.run(many())
    assert [row.tolist() for row, _ in results] == [[2.0 * i] for i in range(20)]  # in order
    assert sum(model.runs) == 20 and max(model.runs) == 8 and len(model.runs) < 20
    assert all(1 <= merged <= 8 for _, merged in results)


def test_a_failing_item_fails_alone():
    model = RecordingModel(seconds=0.02)
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)

    async def mixed():
        results = await asyncio.gather(
            *(batcher.submit(np.array([v])) for v in (1.0, -1.0, 3.0, 4.0))
        )
        return results

    rows = [row for row, _ in asyncio.run(mixed())]
    assert rows[1] is None and [r.tolist() for r in (rows[0], rows[2], rows[3])] == [
        [2.0], [6.0], [8.0]
    ]  # fmt: skip


def test_a_request_that_gave_up_is_not_run():
    model = RecordingModel(seconds=0.1)
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)

    async def scenario():
        first = asyncio.create_task(batcher.submit(np.array([1.0])))
        await asyncio.sleep(0.02)  # the first run is busy
        gave_up = asyncio.create_task(batcher.submit(np.array([2.0])))
        await asyncio.sleep(0.01)
        gave_up.cancel()
        kept = await batcher.submit(np.array([3.0]))
        await first
        with pytest.raises(asyncio.CancelledError):
            await gave_up
        return kept

    kept = asyncio.run(scenario())
    assert kept[0].tolist() == [6.0] and model.runs == [1, 1]


def test_two_runners_run_in_parallel():
    model = RecordingModel(seconds=0.2)
    batcher = MicroBatcher(model.run_each, max_batch=1, runners=2)

    async def pair():
        started = time.perf_counter()
        await asyncio.gather(batcher.submit(np.array([1.0])), batcher.submit(np.array([2.0])))
        return time.perf_counter() - started

    assert asyncio.run(pair()) < 0.35  # two 0.2 s runs at once, not one after the other
