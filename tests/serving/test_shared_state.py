"""The Redis-backed rate limit and cache on their own, against a real redis-server
(tests/http/test_scale_out.py: the same through nginx and real replicas)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from limits import parse

from image_classifier.http.admission import RateLimit
from image_classifier.serving import cache as cache_module
from image_classifier.serving import metrics
from image_classifier.serving.cache import SharedPredictionCache
from image_classifier.serving.settings import Settings
from image_classifier.serving.shared_state import redis_client
from tests.cluster import redis_server
from tests.serving.test_cache import _prediction


@pytest.fixture
def redis(tmp_path):
    with redis_server(tmp_path) as running:
        yield running


def _errors(part: str) -> float:
    return metrics.SHARED_STATE_ERRORS.labels(part=part)._value.get()


def test_two_workers_share_one_limit_and_each_limits_alone_when_redis_is_gone(redis, caplog):
    async def scenario():
        rate = parse("3/minute")
        first, second = RateLimit(rate, redis.url), RateLimit(rate, redis.url)
        let_in = [await limit.hit("client") is None for limit in (first, second) * 3]
        assert let_in == [True, True, True, False, False, False]  # 3 in all, not 3 each
        assert await first.hit("another") is None  # another client has its own budget
        redis.stop()
        errors = _errors("rate_limit")
        with caplog.at_level(logging.ERROR):
            alone = [await first.hit("client") is None for _ in range(5)]
        assert alone == [True, True, True, False, False]  # fails open to the worker's own count
        assert _errors("rate_limit") == errors + 1  # the other calls skipped Redis meanwhile
        assert caplog.text.count("Redis unreachable for the rate limit") == 1

    asyncio.run(scenario())


def test_a_prediction_stored_by_one_worker_is_found_by_another_until_redis_is_gone(redis, caplog):
    async def scenario():
        one = SharedPredictionCache(8, 60, redis_client(redis.url))
        other = SharedPredictionCache(8, 60, redis_client(redis.url))
        key = one.key(b"picture", "v1", 3)
        hits = metrics.SHARED_CACHE_HITS._value.get()
        assert await other.lookup(key) is None
        await one.store(key, _prediction(1))
        assert await other.lookup(key) == _prediction(1)
        assert await other.lookup(other.key(b"picture", "v2", 3)) is None  # version in the key
        assert await other.lookup(other.key(b"picture", "v1", 2)) is None  # top_k in the key
        assert metrics.SHARED_CACHE_HITS._value.get() == hits + 1
        redis.stop()
        errors = _errors("cache")
        with caplog.at_level(logging.ERROR):
            assert await other.lookup(key) == _prediction(1)  # its own LRU still answers
            assert await one.lookup(one.key(b"new", "v1", 3)) is None
            await one.store(one.key(b"new", "v1", 3), _prediction(2))
            assert await one.lookup(one.key(b"new", "v1", 3)) == _prediction(2)
        assert _errors("cache") == errors + 1
        assert caplog.text.count("Redis unreachable for the cache") == 1

    asyncio.run(scenario())


def test_what_redis_holds_is_an_answer_only_if_the_service_could_have_given_it(redis):
    """Found by a black-box review: a well-formed but impossible value under a key (confidence
    7.5, NaN, 50 top-k items for a top_k of 3) was served as the answer; a key of another type
    (a list) was taken for Redis being down, which turned the shared cache off for 5 s in every
    worker that met it, and the key stayed."""

    async def scenario():
        cache = SharedPredictionCache(8, 60, redis_client(redis.url))
        raw = redis_client(redis.url)
        good = _prediction(1)
        bad = {
            "impossible confidence": good.model_copy(update={"confidence": 7.5}),
            "NaN": good.model_copy(
                update={"probabilities": {**good.probabilities, "a": float("nan")}}
            ),
            "too many top-k": good.model_copy(update={"top_k": good.top_k * 2}),
            "another label": good.model_copy(update={"label": "not-a-label"}),
        }
        for index, (why, value) in enumerate(bad.items()):
            key = cache.key(b"picture %d" % index, "v1", 3)
            await raw.set(cache_module._redis_key(key), value.model_dump_json())
            assert await cache.lookup(key) is None, why
        key = cache.key(b"a list", "v1", 3)
        await raw.rpush(cache_module._redis_key(key), "x")
        errors = _errors("cache")
        assert await cache.lookup(key) is None
        assert _errors("cache") == errors and cache.health.usable()  # Redis is up
        await cache.store(key, good)  # and the key is the service's again
        other = SharedPredictionCache(8, 60, redis_client(redis.url))
        assert await other.lookup(key) == good

    asyncio.run(scenario())


def test_an_answer_copied_from_redis_keeps_the_time_it_had_left_there(redis):
    """The worker's copy started a full CACHE_TTL_S again: with two replicas an answer lived up
    to twice as long as configured (found by a black-box review)."""

    async def scenario():
        one = SharedPredictionCache(8, 60, redis_client(redis.url))
        other = SharedPredictionCache(8, 60, redis_client(redis.url))
        key = one.key(b"picture", "v1", 3)
        await one.store(key, _prediction(1))
        await redis_client(redis.url).pexpire(cache_module._redis_key(key), 5_000)
        assert await other.lookup(key) == _prediction(1)
        _, expires_at = other._entries[key]
        assert expires_at - time.monotonic() <= 5.0  # not the full 60 s

    asyncio.run(scenario())


def test_redis_url_is_off_by_default_and_checked():
    assert Settings().redis_url == ""
    assert Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"}).redis_url
    with pytest.raises(ValueError, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": "127.0.0.1:6379"})
