"""One run: the machine's limit, the service and its peers, on the same images.

    .venv/bin/python -m loadtest.benchmark --model mobilenetv2-bench:v1 \
        --int8 mobilenetv2-bench-int8:v1 --seconds 20 --profile

(a) the in-process limit: decode + preprocess + ONNX Runtime (`Classifier.prepare`/`run`) at
    its best batch size and thread setting, on the very image the HTTP clients send (and the INT8
    variant's own limit); (b) the service (`bentoml serve`) over HTTP: /analyze at concurrency
    1/4/16/32, /analyze_batch, phone photos, and where each request's time went (the stage
    histograms of /metrics); (c) the peers on the same images: the tutorial FastAPI server,
    the expert's FastAPI `def` server (both loadtest/baseline_app.py) and LitServe
    (loadtest/litserve_app.py);
    (b') the same service over the Open Inference Protocol at 16 clients, as Triton's clients call
    it: HTTP with binary tensor data, and gRPC (tritonclient.grpc.aio), the same image, each run
    in two halves interleaved with /analyze's and the in-process limit's (`interleaved`);
    (d) the service with WORKERS=1 (one process: what one worker per CPU gains) and with
    BATCHING=0; each worker's share of the CPU at c=16 says how evenly the kernel spread the
    connections; (e) the duplicate-input cache (CACHE_SIZE on, the
    same picture every time: all hits but the first) and the cost of its key; (f) with --int8, the
    service serving the INT8 variant.
    The two sides of every target ratio run interleaved (`interleaved`): the machine's speed
    drifts over the minutes of a run.
    Images: generated photo-like 640x480 and 4032x3024 JPEGs. Prints a table, writes
    docs/benchmarks.json and docs/benchmarks.md with the commit it ran on.

The load generator is loadtest/load.py's aiohttp closed loop, in this process: its CPU is reported
(client and server share the machine's cores). `--quick` is a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import bentoml
import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from image_classifier.core.classifier import Classifier
from image_classifier.serving.cache import PredictionCache
from image_classifier.serving.settings import Settings
from loadtest.load import Outcome, closed_loops, percentile, repeat, throughput
from loadtest.servers import BIN, REPO, free_port, serve, stop, wait_until_ready, worker_pids
from training_export.photos import PHOTO_640, PHOTO_PHONE, photo_jpeg

CONCURRENCIES = (1, 4, 16, 32)
BATCH_IMAGES = 8  # images per /analyze_batch request
# Issue 12's targets (issue 4's kept), for the MobileNetV2-class model on 2 cores, 640x480 JPEGs,
# 16 clients unless the name says otherwise. "baseline" is the tutorial server.
TARGETS = {
    "service_over_limit": (">=", 0.85),
    "int8_service_over_int8_limit": (">=", 0.80),
    "service_over_baseline_640": (">=", 1.5),
    "service_over_expert_baseline": (">=", 1.0),
    "service_over_litserve": (">=", 1.0),
    "p99_over_litserve": ("<=", 1.0),
    "int8_served_over_fp32_served": (">=", 1.6),
    "p50_c1_over_baseline": ("<=", 1.0),
    "p99_over_baseline": ("<=", 1.0),
    "service_over_limit_phone": (">=", 0.80),
    "service_over_baseline_phone": (">=", 3.0),
    "int8_over_fp32": (">=", 2.0),
    "cold_start_s": ("<=", 5.0),
    "rss_mb_per_worker": ("<=", 300.0),
    # Issue 14: Open Inference over HTTP (binary) and gRPC, not slower than /analyze.
    "oip_http_over_analyze": (">=", 1.0),
    "oip_grpc_over_analyze": (">=", 1.0),
}
ONE_PER_RUN = "one image per run"  # the limit's best threads at batch 1: unmerged model runs
BESIDE_OIP = "service /analyze, beside OIP"  # /analyze run side by side with the OIP points
T = TypeVar("T")
STAGES = ("body_receive", "preprocess", "queue_wait", "inference", "respond")


# --- (a) in process -----------------------------------------------------------------------------


def in_process_rate(
    model_dir: Path, images: list[bytes], *, loops: int, ort_threads: int, batch: int,
    seconds: float,
) -> dict:  # fmt: skip
    """`loops` threads, each with its own Classifier, preparing and predicting `batch` at a time."""
    settings = Settings.from_env({"ORT_INTRA_OP_THREADS": str(ort_threads)})
    classifiers = [Classifier(model_dir, settings.classifier_options()) for _ in range(loops)]
    for classifier in classifiers:
        classifier.warm_up()
    done = [0] * loops
    cpu = psutil.Process().cpu_times()
    deadline = time.monotonic() + seconds

    def work(index: int) -> None:
        classifier, n = classifiers[index], index
        while time.monotonic() < deadline:
            batch_bytes = [images[(n + i) % len(images)] for i in range(batch)]
            classifier.run([classifier.prepare(data) for data in batch_bytes])
            done[index] += batch
            n += batch

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(loops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    after = psutil.Process().cpu_times()
    return {
        "setting": f"{loops} thread(s) x {ort_threads}-thread ORT, batch {batch}",
        "loops": loops,
        "ort_threads": ort_threads,
        "batch": batch,
        "img_s": round(sum(done) / wall, 1),
        "cpu_cores": round((after.user + after.system - cpu.user - cpu.system) / wall, 2),
    }


def in_process_limit(model_dir: Path, images: list[bytes], seconds: float, batches) -> dict:
    settings = [(2, 1), (1, 2)]  # two 1-thread sessions in parallel; one 2-thread session
    rows = [
        in_process_rate(model_dir, images, loops=loops, ort_threads=ort, batch=b, seconds=seconds)
        for loops, ort in settings
        for b in batches
    ]
    return {"best": max(rows, key=lambda r: r["img_s"]), "tried": rows}


def limit_beside(model_dir: Path, images: list[bytes], best: dict) -> Callable[[float], dict]:
    """The limit's best setting, to be measured again for a while beside a point it is compared
    with (`interleaved`)."""
    return lambda seconds: in_process_rate(
        model_dir, images, loops=best["loops"], ort_threads=best["ort_threads"],
        batch=best["batch"], seconds=seconds,
    )  # fmt: skip


def merged_limit(halves: list[dict]) -> dict:
    """One limit from runs of equal length: their mean rate."""
    return {
        "setting": halves[0]["setting"],
        "img_s": round(sum(h["img_s"] for h in halves) / len(halves), 1),
        "cpu_cores": round(sum(h["cpu_cores"] for h in halves) / len(halves), 2),
        "halves": [h["img_s"] for h in halves],
    }


def model_only_rate(model_dir: Path, seconds: float) -> float:
    """ONNX Runtime alone, two 1-thread sessions in parallel at batch 1 (int8 vs fp32)."""
    settings = Settings.from_env({"ORT_INTRA_OP_THREADS": "1"})
    models = [Classifier(model_dir, settings.classifier_options()) for _ in range(2)]
    tensor = np.zeros(models[0].card.preprocessing.tensor_shape, np.float32)
    done = [0, 0]
    deadline = time.monotonic() + seconds

    def work(index: int) -> None:
        while time.monotonic() < deadline:
            models[index].run([tensor])
            done[index] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


# --- (b, c, d) over HTTP ------------------------------------------------------------------------


def key_cost_ms(pictures: list[bytes], rounds: int = 50) -> float:
    """What every /analyze pays for the cache when it is on: the SHA-256 of the upload."""
    started = time.perf_counter()
    for _ in range(rounds):
        for data in pictures:
            PredictionCache.key(data, "v1", 3)
    return round((time.perf_counter() - started) * 1000 / (rounds * len(pictures)), 3)


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds so far of every process in the server's tree, by pid."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's workers by role: each worker's main thread (its event
    loop: HTTP, admission, routing, answers, logs) and the rest of the process (decoding and model
    threads, counted from the process's total, so that threads which have ended still count)."""
    seconds = {"event_loops": 0.0, "threads": 0.0}
    for worker in worker_pids(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(worker)
            times = process.cpu_times()
            loop = sum(t.user_time + t.system_time for t in process.threads() if t.id == worker)
            seconds["event_loops"] += loop
            seconds["threads"] += times.user + times.system - loop
    return seconds


def cpu_ms_per_image(spent_seconds: dict[str, float], images: int) -> dict[str, float]:
    """What each role of the workers' threads spent per image answered (`thread_cpu_seconds`)."""
    spent = {role: round(cpu * 1000 / images, 2) for role, cpu in spent_seconds.items()}
    return {**spent, "total": round(sum(spent.values()), 2)}


def worker_rss_mb(pid: int) -> float:
    """The largest process in the server's tree: the worker holding the model."""
    root = psutil.Process(pid)
    sizes = []
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            sizes.append(process.memory_info().rss)
    return round(max(sizes) / 2**20, 1)


def open_inference_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    """One encoded image in Triton's binary form, outputs binary: tritonclient.http's default."""
    header = json.dumps({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(image) + 4}}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    headers = {"inference-header-content-length": str(len(header)),
               "content-type": "application/octet-stream"}  # fmt: skip
    return header + len(image).to_bytes(4, "little") + image, headers


async def grpc_loops(
    target: str, model: str, image: bytes, concurrency: int, seconds: float
) -> list[Outcome]:
    """Closed loops of tritonclient.grpc.aio ModelInfer calls (one channel, as its users do)."""
    import tritonclient.grpc.aio as grpc_client  # the loadtest extra only
    from tritonclient.utils import InferenceServerException

    client = grpc_client.InferenceServerClient(target)
    tensor = grpc_client.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=object))

    async def send() -> Outcome:
        started = time.monotonic()
        try:
            await client.infer(model, [tensor])
        except InferenceServerException as exc:
            return Outcome(started, time.monotonic() - started, None, failure=str(exc.status()))
        return Outcome(started, time.monotonic() - started, 200)

    try:
        return await repeat(send, concurrency=concurrency, seconds=seconds)
    finally:
        await client.close()


