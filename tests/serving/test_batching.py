"""The adaptive batcher, called from threads as the predictor does, with a stand-in model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from image_classifier.serving.batching import MicroBatcher


class RecordingModel:
    """Doubles each input; a negative input gets a ValueError in its place (a model fault on
    that item)."""

    def __init__(self, seconds: float = 0.0, fail_outside_the_model: bool = False) -> None:
        self.runs: list[int] = []
        self.solo: list[bool] = []
        self.threads: list[str] = []
        self.seconds = seconds
        self.fail = fail_outside_the_model
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def run_each(self, tensors, solo):
        with self.lock:
            self.runs.append(len(tensors))
            self.solo.append(solo)
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        if self.fail:
            raise RuntimeError("a bug, not a model fault")
        return [ValueError(t[0]) if t[0] < 0 else t * 2 for t in tensors]


def run_all(batcher: MicroBatcher, values: list[float], threads: int) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda v: batcher.run(np.array([v])), values))


def test_a_lone_request_runs_at_once_in_its_own_thread():
    model = RecordingModel()
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)
    started = time.perf_counter()
    row, merged = batcher.run(np.array([1.0]))
    assert row.tolist() == [2.0] and merged == 1 and model.runs == [1]
    assert model.threads == [threading.current_thread().name]  # no hand-off to another thread
    assert model.solo == [True]  # alone: it may use every core
    assert time.perf_counter() - started < 0.5  # no waiting for a batch to fill


def test_requests_arriving_while_the_model_is_busy_share_a_run():
    model = RecordingModel(seconds=0.05)
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)
    results = run_all(batcher, [float(i) for i in range(20)], threads=20)
    assert [row.tolist() for row, _ in results] == [[2.0 * i] for i in range(20)]
    assert sum(model.runs) == 20 and max(model.runs) == 8 and len(model.runs) < 20
    assert all(1 <= merged <= 8 for _, merged in results)
    assert not any(solo for solo, size in zip(model.solo, model.runs, strict=True) if size > 1)
    assert model.solo.count(True) <= 1  # only the first run can have found nobody else


def test_no_run_is_solo_while_another_image_is_being_prepared():
    model = RecordingModel()
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)
    decoding, decoded = threading.Event(), threading.Event()

    def slow_prepare():
        decoding.set()
        decoded.wait(5)
        return np.array([2.0])

    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(batcher.prepare_and_run, slow_prepare)
        decoding.wait(5)
        row, _ = batcher.run(np.array([1.0]))  # runs while the other image is decoding
        decoded.set()
        assert other.result(5)[0].tolist() == [4.0] and row.tolist() == [2.0]
    assert model.solo == [False, True]  # the second image ran when nothing else was in work


def test_a_failing_item_fails_alone():
    model = RecordingModel(seconds=0.02)
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)
    rows = [row for row, _ in run_all(batcher, [1.0, -1.0, 3.0, 4.0], threads=4)]
    assert isinstance(rows[1], ValueError) and rows[1].args == (-1.0,)  # its own failure
    assert [r.tolist() for r in (rows[0], rows[2], rows[3])] == [[2.0], [6.0], [8.0]]


def test_a_bug_outside_the_model_fails_its_run_and_no_thread_hangs():
    model = RecordingModel(seconds=0.02, fail_outside_the_model=True)
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)
    results = run_all(batcher, [1.0, 2.0, 3.0], threads=3)
    assert [type(row) for row, _ in results] == [RuntimeError] * 3


def test_runners_bound_the_model_runs_at_once():
    model = RecordingModel(seconds=0.2)
    batcher = MicroBatcher(model.run_each, max_batch=1, runners=2)
    started = time.perf_counter()
    run_all(batcher, [1.0, 2.0, 3.0, 4.0], threads=4)
    assert model.most_at_once == 2
    assert time.perf_counter() - started < 0.7  # two at a time: ~0.4 s, not 0.8 s serially


def test_a_thread_hands_its_image_to_the_running_thread_and_goes_back():
    """While one thread runs the model, another's images queue and it returns at once (to
    decode the next); the running thread delivers its own row as soon as it has it, then runs
    the queued images together and delivers theirs."""
    model = RecordingModel()
    batcher = MicroBatcher(model.run_each, max_batch=8, runners=1)
    running, release = threading.Event(), threading.Event()
    events: list = []

    def first_run_waits(tensors, solo):
        events.append(("run", len(tensors)))
        if len(events) == 1:
            running.set()
            release.wait(5)
        return model.run_each(tensors, solo)

    batcher.run_each = first_run_waits

    def deliver(row, merged):
        events.append(("row", row.tolist(), merged, threading.current_thread().name))

    with ThreadPoolExecutor(1, thread_name_prefix="runner") as pool:
        runner = pool.submit(batcher.hand_over, lambda: np.array([1.0]), deliver)
        running.wait(5)
        handed = [batcher.hand_over(lambda v=v: np.array([v]), deliver) for v in (2.0, 3.0)]
        assert handed == [None, None] and len(events) == 1  # back at once, nothing run yet
        release.set()
        assert runner.result(5) is None  # its own row was delivered: more runs followed it
    runner_thread = model.threads[0]
    assert runner_thread.startswith("runner")
    assert events[1:] == [
        ("row", [2.0], 1, runner_thread),
        ("run", 2),  # the two queued images share the second run
        ("row", [4.0], 2, runner_thread),
        ("row", [6.0], 2, runner_thread),
    ]


def test_a_full_queue_holds_the_thread_until_a_runner_takes_its_image():
    model = RecordingModel(seconds=0.2)
    batcher = MicroBatcher(model.run_each, max_batch=1, runners=1)
    rows: dict[float, float] = {}
    with ThreadPoolExecutor(1) as pool:
        pool.submit(batcher.run, np.array([1.0]))
        time.sleep(0.05)  # the first image is running
        assert batcher.hand_over(lambda: np.array([2.0]), lambda r, m: rows.update({2: r})) is None
        started = time.perf_counter()
        batcher.hand_over(lambda: np.array([3.0]), lambda r, m: rows.update({3: r}))
        waited = time.perf_counter() - started
    assert waited > 0.1  # the queue (max_batch 1) held image 2: image 3 waited for room
    assert sorted(rows) == [2, 3] and model.runs == [1, 1, 1]
