"""One run: the machine's limit, the service and the tutorial baseline, on the same images.

    .venv/bin/python -m loadtest.benchmark --model mobilenetv2-bench:v1 --seconds 20

(a) the in-process limit: decode + preprocess + ONNX Runtime (`Classifier.prepare`/`run`) at
    its best batch size and thread setting; (b) the service (`bentoml serve`) over HTTP: /analyze
    at concurrency 1/4/16/32 and /analyze_batch; (c) loadtest/baseline_app.py (FastAPI, the
    tutorials' design); (d) the service with BATCHING=0; (e) the duplicate-input cache (CACHE_SIZE
    on, the same picture every time: all hits but the first) and the cost of its key; (f) with
    --int8, the service serving the INT8 variant.
    Images: generated photo-like 640x480 and 4032x3024 JPEGs. Prints a table, writes
    docs/benchmarks.json and docs/benchmarks.md.

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
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import bentoml
import numpy as np
import psutil

from image_classifier.core.classifier import Classifier
from image_classifier.serving.cache import PredictionCache
from image_classifier.serving.settings import Settings
from loadtest.load import closed_loops, percentile, throughput
from loadtest.servers import BIN, REPO, free_port, serve, stop, wait_until_ready
from training_export.photos import PHOTO_640, PHOTO_PHONE, photo_jpeg

CONCURRENCIES = (1, 4, 16, 32)
BATCH_IMAGES = 8  # images per /analyze_batch request
TARGETS = {  # issue 4, for the MobileNetV2-class model on 2 cores
    "service_over_limit": (">=", 0.85),
    "service_over_baseline_640": (">=", 1.5),
    "service_over_baseline_phone": (">=", 3.0),
    "p99_over_baseline": ("<=", 1.0),
    "int8_over_fp32": (">=", 2.0),
    "cold_start_s": ("<=", 5.0),
    "rss_mb_per_worker": ("<=", 300.0),
}


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


def tree_cpu_seconds(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def worker_rss_mb(pid: int) -> float:
    """The largest process in the server's tree: the worker holding the model."""
    root = psutil.Process(pid)
    sizes = []
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            sizes.append(process.memory_info().rss)
    return round(max(sizes) / 2**20, 1)


def http_point(
    system: str, url: str, pid: int, images: list[bytes], kind: str, concurrency: int,
    seconds: float, batch: int = 1,
) -> dict:  # fmt: skip
    """One closed-loop run; `batch` > 1 posts that many images per request to /analyze_batch."""
    if batch > 1:
        payload: bytes | list[bytes] = [images[i % len(images)] for i in range(batch)]
        route, options = "/analyze_batch", {"field": "images"}
    else:
        payload, route, options = images[0], "/analyze", {}
    client_cpu, server_cpu = psutil.Process().cpu_times(), tree_cpu_seconds(pid)
    started = time.monotonic()
    outcomes = asyncio.run(
        closed_loops(url + route, payload, concurrency=concurrency, seconds=seconds,
                     content_type="image/jpeg", **options)
    )  # fmt: skip
    wall = time.monotonic() - started
    client_after = psutil.Process().cpu_times()
    ok = [o.seconds * 1000 for o in outcomes if o.status == 200]
    return {
        "system": system,
        "images": kind,
        "concurrency": concurrency,
        "batch": batch,
        "img_s": round(throughput(outcomes) * (len(payload) if batch > 1 else 1), 1),
        "p50_ms": round(percentile(ok, 0.50), 1),
        "p95_ms": round(percentile(ok, 0.95), 1),
        "p99_ms": round(percentile(ok, 0.99), 1),
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "server_cpu_cores": round((tree_cpu_seconds(pid) - server_cpu) / wall, 2),
        "client_cpu_cores": round(
            (client_after.user + client_after.system - client_cpu.user - client_cpu.system) / wall,
            2,
        ),
    }


@contextlib.contextmanager
def baseline_server(model_dir: Path, log_path: Path) -> Iterator[tuple[str, int]]:
    """loadtest/baseline_app.py under uvicorn, one worker."""
    port = free_port()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(BIN / "uvicorn"), "loadtest.baseline_app:app", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            cwd=REPO, env={**os.environ, "MODEL_DIR": str(model_dir)}, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log_path, timeout=60)
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