@dataclass
class Segment:
    """One closed-loop run's outcomes and the CPU it took, client and server (by pid), and the
    service workers' CPU by role (`thread_cpu_seconds`; zero for a peer)."""

    outcomes: list[Outcome]
    wall: float
    client_cpu: float
    server_cpu: dict[int, float]
    worker_cpu: dict[str, float]


def run_segment(pid: int, load: Callable[[], Awaitable[list[Outcome]]]) -> Segment:
    client_cpu, server_cpu = psutil.Process().cpu_times(), tree_cpu_seconds(pid)
    worker_cpu = thread_cpu_seconds(pid)
    started = time.monotonic()
    outcomes = asyncio.run(load())
    wall = time.monotonic() - started
    client_after, server_after = psutil.Process().cpu_times(), tree_cpu_seconds(pid)
    return Segment(
        outcomes,
        wall,
        client_after.user + client_after.system - client_cpu.user - client_cpu.system,
        {p: cpu - server_cpu.get(p, 0.0) for p, cpu in server_after.items()},
        {role: cpu - worker_cpu[role] for role, cpu in thread_cpu_seconds(pid).items()},
    )


def summarise(
    system: str, kind: str, concurrency: int, batch: int, segments: list[Segment]
) -> dict:
    """A point from one or more runs of the same load: images per second over the time the runs
    answered, latency percentiles over all their answers, CPU cores over their wall time.

    `worker_cpu_shares`: each busy server process's share of the server's CPU, largest first
    (with several workers, how evenly the kernel spread the keep-alive connections);
    `cpu_ms_per_image` (the service's points): its workers' CPU per image answered, by role."""
    wall = sum(segment.wall for segment in segments)
    used: dict[int, float] = {}
    for segment in segments:
        for process, cpu in segment.server_cpu.items():
            used[process] = used.get(process, 0.0) + cpu
    server_total = sum(used.values())
    answered = sum(sum(o.status == 200 for o in s.outcomes) for s in segments)
    answering_time = sum(
        sum(o.status == 200 for o in s.outcomes) / rate
        for s in segments if (rate := throughput(s.outcomes))
    )  # fmt: skip
    ok = [o.seconds * 1000 for s in segments for o in s.outcomes if o.status == 200]
    requests = sum(len(segment.outcomes) for segment in segments)
    by_role = {role: sum(s.worker_cpu[role] for s in segments) for role in segments[0].worker_cpu}
    images = answered * batch
    split = {"cpu_ms_per_image": cpu_ms_per_image(by_role, images)} if images and any(
        by_role.values()
    ) else {}  # fmt: skip
    return {
        "system": system,
        "images": kind,
        "concurrency": concurrency,
        "batch": batch,
        "img_s": round(answered / answering_time * batch, 1) if answering_time else 0.0,
        "p50_ms": round(percentile(ok, 0.50), 1),
        "p95_ms": round(percentile(ok, 0.95), 1),
        "p99_ms": round(percentile(ok, 0.99), 1),
        "requests": requests,
        "errors": requests - len(ok),
        "server_cpu_cores": round(server_total / wall, 2),
        "client_cpu_cores": round(sum(segment.client_cpu for segment in segments) / wall, 2),
        "worker_cpu_shares": sorted(
            (round(cpu / server_total, 2) for cpu in used.values() if cpu > 0.05 * server_total),
            reverse=True,
        ) if server_total else [],
        **split,
    }  # fmt: skip


