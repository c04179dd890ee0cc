"""Duplicate-input cache: the same bytes, model version and top_k get the same prediction.

Keyed by the SHA-256 of the uploaded bytes (never the bytes themselves), so a client that sends
the same picture again (retries, thumbnails re-posted, a popular image) skips decode, preprocess
and the model run. Entries expire after a TTL and the least recently used go first when full.
Off by default (`CACHE_SIZE=0`): it pays only where traffic repeats itself (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import threading

from cachetools import TTLCache

from ..core.postprocessing import Prediction
from . import metrics


class PredictionCache:
    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self._entries: TTLCache[tuple[str, str, int], Prediction] = TTLCache(max_entries, ttl_s)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe

    @staticmethod
    def key(data: bytes, model_version: str, top_k: int) -> tuple[str, str, int]:
        return hashlib.sha256(data).hexdigest(), model_version, top_k

    def get(self, key: tuple[str, str, int]) -> Prediction | None:
        with self._lock:
            found = self._entries.get(key)
        metrics.CACHE_LOOKUPS.labels(result="hit" if found is not None else "miss").inc()
        return found

    def put(self, key: tuple[str, str, int], prediction: Prediction) -> None:
        with self._lock:
            self._entries[key] = prediction

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
