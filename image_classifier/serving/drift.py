"""Drift alarm: the rolling mean of top-1 confidence against the baseline in the model card.

A model that starts seeing pictures unlike its training data grows less sure of its answers long
before anyone labels them; its mean top-1 confidence falls. The card records that mean on held-out
data (`metrics.mean_top1_confidence`); the alarm rises when the last `window` predictions' mean
falls more than `max_drop` (relative) below it. It is judged only once the window is full, so a
handful of odd pictures after a restart cannot raise it.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class DriftState:
    samples: int
    rolling_mean: float | None
    relative_change: float | None  # (rolling mean - baseline) / baseline; negative = less sure
    alarm: bool


class DriftMonitor:
    def __init__(self, baseline: float | None, window: int, max_drop: float) -> None:
        if window < 1 or not 0 < max_drop < 1:
            raise ValueError("window must be >= 1 and max_drop between 0 and 1")
        self.baseline = baseline if baseline and baseline > 0 else None
        self.window = window
        self.max_drop = max_drop
        self._recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, confidence: float) -> DriftState:
        with self._lock:
            self._recent.append(confidence)
            return self._state()

    def _state(self) -> DriftState:
        samples = len(self._recent)
        if samples == 0:
            return DriftState(0, None, None, False)
        mean = sum(self._recent) / samples  # a few µs for 500 floats
        if self.baseline is None:
            return DriftState(samples, mean, None, False)
        change = (mean - self.baseline) / self.baseline
        alarm = samples == self.window and change < -self.max_drop
        return DriftState(samples, mean, change, alarm)