def analyze_load(
    url: str, images: list[bytes], concurrency: int, batch: int = 1
) -> Callable[[float], Awaitable[list[Outcome]]]:
    """Closed loops of /analyze (the first image); `batch` > 1 posts that many images per request
    to /analyze_batch. Called with the seconds to run."""
    if batch > 1:
        payload: bytes | list[bytes] = [images[i % len(images)] for i in range(batch)]
        route, options = "/analyze_batch", {"field": "images"}
    else:
        payload, route, options = images[0], "/analyze", {}
    return lambda seconds: closed_loops(
        url + route, payload, concurrency=concurrency, seconds=seconds, content_type="image/jpeg",
        **options,
    )  # fmt: skip


def http_point(
    system: str, url: str, pid: int, images: list[bytes], kind: str, concurrency: int,
    seconds: float, batch: int = 1,
) -> dict:  # fmt: skip
    """One closed-loop run of `analyze_load`."""
    load = analyze_load(url, images, concurrency, batch)
    return summarise(system, kind, concurrency, batch, [run_segment(pid, partial(load, seconds))])


def interleaved(
    measures: dict[str, Callable[[float], T]], seconds: float, middle: Callable[[], object] = tuple
) -> dict[str, list[T]]:
    """Each measure for `seconds` in two halves, in the order A B C, `middle` (the points compared
    with them, when they need a server of their own), C B A: the shared machine's speed drifts
    over minutes, and so a drift weighs alike on both sides of every ratio."""
    runs: dict[str, list[T]] = {name: [] for name in measures}
    for name in measures:
        runs[name].append(measures[name](seconds / 2))
    middle()
    for name in reversed(measures):
        runs[name].append(measures[name](seconds / 2))
    return runs


def segments_of(pid: int, load: Callable[[float], Awaitable[list[Outcome]]]):
    """A closed-loop load as a measure for `interleaved`: seconds -> Segment."""
    return lambda seconds: run_segment(pid, partial(load, seconds))


