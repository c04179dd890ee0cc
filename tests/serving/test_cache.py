"""The duplicate-input cache on its own (tests/http/test_cache_served.py: in a real server)."""

from __future__ import annotations

import time

from image_classifier.core.postprocessing import to_prediction
from image_classifier.serving.cache import PredictionCache


def _prediction(label_index: int):
    probabilities = [0.1] * 4
    probabilities[label_index] = 0.7
    return to_prediction(probabilities, ["a", "b", "c", "d"], 3, high=0.9, medium=0.6)


def test_keys_separate_bytes_versions_and_top_k_and_old_entries_go_first():
    cache = PredictionCache(max_entries=2, ttl_s=60)
    key = cache.key(b"picture", "v1", 3)
    assert key != cache.key(b"picture", "v2", 3) != cache.key(b"picture", "v1", 2)
    assert b"picture" not in repr(key).encode()  # a digest, never the bytes
    cache.put(key, _prediction(0))
    assert cache.get(key) == _prediction(0)
    cache.put(cache.key(b"two", "v1", 3), _prediction(1))
    cache.put(cache.key(b"three", "v1", 3), _prediction(2))
    assert len(cache) == 2 and cache.get(key) is None  # least recently used went first


def test_entries_expire():
    cache = PredictionCache(max_entries=4, ttl_s=0.05)
    key = cache.key(b"picture", "v1", 3)
    cache.put(key, _prediction(0))
    time.sleep(0.1)
    assert cache.get(key) is None