def run(args: argparse.Namespace) -> dict:
    seconds, say = args.seconds, print
    model_dir = Path(bentoml.models.get(args.model).path)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    say("making images ...")
    count = 2 if args.quick else 8
    images = {
        "640": [photo_jpeg(PHOTO_640, seed) for seed in range(count)],
        "phone": [photo_jpeg(PHOTO_PHONE, seed) for seed in range(max(2, count // 2))],
    }
    result: dict = {"model": args.model, "int8_model": args.int8, "points": []}
    batches = (1, 4) if args.quick else (1, 4, 8)
    limit_s = max(1.0, seconds / 4)
    result["limit"] = {}
    for kind, pictures in images.items():
        say(f"(a) in-process limit, {kind} ...")
        result["limit"][kind] = in_process_limit(model_dir, pictures, limit_s, batches)
    if args.int8:
        int8_dir = Path(bentoml.models.get(args.int8).path)
        fp32, int8 = model_only_rate(model_dir, limit_s), model_only_rate(int8_dir, limit_s)
        result["model_only_img_s"] = {"fp32": round(fp32, 1), "int8": round(int8, 1)}
        result["int8_over_fp32"] = round(int8 / fp32, 2)

    env = {"MODEL_TAG": args.model, **dict(kv.split("=", 1) for kv in args.env)}
    result["settings"] = {"service": env, "seconds_per_point": seconds}
    logs = Path(tempfile.mkdtemp(prefix="benchmark-logs-"))
    points = result["points"]

    say("(b) the service ...")
    started = time.monotonic()
    with serve(home, logs / "service.log", env=env) as server:
        result["cold_start_s"] = round(time.monotonic() - started, 2)
        pid = server.process.pid
        http_point("warm-up", server.url, pid, images["640"], "640", 4, min(2.0, seconds))
        for c in CONCURRENCIES:
            points.append(http_point("service", server.url, pid, images["640"], "640", c, seconds))
            say(_row(points[-1]))
        points.append(http_point("service", server.url, pid, images["640"], "640", 2, seconds,
                                 batch=BATCH_IMAGES))  # fmt: skip
        say(_row(points[-1]))
        result["rss_mb_per_worker"] = worker_rss_mb(pid)  # after the 640x480 points
        points.append(http_point("service", server.url, pid, images["phone"], "phone", 16, seconds))
        say(_row(points[-1]))
        result["rss_mb_per_worker_after_phone"] = worker_rss_mb(pid)
        if args.profile:
            result["profile_c16_640"] = profile_server(
                pid, seconds, logs / "profile",
                lambda: http_point("profile", server.url, pid, images["640"], "640", 16, seconds),
            )  # fmt: skip

    say("(c) the FastAPI baseline ...")
    with baseline_server(model_dir, logs / "baseline.log") as (url, pid):
        http_point("warm-up", url, pid, images["640"], "640", 4, min(2.0, seconds))
        for kind, c in (("640", 1), ("640", 16), ("phone", 16)):
            points.append(http_point("baseline", url, pid, images[kind], kind, c, seconds))
            say(_row(points[-1]))

    say("(d) the service with BATCHING=0 ...")
    with serve(home, logs / "service-unbatched.log", env={**env, "BATCHING": "0"}) as server:
        pid = server.process.pid
        http_point("warm-up", server.url, pid, images["640"], "640", 4, min(2.0, seconds))
        for c in (1, 16):
            point = http_point("service BATCHING=0", server.url, pid, images["640"], "640", c,
                               seconds)  # fmt: skip
            points.append(point)
            say(_row(point))
    if args.int8:
        say("(f) the service serving the INT8 variant ...")
        with serve(home, logs / "service-int8.log", env={**env, "MODEL_TAG": args.int8}) as server:
            pid = server.process.pid
            http_point("warm-up", server.url, pid, images["640"], "640", 4, min(2.0, seconds))
            points.append(http_point("service INT8", server.url, pid, images["640"], "640", 16,
                                     seconds))  # fmt: skip
            say(_row(points[-1]))
            result["rss_mb_per_worker_int8"] = worker_rss_mb(pid)

    say("(e) the duplicate-input cache ...")
    with serve(home, logs / "service-cache.log", env={**env, "CACHE_SIZE": "1024"}) as server:
        pid = server.process.pid
        point = http_point("service CACHE_SIZE=1024", server.url, pid, images["640"], "640", 16,
                           seconds)  # fmt: skip
        points.append(point)
        say(_row(point))
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


def _point(result: dict, system: str, kind: str, concurrency: int) -> dict:
    return next(
        p for p in result["points"]
        if p["system"] == system and p["images"] == kind and p["concurrency"] == concurrency
        and p["batch"] == 1
    )  # fmt: skip


def _ratios(result: dict) -> dict:
    service16 = _point(result, "service", "640", 16)
    baseline16 = _point(result, "baseline", "640", 16)
    phone, phone_base = (_point(result, s, "phone", 16) for s in ("service", "baseline"))
    limit = result["limit"]["640"]["best"]["img_s"]
    return {
        "service_over_limit": round(service16["img_s"] / limit, 2),
        "service_over_limit_phone": round(
            phone["img_s"] / result["limit"]["phone"]["best"]["img_s"], 2
        ),
        "service_over_baseline_640": round(service16["img_s"] / baseline16["img_s"], 2),
        "service_over_baseline_phone": round(phone["img_s"] / phone_base["img_s"], 2),
        "p99_over_baseline": round(service16["p99_ms"] / baseline16["p99_ms"], 2),
    }


def _met(result: dict, name: str) -> bool | None:
    value = result.get(name)
    if value is None:
        return None
    op, bound = TARGETS[name]
    return value >= bound if op == ">=" else value <= bound


def _row(p: dict) -> str:
    what = f"{p['system']:<19} {p['images']:<5} c={p['concurrency']:<3}" + (
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
        f"Model `{result['model']}` (random weights, timing only), {result['date']}, "
        f"{result['machine']['cpus']} CPUs ({result['machine']['cpu']}), client and server on "
        "the same machine. Produced, with docs/benchmarks.json, by one run of:",
        "",
        f"    {result['command']}",
        "",
        f"Service settings: `{json.dumps(result['settings']['service'])}` (defaults otherwise); "
        f"{result['settings']['seconds_per_point']} s per point.",
        "",
        "## In-process limit: decode + preprocess + ONNX Runtime, no HTTP",
        "",
        "| images | best setting | img/s | CPU cores |",
        "|---|---|---|---|",
    ]
    for kind, limit in result["limit"].items():
        best = limit["best"]
        lines.append(f"| {kind} | {best['setting']} | {best['img_s']} | {best['cpu_cores']} |")
    lines += ["", "All settings tried:", ""]
    for kind, limit in result["limit"].items():
        tried = "; ".join(f"{r['setting']}: {r['img_s']}" for r in limit["tried"])
        lines += [f"- {kind}: {tried}"]
    lines += [
        "",
        "## Over HTTP (aiohttp closed loops, one image per request unless batch > 1)",
        "",
        "| system | images | concurrency | batch | img/s | p50 ms | p95 ms | p99 ms | errors "
        "| server CPU cores | client CPU cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['system']} | {p['images']} | {p['concurrency']} | {p['batch']} | {p['img_s']} "
            f"| {p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | {p['errors']} "
            f"| {p['server_cpu_cores']} | {p['client_cpu_cores']} |"
        )
    lines += ["", "## Against the targets of issue 4", "", "| figure | value | target | met |",
              "|---|---|---|---|"]  # fmt: skip
    for name, t in result["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {name} | {t['value']} | {t['target']} | {met} |")
    if "rss_mb_per_worker_after_phone" in result:
        lines += ["", f"rss_mb_per_worker is measured after the 640x480 points; after the phone "
                  f"photos (16 uploads of 2-4 MB in flight) the worker held "
                  f"{result['rss_mb_per_worker_after_phone']} MB."]  # fmt: skip
    if "model_only_img_s" in result:
        m = result["model_only_img_s"]
        lines += [
            "",
            "int8_over_fp32: ONNX Runtime alone, two 1-thread sessions at batch 1: "
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
