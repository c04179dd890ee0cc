"""Adaptive batching without a thread of its own: concurrent requests' images share model runs.

Each request's worker thread prepares its tensor and hands it to `hand_over`. When fewer than
`runners` model runs are in progress the thread becomes a runner: it runs everything queued
(oldest first, up to `max_batch`, its own tensor with them), and goes on running what queued
meanwhile until the queue is empty. Otherwise it leaves its tensor in the queue for a runner and
goes back to decode the next image, so a worker's other thread keeps decoding while one runs the
model, and the tensors that queue meanwhile share the next run. Nobody waits for a batch to fill:
a lone request runs at once, in the same thread that decoded it, and batches grow with the load.

So an image costs one thread hand-off (event loop -> a worker thread -> back): decoding must leave
the event loop (it would stall every other request), and the model run then happens in a thread
already off the loop. A queued image's row comes back through `deliver` (the predictor wakes the
event loop with it). The queue holds at most `max_batch` tensors: a thread that finds it full
waits until a runner takes its tensor, so decoding cannot run ahead of the model without bound.
BentoML's own batcher reached its batch through an in-process HTTP self-call, which measured here
cost more than merging saves.
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
Deliver = Callable[[Row, int], None]  # (row, images in its run); called from the runner's thread


@dataclass
class _Queued:
    tensor: np.ndarray
    queued_at: float
    deliver: Deliver
    row: Row | None = None  # set when done
    merged: int = 0
    taken: bool = False  # in a run (or done)
    done: bool = False
    delivered: bool = False


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
        """`hand_over`, waiting for the row when a runner has it."""
        arrived = threading.Event()
        answer: list[tuple[Row, int]] = []

        def deliver(row: Row, merged: int) -> None:
            answer.append((row, merged))
            arrived.set()

        with self.in_work.counting():
            ran = self.hand_over(prepare, deliver)
            if ran is None:
                arrived.wait()
                ran = answer[0]
        return ran

    def hand_over(
        self, prepare: Callable[[], np.ndarray], deliver: Deliver
    ) -> tuple[Row, int] | None:
        """Prepare a tensor (decode, preprocess) and get it run: its row and how many shared the
        run when this thread ran it and had nothing left to run, else None and `deliver` gets
        them (from the thread that runs it). The caller counts the image in `in_work` until its
        row is in hand, decoding included, so no other image runs solo meanwhile."""
        mine = _Queued(prepare(), time.perf_counter(), deliver)
        with self._changed:
            self._queue.append(mine)
            while self._busy() and len(self._queue) > self.max_batch and not mine.taken:
                self._changed.wait()  # the queue is full: wait for a runner to take some
            if mine.taken or self._busy():
                return None  # a runner has it, or will take it: back to decoding
            return self._run_until_empty(mine)

    def _busy(self) -> bool:
        return self._running >= self.runners

    def _run_until_empty(self, mine: _Queued) -> tuple[Row, int] | None:
        """Run batches (lock held, released during each run) until nothing is queued; `mine`'s
        row is returned, or delivered as soon as it is known if more runs follow it."""
        self._running += 1
        try:
            while self._queue:
                self._run_a_batch(mine)
                if mine.done and self._queue and not mine.delivered:
                    _deliver(mine)  # at once: the runs that follow are the others'
        finally:
            self._running -= 1
            self._changed.notify_all()
        return None if mine.delivered else (mine.row, mine.merged)

    def _run_a_batch(self, mine: _Queued) -> None:
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
        for item in batch:
            item.taken = True
        self._changed.notify_all()  # the queue has room again
        solo = len(batch) == 1 and self.in_work.alone()
        self._changed.release()
        try:
            started = time.perf_counter()
            for item in batch:
                metrics.QUEUE_WAIT_SECONDS.observe(started - item.queued_at)
            rows = self._rows(batch, solo)
            for item, row in zip(batch, rows, strict=True):
                item.row, item.merged, item.done = row, len(batch), True
                if item is not mine:
                    _deliver(item)
        finally:
            self._changed.acquire()

    def _rows(self, batch: list[_Queued], solo: bool) -> list[Row]:
        try:
            return self.run_each([item.tensor for item in batch], solo)
        except Exception as bug:  # run_each isolates model faults: fail the run's items
            log.exception("a batched model run failed outside the model")
            return [bug] * len(batch)


def _deliver(item: _Queued) -> None:
    item.delivered = True
    try:
        item.deliver(item.row, item.merged)
    except Exception:  # the runner goes on: the other items' requests still wait for theirs
        log.exception("an image's row could not be delivered")
