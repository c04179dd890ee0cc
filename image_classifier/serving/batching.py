"""Adaptive batching without a thread of its own: concurrent requests' images share model runs.

Each request's worker thread prepares its tensor and calls `run`. When fewer than `runners` model
runs are in progress it takes everything queued (oldest first, up to `max_batch`, its own tensor
with them) and runs it right there; otherwise it waits until a run has taken its tensor, or a
runner is free again. Nobody waits for a batch to fill: a lone request runs at once, in the same
thread that decoded it, and batches grow with the load, because tensors queue while every runner
is busy.

So an image costs one thread hand-off (event loop -> a worker thread -> back): decoding must leave
the event loop (it would stall every other request), and the model run then happens in the same
thread instead of a second hop through the loop. BentoML's own batcher reached its batch through
an in-process HTTP self-call, which measured here cost more than merging saves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import metrics
from .worker_state import InWork

log = logging.getLogger(__name__)

Row = np.ndarray | Exception  # an item's answer, or why the model gave none
RunEach = Callable[[Sequence[np.ndarray], bool], list[Row]]  # (tensors, solo)


@dataclass
class _Queued:
    tensor: np.ndarray
    queued_at: float
    row: Row | None = None  # set when done
    merged: int = 0
    done: bool = False


class MicroBatcher:
    def __init__(
        self, run_each: RunEach, max_batch: int, runners: int, in_work: InWork | None = None
    ) -> None:
        self.run_each = run_each  # one row per tensor, the exception for an item it failed on;
        # told `solo` when it runs the only image in work in the whole server (`InWork.alone`)
        self.max_batch = max_batch
        self.runners = runners  # model runs at once (each one ONNX Runtime call)
        self.in_work = in_work or InWork()  # shared by the worker's batchers (one per version)
        self._changed = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._running = 0

    def run(self, tensor: np.ndarray) -> tuple[Row, int]:
        """The probabilities row (or why the model failed on it) and how many shared the run.
        Blocking: call it from a worker thread."""
        return self.prepare_and_run(lambda: tensor)

    def prepare_and_run(self, prepare: Callable[[], np.ndarray]) -> tuple[Row, int]:
        """`run` for a tensor still to be prepared (decoded, preprocessed): the image counts as
        in work from now, so no other image runs solo while this one is being decoded."""
        self.in_work.change(1)
        try:
            mine = _Queued(prepare(), time.perf_counter())
            with self._changed:
                self._queue.append(mine)
                while not mine.done:
                    if self._queue and self._running < self.runners:
                        self._lead_one_run()
                    else:
                        self._changed.wait()
            return mine.row, mine.merged
        finally:
            self.in_work.change(-1)

    def _lead_one_run(self) -> None:
        """Take what is queued and run it, with the lock released during the model run."""
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
        solo = len(batch) == 1 and self.in_work.alone()
        self._running += 1
        self._changed.release()
        try:
            started = time.perf_counter()
            for item in batch:
                metrics.QUEUE_WAIT_SECONDS.observe(started - item.queued_at)
            rows = self._rows(batch, solo)
        finally:
            self._changed.acquire()
            self._running -= 1
        for item, row in zip(batch, rows, strict=True):
            item.row, item.merged, item.done = row, len(batch), True
        self._changed.notify_all()

    def _rows(self, batch: list[_Queued], solo: bool) -> list[Row]:
        try:
            return self.run_each([item.tensor for item in batch], solo)
        except Exception as bug:  # run_each isolates model faults: fail the run's items
            log.exception("a batched model run failed outside the model")
            return [bug] * len(batch)
