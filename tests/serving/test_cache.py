"""The duplicate-input cache: on its own, and in a real server."""

from __future__ import annotations

import time

import httpx

from image_classifier.cache import PredictionCache
from image_classifier.postprocessing import to_prediction
from tests.support import encode, metric_value, serve


def _prediction(label_index: int):
    probabilities = [0.1] * 4
    probabilities[label_index] = 0.7
    return to_prediction(probabilities, ["a", "b", "c", "d"], 2, high=0.9, medium=0.6)


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


def test_a_repeated_picture_is_answered_from_the_cache(trained_store, heldout, artifacts):
    env = {"CACHE_SIZE": "16", "CACHE_TTL_S": "3"}
    with serve(trained_store, artifacts / "cache-server.log", env=env) as server:

        def analyze(image, **form):
            files = {"image": ("d.png", encode(image, "PNG"), "image/png")}
            response = httpx.post(f"{server.url}/analyze", files=files, data=form, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        first, again = analyze(heldout[5][0]), analyze(heldout[5][0])
        assert (first["cached"], again["cached"]) == (False, True)
        assert again["prediction"] == first["prediction"]
        assert analyze(heldout[5][0], top_k="2")["cached"] is False  # top_k is part of the key
        assert analyze(heldout[6][0])["cached"] is False
        time.sleep(3.5)
        assert analyze(heldout[5][0])["cached"] is False  # expired
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric_value(metrics, 'image_classifier_cache_lookups_total{result="hit"}') == 1
        assert metric_value(metrics, 'image_classifier_cache_lookups_total{result="miss"}') == 4
        assert metric_value(metrics, "image_classifier_predictions_total") == 5  # hits count too
