"""Many replicas as one service, on one machine with real parts (tests/cluster.py): redis-server,
REPLICAS `bentoml serve` replicas behind nginx, prometheus scraping them with the project's own
alert rules (their `for:` shortened in a copy). In one run, in order:

- the rate limit holds for the whole service, through the balancer;
- a picture answered by one replica is a cache hit on the other;
- the drift alert and the refused-uploads alert fire in Prometheus from real traffic;
- a rolling restart under steady load loses no request;
- Redis stopped: every request is still answered, one log line per part and replica, counted.

`make test` runs it with 2 replicas and 4 clients; other shapes: SCALE_OUT_REPLICAS=3
SCALE_OUT_CLIENTS=8 python -m pytest tests/http/test_scale_out.py
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtest.servers import serve
from tests.cluster import (
    Prometheus,
    RedisServer,
    Replicas,
    nginx,
    prometheus,
    redis_server,
    replicas,
    shortened_rules,
    wait_for,
)
from tests.figures import measured
from tests.http.responses import metric_value
from tests.pictures import encode

REPLICAS = int(os.environ.get("SCALE_OUT_REPLICAS", "2"))
CLIENTS = int(os.environ.get("SCALE_OUT_CLIENTS", "4"))  # threads of load in every step
ATTEMPTS = 120  # the attacker's, over all its threads
LIMIT, WINDOW_S = 40, 30  # RATE_LIMIT per client; the attack lasts well inside one window
# The steady traffic comes from many clients, each well under the limit.
TOKENS = [f"scale-out-client-{i:03d}" for i in range(128)]
ATTACKER = "scale-out-attacker"
DRIFT_WINDOW = 20
FOR_S = 5  # every alert's `for:`, for this test only
ALERTS = ("ImageClassifierDrift", "ImageClassifierRefusedUploads")


@dataclass
class Cluster:
    balancer: str
    replicas: Replicas
    prometheus: Prometheus
    redis: RedisServer


@pytest.fixture(scope="module")
def cluster(trained_store, artifacts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("scale-out")
    for part in ("redis", "nginx", "prometheus"):
        (directory / part).mkdir()
    with redis_server(directory / "redis") as redis:
        env = {
            "REDIS_URL": redis.url,
            "RATE_LIMIT": f"{LIMIT}/{WINDOW_S} seconds",
            "API_TOKENS": ",".join([*TOKENS, ATTACKER]),
            "CACHE_SIZE": "1024",
            "DRIFT_WINDOW": str(DRIFT_WINDOW),
            "WORKERS": "1",
        }
        with replicas(trained_store, artifacts, env, count=REPLICAS) as group:
            rules = shortened_rules(directory / "alerts.yml", FOR_S)
            with (
                nginx(directory / "nginx", group.ports) as balancer,
                prometheus(directory / "prometheus", group.ports, rules) as prom,
            ):
                yield Cluster(balancer, group, prom, redis)


_clients = itertools.cycle(TOKENS)


def post(url: str, data: bytes, token: str | None = None) -> httpx.Response:
    """One /analyze from `token`, else from the next of the many steady clients."""
    headers = {"Authorization": f"Bearer {token or next(_clients)}"}
    files = {"image": ("picture.png", data, "image/png")}
    return httpx.post(f"{url}/analyze", files=files, headers=headers, timeout=60)


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def shared_hits(url: str) -> float:
    return metric_value(scrape(url), "image_classifier_shared_cache_hits_total")


def noise_pictures(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
        for _ in range(count)
    ]


def test_the_rate_limit_holds_for_all_replicas_through_the_balancer(cluster, heldout):
    picture = encode(heldout[0][0], "PNG")
    started = time.monotonic()

    def attack(_: int) -> list[httpx.Response]:
        # Over in a few seconds: inside one window.
        return [post(cluster.balancer, picture, token=ATTACKER) for _ in range(ATTEMPTS // CLIENTS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        responses = [r for answered in pool.map(attack, range(CLIENTS)) for r in answered]
    elapsed = time.monotonic() - started
    statuses = Counter(response.status_code for response in responses)
    upstreams = Counter(response.headers["x-upstream"] for response in responses)
    assert elapsed < WINDOW_S, "the attack outlasted the window: the count below means nothing"
    assert set(statuses) == {200, 429}, statuses
    assert len(upstreams) == REPLICAS, upstreams  # every replica took part
    accepted = statuses[200]
    assert accepted == LIMIT, f"{accepted} let in for a limit of {LIMIT} (per replica: x{REPLICAS})"
    measured(
        f"scale-out: RATE_LIMIT {LIMIT}/{WINDOW_S} s for one client, {sum(statuses.values())} "
        f"requests in {elapsed:.1f} s through nginx to {REPLICAS} replicas: {accepted} let in "
        f"({accepted / LIMIT - 1:+.1%} vs configured; per-replica counting would allow "
        f"{LIMIT * REPLICAS})",
        doc="operations",
    )


def test_a_picture_answered_by_one_replica_is_a_cache_hit_on_the_other(cluster, heldout):
    first, *others = cluster.replicas.urls
    pictures = [encode(image, "PNG") for image, _ in heldout[100:120]]
    before = [shared_hits(url) for url in others]
    for data in pictures:
        answered = post(first, data)
        assert answered.status_code == 200 and answered.json()["cached"] is False
        for url in others:
            again = post(url, data)
            assert again.status_code == 200 and again.json()["cached"] is True, again.text
            assert again.json()["prediction"] == answered.json()["prediction"]
    after = [shared_hits(url) for url in others]
    hits = [b - a for a, b in zip(before, after, strict=True)]
    assert hits == [len(pictures)] * len(others), hits
    measured(
        f"scale-out: {len(pictures)} pictures answered by replica 1 were cache hits on each other "
        f"replica ({sum(hits):.0f} Redis hits, image_classifier_shared_cache_hits_total)",
        doc="operations",
    )


def test_a_replica_with_a_stricter_pixel_cap_takes_no_answer_from_the_others(
    cluster, trained_store, artifacts, heldout
):
    """The shared cache was keyed by the model's tag alone: a replica that refuses a picture (its
    own pixel cap, formats, or other weights under the same tag) answered it from Redis once
    another replica had (found by a black-box review). The key now has the classifier's
    fingerprint, which those settings and the model's files change."""
    data = encode(heldout[130][0], "PNG")
    assert post(cluster.replicas.urls[0], data).status_code == 200
    env = {"REDIS_URL": cluster.redis.url, "CACHE_SIZE": "1024", "MAX_IMAGE_PIXELS": "1000",
           "WORKERS": "1"}  # fmt: skip
    with serve(trained_store, artifacts / "server-strict-replica.log", env=env) as strict:
        refused = post(strict.url, data, token=TOKENS[0])
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "IMAGE_TOO_LARGE"


