"""Overload and soak against a real server: goodput, honest refusals, bounded latency, no leak.

Figures are printed (run with -s) for docs/security.md. Assertions are on behaviour and on ratios
measured in the same run (goodput against the capacity just measured), not on absolute speed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import httpx
import psutil
import pytest

from image_classifier.serving.settings import Settings
from loadtest.h2load import H2loadRun, h2load
from loadtest.load import Outcome, closed_loops, percentile, post_image, raw_multipart
from loadtest.servers import serve
from tests.figures import measured
from tests.http.responses import access_lines, assert_no_traceback, metric_value
from tests.pictures import encode

MAX_CONCURRENCY = Settings.max_concurrency  # the default: what a user's server refuses at
OVERLOAD_CONNECTIONS = 512  # clients arriving at 4x capacity between them
SAMPLING_CLIENTS = 32  # honouring Retry-After, each on a connection of its own, meanwhile
RETRY_AFTER_S = 1  # what a refusal says
REFUSAL_P99_TARGET_S = 0.020  # issue 13's; reported, not asserted: a timing on shared cores


@pytest.fixture(scope="module")
def digit_png(heldout) -> bytes:
    return encode(heldout[0][0], "PNG")


def test_goodput_holds_at_four_times_capacity_and_when_refused_clients_retry_at_once(
    trained_store, artifacts, digit_png
):
    """Capacity first (16 closed-loop connections), then 4x that as arrivals on 512 connections
    whatever the answers, then the same 16 connections, then 512 connections that send again the
    moment they are answered (refused clients retrying at once), then capacity again. Load from
    h2load: a Python client would spend more of the two shared cores than the server it
    overloads. Capacity is the mean of the runs before and after: the shared machine's speed
    drifts over a minute (a clean-clone run once measured every phase after the first 30 %
    slower, its server CPU per answer twice a quiet run's), and one run read that drift as the
    service's.

    The accepted latency bound: in each worker at most MAX_CONCURRENCY requests are in work and
    as many wait for a slot (admission.py), and they leave at that worker's rate (its share of
    the answers, from the access log, times the served rate), so an accepted request waits at most
    2 * MAX_CONCURRENCY / (served * the smallest share) seconds, plus its own time at capacity
    (that point's p99), plus the time its worker's event loop, busy with hundreds of connections,
    takes to read its head: what a refusal took (the sampled refusals' p99: they do no other work).
    Goodput is asserted as a ratio to the capacity measured in the same run; the refusals'
    latency is reported against its target, not asserted (an absolute timing on shared cores)."""
    body, content_type = raw_multipart([("image", "digit.png", "image/png", digit_png)])
    with serve(trained_store, artifacts / "server-overload.log") as server:
        url = f"{server.url}/analyze"

        cores: dict[str, str] = {}  # per phase: who used the machine's cores

        def load(
            connections: int, seconds: float, rate: float = 0, phase: str = ""
        ) -> tuple[H2loadRun, float]:
            cpu, machine = _tree_cpu_seconds(server.process.pid), _Machine()
            run = h2load(url, body, content_type, connections=connections, seconds=seconds,
                         rate_per_connection=rate)  # fmt: skip
            server_cpu = _tree_cpu_seconds(server.process.pid) - cpu
            if phase:
                cores[phase] = machine.cores_used(run, server_cpu)
            return run, server_cpu

        workers = httpx.get(f"{server.url}/info", timeout=10).json()["sizing"]["workers"]
        load(16, 3)  # warm-up
        at_capacity, capacity_cpu = load(16, 10, phase="capacity")
        assert at_capacity.rate(200) > 0 and at_capacity.unanswered == 0, at_capacity.outcomes[:5]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            connected = threading.Event()
            sampled = pool.submit(_sample_answers, url, digit_png, 15, connected)
            assert connected.wait(30), sampled.exception(0) if sampled.done() else "no connection"
            rate = 4 * at_capacity.rate(200) / OVERLOAD_CONNECTIONS
            overload, overload_cpu = load(OVERLOAD_CONNECTIONS, 20, rate, "4x")
            per_client, loop_timers = sampled.result()
        time.sleep(1)  # the work accepted during the burst (up to 2 * MAX_CONCURRENCY) finishes
        # As long as the runs it is judged against: 5 s once read noise.
        after, _ = load(16, 10, phase="after the burst")
        storm, _ = load(OVERLOAD_CONNECTIONS, 15, phase="retrying at once")
        time.sleep(1)  # as after the burst: what the storm let in finishes
        at_capacity_again, _ = load(16, 10, phase="capacity again")
        log = server.log()

    capacity = (at_capacity.rate(200) + at_capacity_again.rate(200)) / 2
    # "Back to normal" right after the burst is judged against the slower of the two undisturbed
    # runs that bracket it, not their mean: a clean-clone run measured 1721 before and 1267 after,
    # and the burst's aftermath in between 1187. A burst that left damage shows as refusals there.
    # The aftermath is measured over the same 10 s as they are: over 5 s a clean-clone run read
    # 690.2 against a bound of 690.4, and 939 in the undisturbed run after it.
    normal = min(at_capacity.rate(200), at_capacity_again.rate(200))

    served, offered = overload.rate(200), overload.rate()
    samples = [sampled.outcome for answers in per_client for sampled in answers]
    refusals = [o for o in samples if o.status == 503]
    slowest = sorted(
        (s for answers in per_client for s in answers if s.outcome.status == 503),
        key=lambda s: -s.outcome.seconds,
    )[:3]
    sampling_began = min(o.started for o in samples)
    refusal_seconds = [o.seconds for o in refusals]
    refusal_p99 = percentile(refusal_seconds, 0.99)
    accepted = [o.seconds for o in samples if o.status == 200]
    capacity_p99 = percentile([o.seconds for o in at_capacity.outcomes], 0.99)
    answered_by = Counter(line["component"] for line in access_lines(log) if line["status"] == 200)
    assert len(answered_by) == workers, answered_by  # every worker served
    smallest_share = min(answered_by.values()) / sum(answered_by.values())
    loop_lag = refusal_p99
    accepted_bound = 2 * MAX_CONCURRENCY / (served * smallest_share) + capacity_p99 + loop_lag
    h2load_view = {
        status: percentile([o.seconds for o in overload.outcomes if o.status == status], 0.99)
        for status in (200, 503)
    }
    measured(
        f"overload (h2load, digit model, {workers} worker(s), MAX_CONCURRENCY {MAX_CONCURRENCY}): "
        f"capacity "
        f"{capacity:.1f} req/s on 16 connections (before {at_capacity.rate(200):.1f}, after "
        f"{at_capacity_again.rate(200):.1f}); offered {offered:.1f} req/s on "
        f"{OVERLOAD_CONNECTIONS} connections for 20 s: served {served:.1f} req/s "
        f"({served / capacity:.0%} of capacity; target >= 70%), {overload.rate(503):.0f} "
        f"refusals/s; {SAMPLING_CLIENTS} clients honouring Retry-After meanwhile: "
        f"{len(refusals)} refused, p50 {percentile(refusal_seconds, 0.5) * 1000:.1f} ms, p90 "
        f"{percentile(refusal_seconds, 0.9) * 1000:.1f} ms, p99 "
        f"{refusal_p99 * 1000:.1f} ms (target < 20 ms: "
        f"{'met' if refusal_p99 < REFUSAL_P99_TARGET_S else 'not met'}; the slowest: "
        + ", ".join(
            f"{s.outcome.seconds * 1000:.1f} ms {s.outcome.started - sampling_began:.1f} s in"
            + (" on a new connection" if s.new_connection else "")
            for s in slowest
        )
        + f"; {sum(s.new_connection for a in per_client for s in a)} sampled requests opened a "
        f"connection; meanwhile the workers' event loops ran {loop_timers[1]:.0f} of "
        f"{loop_timers[0]:.0f} timers more than 25 ms late), "
        f"{len(accepted)} accepted, max "
        f"{max(accepted, default=0) * 1000:.0f} ms (bound {accepted_bound * 1000:.0f} ms); "
        f"p99 as h2load saw them (with its own queueing per connection): accepted "
        f"{h2load_view[200] * 1000:.0f} ms, refused {h2load_view[503] * 1000:.0f} ms; server "
        f"CPU per answer at capacity {capacity_cpu / len(at_capacity.outcomes) * 1e6:.0f} us, "
        f"per request under overload {overload_cpu / len(overload.outcomes) * 1e6:.0f} us; "
        f"h2load's own CPU {overload.client_cpu_seconds / overload.seconds:.2f} cores"
    )
    measured(
        f"refused clients retrying at once ({OVERLOAD_CONNECTIONS} connections, 15 s): served "
        f"{storm.rate(200):.1f} req/s ({storm.rate(200) / capacity:.0%} of capacity; target "
        f">= 50%), {storm.rate(503):.0f} refusals/s; right after the 4x burst (1 s later): "
        f"{after.rate(200):.1f} req/s ({after.rate(200) / capacity:.0%} of capacity, "
        f"{after.rate(200) / normal:.0%} of the slower undisturbed run)"
    )
    measured(
        "cores used, per phase (the server, h2load, this test process, the rest of the machine, "
        "stolen by the host): " + "; ".join(f"{phase} {used}" for phase, used in cores.items())
    )
    for run in (overload, after, storm, at_capacity_again):
        assert run.unanswered == 0, run.unanswered
        assert {o.status for o in run.outcomes} <= {200, 503}
    assert overload.rate(503) > 0, "4x capacity and not one refusal"
    assert served >= 0.7 * capacity, (served, capacity)
    assert after.rate(200) >= 0.8 * normal and after.rate(503) == 0, (after.rate(200), normal)
    assert storm.rate(200) >= 0.5 * capacity, (storm.rate(200), capacity)
    assert len(refusals) >= 20, samples[:5]
    for refusal in refusals:
        assert refusal.code == "OVERLOADED" and refusal.retry_after == str(RETRY_AFTER_S), refusal
    assert {o.status for o in samples} <= {200, 503}, samples
    assert max(accepted, default=0) <= accepted_bound, (accepted_bound, max(accepted))
    assert "refused at their headers" in log
    assert_no_traceback(log)


@dataclass(frozen=True)
class Sampled:
    outcome: Outcome
    new_connection: bool  # the request opened a connection (the server closed the last one)


def _sample_answers(
    url: str, image: bytes, seconds: float, connected: threading.Event
) -> tuple[list[list[Sampled]], tuple[float, float]]:
    """Clients that honour Retry-After, each on its own connection, while h2load overloads:
    the refusals' headers and envelope, which h2load does not keep, and the server's latencies
    as such a client sees them (h2load's include the time a request waits behind the one before
    it on its connection). Not one shared pool: it would hand a client a connection just refused
    for another, which the server does not read for half the Retry-After (`http/protocol.py`).

    Each client connects and sends one request before the burst (`connected` says when): a
    client's first request in this process, which shares the two cores with the server and
    h2load, took aiohttp's own set-up with it, ~60 ms at the p99 where the same first request
    from a bare socket client was refused in 1-16 ms, connection included (measured by hand),
    and the refusal figure was then the client's. A connection the server closes (its
    connection balance) is opened again within the sampling, and counts. Also returns how many
    timers the workers' event loops ran during the sampling, and how many of them late (/metrics):
    whether a slow refusal was the server's loop.

    The clients start spread over one Retry-After, as independent clients would be: started
    together and refused together, they stayed in step, and each round left this one process as
    many requests at once, the last waiting for the others to be sent and read (in five hand runs
    the three slowest refusals, 43-150 ms, were all of one round, most often the first, while
    the workers' event loops showed no stall then)."""

    opened: set[int] = set()  # sessions that opened a connection since their last request
    trace = aiohttp.TraceConfig()

    async def on_connection(session, _context, _params) -> None:  # noqa: ANN001 - aiohttp's
        opened.add(id(session))

    trace.on_connection_create_end.append(on_connection)

    async def client_loop(
        session: aiohttp.ClientSession, starts_after: float, deadline: float
    ) -> list[Sampled]:
        await asyncio.sleep(starts_after)
        answers = []
        while time.monotonic() < deadline:
            opened.discard(id(session))
            answer = await post_image(session, url, image)
            answers.append(Sampled(answer, id(session) in opened))
            await asyncio.sleep(float(answer.retry_after or 0.05))
        return answers

    async def late_loop_timers(session: aiohttp.ClientSession) -> tuple[float, float]:
        async with session.get(url.rsplit("/", 1)[0] + "/metrics") as response:
            text = await response.text()
        count = metric_value(text, "image_classifier_event_loop_lag_seconds_count")
        in_time = metric_value(text, 'image_classifier_event_loop_lag_seconds_bucket{le="0.025"}')
        return count, count - in_time

    async def sample() -> tuple[list[list[Sampled]], tuple[float, float]]:
        sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1),
                timeout=aiohttp.ClientTimeout(total=30),
                trace_configs=[trace],
            )
            for _ in range(SAMPLING_CLIENTS)
        ]
        try:
            warm = await asyncio.gather(*(post_image(session, url, image) for session in sessions))
            assert all(answer.status == 200 for answer in warm), warm
            connected.set()
            await asyncio.sleep(1)  # h2load has started
            deadline = time.monotonic() + seconds
            spread = RETRY_AFTER_S / SAMPLING_CLIENTS
            before = await late_loop_timers(sessions[0])
            answers = await asyncio.gather(
                *(client_loop(s, i * spread, deadline) for i, s in enumerate(sessions))
            )
            after = await late_loop_timers(sessions[0])
            return answers, (after[0] - before[0], after[1] - before[1])
        finally:
            await asyncio.gather(*(session.close() for session in sessions))

    # This process has run every test before this one: a full collection of its heap would stall
    # the samplers' loop and add to the requests in flight. Frozen, collections skip that heap.
    # (A clean-clone run saw an accepted request take 1.1 s where the server's own log said
    # 0.64 s at most; its cause was not found.)
    gc.collect()
    gc.freeze()
    try:
        return asyncio.run(sample())
    finally:
        gc.unfreeze()