def histogram_means(metrics_text: str, before: str, names: list[str]) -> dict[str, float]:
    """Mean observation of each named histogram between two /metrics scrapes (every label and
    every worker together); a histogram with no observation meanwhile is left out."""

    def sums(text: str) -> dict[str, float]:
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    after_sums, before_sums = sums(metrics_text), sums(before)

    def delta(name: str) -> float:
        return after_sums.get(name, 0.0) - before_sums.get(name, 0.0)

    return {
        name: delta(f"{name}_sum") / count for name in names if (count := delta(f"{name}_count"))
    }


def stage_means_ms(metrics_text: str, before: str) -> dict[str, float]:
    """Mean time per observation of each request stage between two /metrics scrapes."""
    names = {f"image_classifier_{stage}_seconds": stage for stage in STAGES}
    means = histogram_means(metrics_text, before, list(names))
    return {names[name]: round(mean * 1000, 2) for name, mean in means.items()}


def images_per_run(metrics_text: str, before: str) -> float:
    """How many images the service's model runs took on average between two scrapes."""
    name = "image_classifier_model_run_items"
    return round(histogram_means(metrics_text, before, [name]).get(name, 0.0), 2)


# The peers, each started the way its users start it, on the same model folder.
PEERS = {
    "tutorial": ["uvicorn", "loadtest.baseline_app:app", "--no-access-log"],
    "expert": ["uvicorn", "loadtest.baseline_app:expert_app", "--no-access-log"],
    "litserve": ["python", "-m", "loadtest.litserve_app"],
}


@contextlib.contextmanager
def peer_server(peer: str, model_dir: Path, log_path: Path) -> Iterator[tuple[str, int]]:
    """One of PEERS on a free loopback port: (url, pid)."""
    port = free_port()
    program, *arguments = PEERS[peer]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(BIN / program), *arguments, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env={**os.environ, "MODEL_DIR": str(model_dir)}, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_path, timeout=90)
        yield url, process.pid
    finally:
        stop(process)


