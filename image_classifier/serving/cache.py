"""Duplicate-input cache: the same bytes, model and top_k get the same prediction.

Keyed by the SHA-256 of the uploaded bytes (never the bytes themselves), so a client that sends
the same picture again (retries, thumbnails re-posted, a popular image) skips decode, preprocess
and the model run. Entries expire after a TTL and the least recently used go first when full.
Off by default (`CACHE_SIZE=0`): it pays only where traffic repeats itself (docs/benchmarks.md).

With `REDIS_URL` the answers are shared by every worker and replica (`SharedPredictionCache`);
this worker's LRU stays in front of Redis, since an entry never changes (same bytes, model and
top_k: same answer) and a repeat on the same worker then costs no network round trip. The model
is named by its tag and `Classifier.fingerprint` (its files, and the settings that admit or grade
a picture): a replica with other weights under the same tag, or stricter limits, never takes
another's answers. An entry copied from Redis keeps the time it had left there.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time

from cachetools import TLRUCache
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from ..core.postprocessing import Prediction
from . import metrics
from .shared_state import SharedStateHealth

CacheKey = tuple[str, str, int]  # SHA-256 of the bytes, the model's scope, top_k
REDIS_KEY_PREFIX = "image_classifier:prediction:"


class PredictionCache:
    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        # Each entry expires when its own time is up (one copied from Redis: its time left).
        self._entries: TLRUCache[CacheKey, tuple[Prediction, float]] = TLRUCache(
            max_entries, ttu=lambda _key, entry, _now: entry[1], timer=time.monotonic
        )
        self._lock = threading.Lock()  # cachetools caches are not thread-safe

    @staticmethod
    def key(data: bytes, model_scope: str, top_k: int) -> CacheKey:
        """`model_scope`: name:version and the classifier's fingerprint, since replicas of other
        models, or of other weights or limits, may share one Redis."""
        return hashlib.sha256(data).hexdigest(), model_scope, top_k

    def get(self, key: CacheKey) -> Prediction | None:
        return _counted(self.peek(key))

    def peek(self, key: CacheKey) -> Prediction | None:
        """`get` without counting the lookup."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: CacheKey, prediction: Prediction, ttl_s: float | None = None) -> None:
        expires_at = time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s)
        with self._lock:
            self._entries[key] = (prediction, expires_at)

    async def lookup(self, key: CacheKey) -> Prediction | None:
        """The request path's interface, the same for this class and the shared one."""
        return self.get(key)

    async def store(self, key: CacheKey, prediction: Prediction) -> None:
        self.put(key, prediction)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class SharedPredictionCache(PredictionCache):
    """This worker's LRU, then Redis. Redis down: the LRU alone (`shared_state.py`)."""

    def __init__(self, max_entries: int, ttl_s: float, redis: Redis) -> None:
        super().__init__(max_entries, ttl_s)
        self._redis = redis
        self.health = SharedStateHealth("cache")

    async def lookup(self, key: CacheKey) -> Prediction | None:
        found = self.peek(key)
        if found is None and self.health.usable():
            try:
                name = _redis_key(key)
                async with self._redis.pipeline(transaction=False) as pipe:
                    stored, left_ms = await pipe.get(name).pttl(name).execute()
            except ResponseError:  # the key holds another type (not ours): Redis itself is up
                self.health.succeeded()
            except (RedisError, OSError) as error:
                self.health.failed(error, "using this worker's cache alone")
            else:
                self.health.succeeded()
                found = _parsed(stored, key[2])
                if found is not None:
                    metrics.SHARED_CACHE_HITS.inc()
                    self.put(key, found, min(self.ttl_s, max(left_ms, 0) / 1000))
        return _counted(found)

    async def store(self, key: CacheKey, prediction: Prediction) -> None:
        self.put(key, prediction)
        if not self.health.usable():
            return
        try:
            ttl_ms = max(1, int(self.ttl_s * 1000))
            await self._redis.set(_redis_key(key), prediction.model_dump_json(), px=ttl_ms)
        except (RedisError, OSError) as error:
            self.health.failed(error, "using this worker's cache alone")
        else:
            self.health.succeeded()


def _redis_key(key: CacheKey) -> str:
    digest, model_tag, top_k = key
    return f"{REDIS_KEY_PREFIX}{digest}:{model_tag}:{top_k}"


def _parsed(stored: bytes | None, top_k: int) -> Prediction | None:
    """What Redis holds under the key, if it is an answer this service could have given: not
    ours, from an incompatible release, or not self-consistent (NaN confidences, 50 top-k items
    for a top_k of 3: a black-box review had them served), it is computed again. Whoever can
    write to the shared Redis can still choose answers that pass: docs/deploy.md."""
    if stored is None:
        return None
    try:
        found = Prediction.model_validate_json(stored)
    except ValueError:
        return None
    return found if _consistent(found, top_k) else None


def _consistent(prediction: Prediction, top_k: int) -> bool:
    probabilities = prediction.probabilities
    values = probabilities.values()
    ranked = prediction.top_k
    return (
        len(ranked) == top_k
        and all(math.isfinite(value) and 0 <= value <= 1 for value in values)
        and abs(sum(values) - 1) <= 2e-3  # as imports check the model's rows (and float32)
        and ranked[0].label == prediction.label
        and probabilities.get(prediction.label) == prediction.confidence
        and all(probabilities.get(item.label) == item.probability for item in ranked)
        and all(a.probability >= b.probability for a, b in itertools.pairwise(ranked))
    )


def _counted(found: Prediction | None) -> Prediction | None:
    metrics.CACHE_LOOKUPS.labels(result="hit" if found is not None else "miss").inc()
    return found