class _Machine:
    """The whole machine's CPU from now on, to tell a server slowed by others from a slow one:
    a clean-clone run measured goodput 64 % of capacity, and the phase after the burst 62 %,
    while the same code measured 90-98 % by hand."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.machine, self.test = psutil.cpu_times(), psutil.Process().cpu_times()

    def cores_used(self, run: H2loadRun, server_cpu: float) -> str:
        seconds = time.monotonic() - self.started
        machine, test = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = sum(machine) - sum(self.machine) - (machine.idle - self.machine.idle)
        busy -= (machine.iowait - self.machine.iowait) + (machine.steal - self.machine.steal)
        mine = test.user + test.system - self.test.user - self.test.system
        rest = busy - server_cpu - run.client_cpu_seconds - mine
        stolen = machine.steal - self.machine.steal
        shares = (server_cpu, run.client_cpu_seconds, mine, rest, stolen)
        return "/".join(f"{share / seconds:.2f}" for share in shares)


def _tree_cpu_seconds(pid: int) -> float:
    """CPU time of the server and its workers so far."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


@pytest.mark.parametrize(
    "seconds", [60, pytest.param(600, marks=pytest.mark.slow, id="10min")], ids=str
)
def test_soak_memory_stays_flat(trained_store, artifacts, heldout, seconds):
    images = [encode(image, "PNG") for image, _ in heldout[:50]]
    with serve(trained_store, artifacts / f"server-soak-{seconds}.log") as server:
        url = f"{server.url}/analyze"
        asyncio.run(_rotate(url, images, seconds=10))  # warm-up: allocator and caches settle
        before = _tree_rss(server.process.pid)
        started = time.monotonic()
        outcomes = asyncio.run(_rotate(url, images, seconds=seconds))
        after = _tree_rss(server.process.pid)
    growth = (after - before) / before
    measured(
        f"\nsoak {seconds} s: {len(outcomes)} requests in {time.monotonic() - started:.0f} s, "
        f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth:+.2%})"
    )
    assert all(o.status == 200 for o in outcomes), [o for o in outcomes if o.status != 200][:5]
    assert growth < 0.05


async def _rotate(url: str, images: list[bytes], seconds: float) -> list:
    """Four clients cycling through different images (so nothing is a lucky repeat)."""
    results = await asyncio.gather(
        *(
            closed_loops(url, image, concurrency=1, seconds=seconds)
            for image in (images[i::4][0] for i in range(4))
        )
    )
    return [o for group in results for o in group]


def _tree_rss(pid: int) -> int:
    """RSS of the server and its workers (the whole process tree)."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