def test_drift_and_refused_uploads_alerts_fire_in_prometheus(cluster):
    assert wait_for(lambda: cluster.prometheus.targets_up() == REPLICAS, "targets up") is True
    assert not set(ALERTS) & set(cluster.prometheus.alerts()), "fired before the traffic"
    started = time.monotonic()
    pictures = noise_pictures(3 * DRIFT_WINDOW * REPLICAS, seed=16)
    bad = [b"not an image at all", encode(Image.new("L", (32, 32)), "PNG")[:40]]  # 415, 422
    refused = Counter()
    for i, data in enumerate(pictures):
        assert post(cluster.balancer, data).status_code == 200
        if i % 2:
            response = post(cluster.balancer, bad[i % 4 // 2])
            refused[response.status_code] += 1
    assert set(refused) == {415, 422}, refused
    fired = {}

    def firing() -> bool:
        states = cluster.prometheus.alerts()
        for name in ALERTS:
            if states.get(name) == "firing":
                fired.setdefault(name, time.monotonic() - started)
        return len(fired) == len(ALERTS)

    wait_for(firing, f"{ALERTS} firing", timeout=120, every=0.5)
    states = cluster.prometheus.alerts()
    assert states.get("ImageClassifierHighErrorRate") is None, states  # 4xx are not 5xx
    measured(
        f"scale-out: alerts firing in Prometheus (`for:` cut to {FOR_S} s, 1 s scrapes) after "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in sorted(fired.items()))
        + f" from the first of {len(pictures)} noise pictures and {sum(refused.values())} bad "
        "uploads through nginx",
        doc="operations",
    )


def test_a_rolling_restart_under_steady_load_loses_no_request(cluster, heldout):
    pictures = [encode(image, "PNG") for image, _ in heldout[200:400]]
    done = threading.Event()
    outcomes: list[tuple[object, str]] = []  # (status or exception name, replicas that answered)

    def steady_client(first: int) -> None:
        deadline = time.monotonic() + 300  # bounded even if the restarts hang
        for i in itertools.count(first, CLIENTS):
            if done.is_set() or time.monotonic() > deadline:
                return
            try:
                response = post(cluster.balancer, pictures[i % len(pictures)])
                outcomes.append((response.status_code, response.headers.get("x-upstream", "")))
            except httpx.HTTPError as error:
                outcomes.append((type(error).__name__, ""))
            time.sleep(0.05)

    restarts = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(steady_client, k) for k in range(CLIENTS)]
        try:
            time.sleep(2)
            for index in range(cluster.replicas.count):  # one at a time, each back before the next
                began = time.monotonic()
                cluster.replicas.stop(index)  # SIGTERM: drain, then exit
                cluster.replicas.start(index)  # same port; returns once /readyz is 200
                restarts.append(time.monotonic() - began)
                time.sleep(3)  # nginx's fail_timeout (2 s) passes: it sends there again
        finally:
            done.set()
            for client in clients:
                client.result()
    statuses = Counter(status for status, _ in outcomes)
    failed = len(outcomes) - statuses[200]
    retried = sum("," in upstreams for _, upstreams in outcomes)
    assert len(outcomes) > 100, statuses
    assert failed == 0, f"{failed} of {len(outcomes)} failed: {statuses}"
    measured(
        f"scale-out: rolling restart of {cluster.replicas.count} replicas (SIGTERM, start, ready; "
        f"{', '.join(f'{s:.1f} s' for s in restarts)}) under {CLIENTS} steady clients: "
        f"{len(outcomes)} requests through nginx, {failed} failed, {retried} retried by nginx on "
        "another replica",
        doc="operations",
    )