def profile_server(pid: int, seconds: float, out: Path, load: Callable[[], object]) -> list[str]:
    """py-spy over the server tree while `load` runs; the top frames by own time."""
    raw = out.with_suffix(".txt")
    spy = subprocess.Popen(
        [str(BIN / "py-spy"), "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
         "--duration", str(int(seconds)), "--rate", "200", "--nonblocking", "-o", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    load()
    spy.wait(seconds + 30)
    return top_frames(raw.read_text()) if raw.exists() else ["(py-spy wrote no profile)"]


def top_frames(collapsed: str, count: int = 15) -> list[str]:
    """Collapsed stacks -> the functions with the most samples on top (own) and anywhere (total)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if "/" in f else f
                  for f in stack.split(";")]  # fmt: skip
        samples += int(n)
        own[frames[-1]] = own.get(frames[-1], 0) + int(n)
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + int(n)
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:count]
    return [
        f"{n / samples:6.1%} own, {total[frame] / samples:6.1%} total  {frame}" for frame, n in rows
    ]


# --- the run ------------------------------------------------------------------------------------


def machine() -> dict:
    model_name = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    return {
        "cpus": psutil.cpu_count(),
        "cpu": model_name,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        **{p: metadata.version(p) for p in ("bentoml", "onnxruntime", "pillow", "fastapi")},
    }


def git_commit() -> str:
    """The commit measured; "+dirty" when the work tree differs from it."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def run(args: argparse.Namespace) -> dict:
    seconds, say = args.seconds, print
    model_dir = Path(bentoml.models.get(args.model).path)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    say("making images ...")
    count = 2 if args.quick else 8
    images = {  # /analyze clients send the first; /analyze_batch sends them all
        "640": [photo_jpeg(PHOTO_640, seed) for seed in range(count)],
        "phone": [photo_jpeg(PHOTO_PHONE, seed) for seed in range(max(2, count // 2))],
    }
    result: dict = {"model": args.model, "int8_model": args.int8, "points": []}
    batches = (1, 4) if args.quick else (1, 4, 8)
    limit_s = max(1.0, seconds / 4)
    result["limit"], result["limit_beside"] = {}, {}
    for kind, pictures in images.items():
        say(f"(a) in-process limit, {kind} ...")
        result["limit"][kind] = in_process_limit(model_dir, pictures[:1], limit_s, batches)
    if args.int8:
        int8_dir = Path(bentoml.models.get(args.int8).path)
        say("(a) in-process limit of the INT8 variant, 640 ...")
        result["limit_int8"] = {
            "640": in_process_limit(int8_dir, images["640"][:1], limit_s, batches)
        }
        # In halves, fp32 INT8 INT8 fp32, as every other ratio: the machine's speed drifts.
        sessions = {"fp32": model_dir, "int8": int8_dir}
        halves = interleaved(
            {kind: partial(model_only_rate, folder) for kind, folder in sessions.items()},
            2 * limit_s,
        )
        fp32, int8 = (sum(halves[kind]) / 2 for kind in ("fp32", "int8"))
        result["model_only_img_s"] = {"fp32": round(fp32, 1), "int8": round(int8, 1)}
        result["int8_over_fp32"] = round(int8 / fp32, 2)

    env = {"MODEL_TAG": args.model, **dict(kv.split("=", 1) for kv in args.env)}
    result["settings"] = {"service": env, "seconds_per_point": seconds}
    logs = Path(tempfile.mkdtemp(prefix="benchmark-logs-"))

    def measure(system: str, url: str, pid: int, kind: str, concurrency: int, batch: int = 1):
        point = http_point(system, url, pid, images[kind], kind, concurrency, seconds, batch)
        return add(point)

    def add(point: dict) -> dict:
        result["points"].append(point)
        say(_row(point))
        return point

    def add_interleaved(runs: dict[str, list], points: dict[str, tuple[str, str, int]]) -> None:
        """What `interleaved` measured: a name in `points` is an HTTP point (system, images,
        clients), any other the in-process limit for those images."""
        for name, halves in runs.items():
            if name in points:
                add(summarise(*points[name], 1, halves))
            else:
                result["limit_beside"][name] = merged_limit(halves)
                say(f"{name}: {result['limit_beside'][name]}")

    def limit_of(
        name: str, limits: dict, folder: Path, batch: int | None = None
    ) -> Callable[[float], dict]:
        """The best setting of `limits` for that kind of image (`batch`: with that batch)."""
        kind = name.split()[0]  # "640 INT8": the INT8 model on the 640 images
        best = limits[kind]["best"]
        return limit_beside(folder, images[kind][:1], {**best, "batch": batch or best["batch"]})

    def warm(url: str, pid: int) -> None:
        http_point("warm-up", url, pid, images["640"], "640", 4, min(2.0, seconds))

    say("(b) the service ...")
    started = time.monotonic()
    with serve(home, logs / "service.log", env=env) as server:
        result["cold_start_s"] = round(time.monotonic() - started, 2)
        url, pid = server.url, server.process.pid
        result["sizing"] = httpx.get(url + "/info").json()["sizing"]
        warm(url, pid)
        for c in CONCURRENCIES:
            before = httpx.get(url + "/metrics").text
            measure("service", url, pid, "640", c)
            if c == 16:
                after = httpx.get(url + "/metrics").text
                result["stages_c16_ms"] = stage_means_ms(after, before)
                result["images_per_run_c16"] = images_per_run(after, before)
                say(f"where a request's time went at c=16 (mean ms): {result['stages_c16_ms']}")
        say("(b') /analyze at c=16 interleaved with Open Inference (HTTP binary, gRPC) and with "
            "the in-process limit ...")  # fmt: skip
        model_name = args.model.split(":")[0]
        image, (body, headers) = images["640"][0], open_inference_body(images["640"][0])
        infer_url = f"{url}/v2/models/{model_name}/infer"
        add_interleaved(interleaved({
            BESIDE_OIP: segments_of(pid, analyze_load(url, images["640"], 16)),
            "service OIP-HTTP": segments_of(pid, lambda s: closed_loops(
                infer_url, body, concurrency=16, seconds=s, raw_headers=headers)),
            "service OIP-gRPC": segments_of(pid, lambda s: grpc_loops(
                server.grpc_target, model_name, image, 16, s)),
            "640": limit_of("640", result["limit"], model_dir),
            f"640 {ONE_PER_RUN}": limit_of("640", result["limit"], model_dir, batch=1),
        }, seconds), {name: (name, "640", 16) for name in (BESIDE_OIP, "service OIP-HTTP",
                                                           "service OIP-gRPC")})  # fmt: skip
        result["batching"] = httpx.get(url + "/info").json()["batching"]  # one worker's choice
        measure("service", url, pid, "640", 2, batch=BATCH_IMAGES)
        rss_640 = worker_rss_mb(pid)
        add_interleaved(interleaved({
            "service": segments_of(pid, analyze_load(url, images["phone"], 16)),
            "phone": limit_of("phone", result["limit"], model_dir),
        }, seconds), {"service": ("service", "phone", 16)})  # fmt: skip
        result["rss_mb_per_worker_640"] = rss_640
        result["rss_mb_per_worker"] = max(rss_640, worker_rss_mb(pid))  # after the phone photos
        if args.profile:
            result["profile_c16_640"] = profile_server(
                pid, seconds, logs / "profile",
                lambda: http_point("profile", url, pid, images["640"], "640", 16, seconds),
            )  # fmt: skip

        say("(c) the peers, each between two halves of the service's points ...")
        peer_kinds = (("640", 1), ("640", 16), ("phone", 16))
        for peer in PEERS:

            def peer_points(peer: str = peer) -> None:  # its own server, stopped after
                with peer_server(peer, model_dir, logs / f"{peer}.log") as (peer_url, peer_pid):
                    warm(peer_url, peer_pid)
                    for kind, c in peer_kinds:
                        measure(peer, peer_url, peer_pid, kind, c)

            beside = f"service, beside {peer}"
            add_interleaved(interleaved({
                f"{beside} {kind} {c}": segments_of(pid, analyze_load(url, images[kind], c))
                for kind, c in peer_kinds
            }, seconds, middle=peer_points), {
                f"{beside} {kind} {c}": (beside, kind, c) for kind, c in peer_kinds})  # fmt: skip

        if args.int8:
            say("(f) the INT8 variant served, between halves of the fp32 service's point and of "
                "the INT8 limit ...")  # fmt: skip

            def int8_points() -> None:
                int8_env = {**env, "MODEL_TAG": args.int8}
                with serve(home, logs / "service-int8.log", env=int8_env) as int8_server:
                    int8_url, int8_pid = int8_server.url, int8_server.process.pid
                    warm(int8_url, int8_pid)
                    for c in (1, 16):
                        before = httpx.get(int8_url + "/metrics").text
                        measure("service INT8", int8_url, int8_pid, "640", c)
                    after = httpx.get(int8_url + "/metrics").text
                    result["images_per_run_int8_c16"] = images_per_run(after, before)
                    result["batching_int8"] = httpx.get(int8_url + "/info").json()["batching"]
                    result["rss_mb_per_worker_int8"] = worker_rss_mb(int8_pid)

            add_interleaved(interleaved({
                "service, beside INT8": segments_of(pid, analyze_load(url, images["640"], 16)),
                "640 INT8": limit_of("640 INT8", result["limit_int8"], int8_dir),
                f"640 INT8 {ONE_PER_RUN}": limit_of(
                    "640 INT8", result["limit_int8"], int8_dir, batch=1
                ),
            }, seconds, middle=int8_points), {
                "service, beside INT8": ("service, beside INT8", "640", 16)})  # fmt: skip

    say("(d) the service with WORKERS=1, and with BATCHING=0 ...")
    for name, setting in (("service WORKERS=1", "WORKERS=1"), ("service BATCHING=0", "BATCHING=0")):
        key, value = setting.split("=")
        with serve(home, logs / f"{key}.log", env={**env, key: value}) as server:
            warm(server.url, server.process.pid)
            for c in (1, 16):
                measure(name, server.url, server.process.pid, "640", c)
    result["worker_cpu_shares_c16"] = _point(result, "service", "640", 16)["worker_cpu_shares"]

    say("(e) the duplicate-input cache ...")
    with serve(home, logs / "service-cache.log", env={**env, "CACHE_SIZE": "1024"}) as server:
        point = measure("service CACHE_SIZE=1024", server.url, server.process.pid, "640", 16)
    result["cache"] = {
        "hit_over_miss_c16": round(
            point["img_s"] / _point(result, "service", "640", 16)["img_s"], 2
        ),
        "key_ms": {kind: key_cost_ms(pictures) for kind, pictures in images.items()},
    }
    result.update(_ratios(result))
    result["targets"] = {
        name: {"value": result.get(name), "target": f"{op} {bound}", "met": _met(result, name)}
        for name, (op, bound) in TARGETS.items()
    }
    return result


_NO_DEFAULT = object()


def _point(
    result: dict, system: str, kind: str, concurrency: int, default: object = _NO_DEFAULT
) -> dict:
    """The batch-1 point of `system`; `default` when the run has none (else StopIteration)."""
    found = (
        p for p in result["points"]
        if p["system"] == system and p["images"] == kind and p["concurrency"] == concurrency
        and p["batch"] == 1
    )  # fmt: skip
    return next(found) if default is _NO_DEFAULT else next(found, default)


def _ratios(result: dict) -> dict:
    """Each ratio compares two points measured interleaved (`interleaved`): the service beside
    the in-process limit, beside each peer, the INT8 variant beside the fp32 service."""

    def at(system: str, kind: str = "640", concurrency: int = 16) -> dict:
        return _point(result, system, kind, concurrency)

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2)

    def over(peer: str, kind: str = "640", concurrency: int = 16, figure: str = "img_s"):
        return ratio(at(f"service, beside {peer}", kind, concurrency)[figure],
                     at(peer, kind, concurrency)[figure])  # fmt: skip

    beside_oip = at(BESIDE_OIP)

    def limit(kind: str) -> dict:
        """The faster of the limit's settings measured beside the points: the sweep's best, or
        the same threads with one image per run (the sweep ran minutes before)."""
        beside = result["limit_beside"]
        settings = [beside[name] for name in (kind, f"{kind} {ONE_PER_RUN}") if name in beside]
        return max(settings, key=lambda measured: measured["img_s"])

    ratios = {
        "service_over_limit": ratio(beside_oip["img_s"], limit("640")["img_s"]),
        "service_over_limit_phone": ratio(at("service", "phone")["img_s"], limit("phone")["img_s"]),
        "service_over_baseline_640": over("tutorial"),
        "service_over_baseline_phone": over("tutorial", "phone"),
        "service_over_expert_baseline": over("expert"),
        "service_over_litserve": over("litserve"),
        "p99_over_litserve": over("litserve", figure="p99_ms"),
        "p50_c1_over_baseline": over("tutorial", concurrency=1, figure="p50_ms"),
        "p99_over_baseline": over("tutorial", figure="p99_ms"),
        "oip_http_over_analyze": ratio(at("service OIP-HTTP")["img_s"], beside_oip["img_s"]),
        "oip_grpc_over_analyze": ratio(at("service OIP-gRPC")["img_s"], beside_oip["img_s"]),
    }  # fmt: skip
    if "limit_int8" in result:
        int8 = at("service INT8")
        ratios["int8_served_over_fp32_served"] = ratio(
            int8["img_s"], at("service, beside INT8")["img_s"]
        )
        ratios["int8_service_over_int8_limit"] = ratio(int8["img_s"], limit("640 INT8")["img_s"])
    return ratios


def _what_bounds(result: dict, served: str, limit_name: str) -> list[str]:
    """The service's CPU per image at c=16 beside the in-process limit's, measured interleaved:
    what HTTP adds (the event loops), what the threads spend over the limit's runs of one image,
    and what merging saves the limit."""
    limits = result["limit_beside"]
    point = _point(result, served, "640", 16, default=None)
    if point is None or "cpu_ms_per_image" not in point or limit_name not in limits:
        return []
    spent, best, one = point["cpu_ms_per_image"], limits[limit_name], limits[
        f"{limit_name} {ONE_PER_RUN}"
    ]  # fmt: skip

    def ms(limit: dict) -> float:
        return round(limit["cpu_cores"] * 1000 / limit["img_s"], 2)

    int8 = "INT8" in limit_name
    batching = result.get("batching_int8" if int8 else "batching", {})
    per_run = result.get("images_per_run_int8_c16" if int8 else "images_per_run_c16")
    return ["", f"What bounds `{served}` at c=16 against the in-process limit `{limit_name}`, run "
            "interleaved, in CPU ms per image answered: the service's workers spent "
            f"{spent['total']}, {spent['event_loops']} on their event loops (HTTP, admission, "
            f"routing, answers, logs) and {spent['threads']} in their decoding and model "
            f"threads; the limit spent {ms(one)} with one image per model run and {ms(best)} at "
            f"the sweep's best setting ({best['setting']}). So the event loops add "
            f"{spent['event_loops']}, the threads spend {_more_or_less(spent['threads'] - ms(one))}"
            f" than the limit's runs of one image, and the limit's best setting spends "
            f"{_more_or_less(ms(best) - ms(one))} than its runs of one. The service merges images: "
            f"{batching.get('merges')} (one worker's warm-up measured a full run "
            f"{batching.get('measured_gain')}x cheaper per image); at c=16 its model runs took "
            f"{per_run} image(s) on average. Its server used "
            f"{point['server_cpu_cores']} cores and the load generator "
            f"{point['client_cpu_cores']} of the machine's {result['machine']['cpus']} CPUs; "
            f"the limit used {best['cpu_cores']}."]  # fmt: skip


def _more_or_less(difference: float) -> str:
    return f"{abs(round(difference, 2))} {'more' if difference >= 0 else 'less'}"


def _met(result: dict, name: str) -> bool | None:
    value = result.get(name)
    if value is None:
        return None
    op, bound = TARGETS[name]
    return value >= bound if op == ">=" else value <= bound


def _row(p: dict) -> str:
    what = f"{p['system']:<26} {p['images']:<5} c={p['concurrency']:<3}" + (
        f" batch={p['batch']}" if p["batch"] > 1 else "        "
    )
    return (f"{what} {p['img_s']:>7.1f} img/s  p50 {p['p50_ms']:>7.1f}  p95 {p['p95_ms']:>7.1f}  "
            f"p99 {p['p99_ms']:>7.1f} ms  errors {p['errors']:>4}  "
            f"server {p['server_cpu_cores']:.2f} cores  "
            f"client {p['client_cpu_cores']:.2f} cores")  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Model `{result['model']}` (random weights, timing only), {result['date']}, commit "
        f"`{result.get('commit', 'unknown')}`, {result['machine']['cpus']} CPUs "
        f"({result['machine']['cpu']}), client and server on the same machine. Produced, with "
        "docs/benchmarks.json, by one run of:",
        "",
        f"    {result['command']}",
        "",
        f"Service settings: `{json.dumps(result['settings']['service'])}` (defaults otherwise); "
        f"{result['settings']['seconds_per_point']} s per point. The service sized itself: "
        f"`{json.dumps(result.get('sizing'))}`.",
        "",
        "Peers: `tutorial` is the FastAPI server tutorials ship (`async def`, one ONNX Runtime "
        "session with default threads, full decode), the *baseline* of the targets; `expert` is "
        "FastAPI with a `def` endpoint, a 1-thread session and `Image.draft` "
        "(loadtest/baseline_app.py); `litserve` is LitServe with batching and 2 workers "
        "(loadtest/litserve_app.py). All use the project's decode and preprocessing.",
        "",
        "## In-process limit: decode + preprocess + ONNX Runtime, no HTTP",
        "",
        "| images | best setting | img/s | CPU cores |",
        "|---|---|---|---|",
    ]
    int8_limits = {f"{kind} INT8": v for kind, v in result.get("limit_int8", {}).items()}
    limits = {**result["limit"], **int8_limits}
    for kind, limit in limits.items():
        best = limit["best"]
        lines.append(f"| {kind} | {best['setting']} | {best['img_s']} | {best['cpu_cores']} |")
    lines += ["", "All settings tried (on the one image the /analyze clients send):", ""]
    for kind, limit in limits.items():
        tried = "; ".join(f"{r['setting']}: {r['img_s']}" for r in limit["tried"])
        lines += [f"- {kind}: {tried}"]
    if result.get("limit_beside"):
        lines += ["", "The best setting measured again in two halves around the service's points "
                  "it is compared with, and the same threads with one image per model run (the "
                  "ratios use the faster of the two: the machine's speed drifts between the sweep "
                  "and the points):", ""]  # fmt: skip
        for kind, limit in result["limit_beside"].items():
            halves = ", ".join(str(h) for h in limit["halves"])
            lines += [f"- {kind}: {limit['img_s']} img/s (halves {halves}), {limit['cpu_cores']} "
                      "CPU cores"]  # fmt: skip
    lines += [
        "",
        "## Over HTTP (aiohttp closed loops, one image per request unless batch > 1)",
        "",
        "| system | images | concurrency | batch | img/s | p50 ms | p95 ms | p99 ms | errors "
        "| server CPU cores | client CPU cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines[-2:-2] = [
        "Every ratio compares points run interleaved, in two halves each (A B C, C B A): "
        f"`service OIP-HTTP` (binary tensors), `service OIP-gRPC` (tritonclient.grpc.aio, one "
        f"channel) and the in-process limit with `{BESIDE_OIP}`; the phone limit with the "
        "`service` phone point; each peer's points (its server up only meanwhile: LitServe's "
        "idle workers poll) between the halves of `service, beside <peer>`; the INT8 service's "
        "points between the halves of `service, beside INT8` and of the INT8 limit.",
        "",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['system']} | {p['images']} | {p['concurrency']} | {p['batch']} | {p['img_s']} "
            f"| {p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | {p['errors']} "
            f"| {p['server_cpu_cores']} | {p['client_cpu_cores']} |"
        )
    if result.get("stages_c16_ms"):
        stages = ", ".join(f"{k} {v}" for k, v in result["stages_c16_ms"].items())
        lines += ["", "## Where a request's time went (the service, /analyze c=16, 640x480)", "",
                  f"Mean of each stage histogram over the point, ms: {stages}."]  # fmt: skip
    for served, limit in ((BESIDE_OIP, "640"), ("service INT8", "640 INT8")):
        lines += _what_bounds(result, served, limit)
    if result.get("worker_cpu_shares_c16"):
        shares, workers = result["worker_cpu_shares_c16"], result["sizing"]["workers"]
        lines += ["", f"The service ({workers} worker(s)) at c=16 (16 keep-alive connections): "
                  f"the busy server processes' shares of the server's CPU: {shares}."]  # fmt: skip
    lines += ["", "## Against the targets (issues 4 and 12)", "",
              "| figure | value | target | met |", "|---|---|---|---|"]  # fmt: skip
    for name, t in result["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {name} | {t['value']} | {t['target']} | {met} |")
    if "rss_mb_per_worker_640" in result:
        lines += ["", "rss_mb_per_worker is the largest worker RSS after the phone photos (16 "
                  "uploads of 2-4 MB in flight); after the 640x480 points alone it was "
                  f"{result['rss_mb_per_worker_640']} MB."]  # fmt: skip
    if "model_only_img_s" in result:
        m = result["model_only_img_s"]
        lines += [
            "",
            "int8_over_fp32: ONNX Runtime alone, two 1-thread sessions at batch 1, in halves "
            "(fp32, INT8, INT8, fp32): "
            f"fp32 {m['fp32']} img/s, INT8 (`{result['int8_model']}`) {m['int8']} img/s.",
        ]
    if "cache" in result:
        cache = result["cache"]
        lines += ["", "Duplicate-input cache: the same picture at c=16 with `CACHE_SIZE=1024` "
                  f"(all hits but the first) gave {cache['hit_over_miss_c16']}x the img/s of the "
                  "service without it; the key (SHA-256 of the upload) costs "
                  + ", ".join(f"{ms} ms for a {kind} JPEG" for kind, ms in cache["key_ms"].items())
                  + " on every request while it is on."]  # fmt: skip
    if result.get("profile_c16_640"):
        lines += ["", "## Where the server's time goes (py-spy, /analyze c=16, 640x480)", "", "```",
                  *result["profile_c16_640"], "```"]  # fmt: skip
    if result.get("notes"):
        lines += ["", "## Notes", "", result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mobilenetv2-bench:v1")
    parser.add_argument("--int8", default=None, help="INT8 tag for int8_over_fp32 (in process)")
    parser.add_argument("--seconds", type=float, default=20, help="per HTTP point")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 s points")
    parser.add_argument("--profile", action="store_true", help="py-spy the service at c=16")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="service setting (repeatable), e.g. WORKERS=2")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.json")
    parser.add_argument("--notes", type=Path, help="markdown appended to benchmarks.md")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the .md from --out and --notes"
    )
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(args.out.read_text())
        result["notes"] = args.notes.read_text() if args.notes else result.get("notes")
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
        return 0
    if args.quick:
        args.seconds = min(args.seconds, 2)
    result = run(args)
    result["machine"] = machine()
    result["command"] = "python -m loadtest.benchmark " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result["commit"] = git_commit()
    if args.notes:
        result["notes"] = args.notes.read_text()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    for name, t in result["targets"].items():
        print(f"{name:<28} {t['value']!s:>8}  target {t['target']:<8} met: {t['met']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