def test_redis_down_every_request_is_still_answered_and_logged_once(cluster):
    from image_classifier.serving.shared_state import RETRY_AFTER_S

    urls = cluster.replicas.urls
    part_errors = 'image_classifier_shared_state_errors_total{{part="{}"}}'
    before = {(u, p): metric_value(scrape(u), part_errors.format(p)) for u in urls for p in PARTS}
    cluster.redis.stop()
    began = time.monotonic()
    statuses = Counter(post(cluster.balancer, data).status_code for data in noise_pictures(20, 99))
    elapsed = time.monotonic() - began
    assert statuses == {200: 20}, statuses
    counted = []
    for server in cluster.replicas.servers:
        log = server.log()
        for part, words in PARTS.items():
            errors = metric_value(scrape(server.url), part_errors.format(part))
            errors -= before[(server.url, part)]
            assert 1 <= errors <= 1 + elapsed / RETRY_AFTER_S, (part, errors)
            counted.append(errors)
            assert log.count(f"Redis unreachable for the {words}") == 1, (server.url, part)
    measured(
        f"scale-out: Redis stopped: 20 requests through nginx all answered 200; on each replica "
        f"one log line per part, {sum(counted):.0f} failed Redis calls counted in all",
        doc="operations",
    )


PARTS = {"rate_limit": "rate limit", "cache": "cache"}
