"""Real servers with their own settings: no model, auth and rate limit, SIGTERM drain."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import bentoml
import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc.aio as grpc_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from image_classifier.serving.release_record import ReleaseRecord, write_record
from loadtest.load import closed_loops
from loadtest.servers import BIN, REPO, free_port, serve, worker_pids
from tests.figures import measured
from tests.http.responses import access_lines, assert_no_traceback, envelope_code, metric_value
from tests.model_store import import_model
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode

TOKENS = "first-token-Zq81,second-token-Hh07"


@pytest.fixture(scope="module")
def digit_png(heldout) -> bytes:
    return encode(heldout[0][0], "PNG")


def start_that_fails(bentoml_home, log_path, http_port: int | None = None, **env) -> str:
    """`bentoml serve` that must stop by itself at start: its log."""
    full_env = {**os.environ, "BENTOML_HOME": str(bentoml_home), **env}
    with open(log_path, "wb") as log_file:
        result = subprocess.run(
            [str(BIN / "bentoml"), "serve", "service:ImageClassifier",
             "--host", "127.0.0.1", "--port", str(http_port or free_port())],
            cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, timeout=120,
        )  # fmt: skip
    log = log_path.read_text()
    assert result.returncode != 0, log
    assert_no_traceback(log)
    return log


@pytest.mark.parametrize(
    ("tag", "held"), [("absent-model:v7", None), ("digits-cnn:v7", "it holds digits-cnn:v1")]
)
def test_a_missing_model_stops_the_start_with_one_clear_line(trained_store, artifacts, tag, held):
    """A missing version of a stored name also says which the store holds (a bento holds the
    one it was built with, which its served_model.json may not name)."""
    log = start_that_fails(trained_store, artifacts / f"server-missing-{tag}.log", MODEL_TAG=tag)
    lines = [line for line in log.splitlines() if tag in line]
    assert len(lines) == 1 and "training_export ensure-default" in lines[0], log
    assert held is None or held in lines[0], lines[0]


def test_a_model_without_a_card_stops_the_start_with_one_clear_line(artifacts, tmp_path):
    """Something else saved in the store (not by training_export): the workers logged an error
    and the server stayed up, unready for ever."""
    home = tmp_path / "home"
    save = "import bentoml; bentoml.picklable_model.save_model('notimage:v1', {})"
    saved = subprocess.run(
        [sys.executable, "-c", save],
        env={**os.environ, "BENTOML_HOME": str(home)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    log = start_that_fails(home, artifacts / "server-no-card.log", MODEL_TAG="notimage:v1")
    lines = [line for line in log.splitlines() if "notimage:v1" in line]
    assert len(lines) == 1 and "has no model card" in lines[0], log


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CANARY_FRACTION", "1.5"), ("API_TOKENS", " , "), ("ALLOWED_FORMATS", "PNGG"),
     ("GIL_SWITCH_INTERVAL_MS", "nan")],  # NaN: every worker aborted in C, naming nothing
)  # fmt: skip
def test_a_bad_setting_stops_the_start_with_one_clear_line(
    trained_store, artifacts, variable, value
):
    # A traceback of 60 lines through BentoML's loader ended with the message; an API_TOKENS of
    # blanks (an empty secret) turned authentication off without a word.
    log = start_that_fails(
        trained_store, artifacts / f"server-bad-{variable.lower()}.log", **{variable: value}
    )
    lines = [line for line in log.splitlines() if variable in line]
    assert len(lines) == 1 and "configuration error" in lines[0], log
    # A JSON line, as every other (LOG_FORMAT's default): it was the one plain-text line.
    assert json.loads(lines[0])["level"] == "ERROR", lines[0]


def test_a_taken_grpc_port_stops_the_start_with_one_clear_line(trained_store, artifacts):
    # Each worker failed to bind it, died with a traceback and was restarted, for ever.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        log = start_that_fails(
            trained_store, artifacts / "server-grpc-taken.log", GRPC_PORT=str(port)
        )
    lines = [line for line in log.splitlines() if "GRPC_PORT" in line]
    assert len(lines) == 1 and str(port) in lines[0], log


def test_a_taken_http_port_stops_the_start_with_one_clear_line(trained_store, artifacts):
    # A 41-54 line traceback ending in "OSError: [Errno 98]", from circus or our socket per worker.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for workers in ("1", "2"):
            log = start_that_fails(
                trained_store, artifacts / f"server-http-taken-{workers}.log", http_port=port,
                WORKERS=workers,
            )  # fmt: skip
            lines = [line for line in log.splitlines() if "the HTTP port" in line]
            assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], log


def test_a_grpc_port_that_is_the_http_port_stops_the_start_with_one_clear_line(
    trained_store, artifacts
):
    # Each worker logged gRPC's bind failure with tracebacks and was restarted, for ever.
    port = free_port()
    log = start_that_fails(
        trained_store, artifacts / "server-grpc-is-http.log", http_port=port, GRPC_PORT=str(port)
    )
    lines = [line for line in log.splitlines() if "GRPC_PORT" in line]
    assert len(lines) == 1 and "the HTTP port too" in lines[0], log
    assert json.loads(lines[0])["message"].startswith("GRPC_PORT"), lines[0]


@pytest.mark.parametrize("served", ["first:v1", "first"])
def test_a_candidate_with_the_served_version_stops_the_start(artifacts, tmp_path, served):
    """Answers, pins and metrics name a model by version: two models both `v1` would mix up.
    A name alone is resolved first: it once passed the arbiter's check, and each worker then
    refused to start and was respawned for ever."""
    home = tmp_path / "home"
    for tag in ("first:v1", "second:v1"):
        import_model(home, build_onnx_classifier(tmp_path / tag.replace(":", "-")), tag)
    log = start_that_fails(
        home, artifacts / f"server-version-clash-{served}.log",
        MODEL_TAG=served, CANDIDATE_MODEL_TAG="second:v1",
        SERVED_MODEL_FILE=str(tmp_path / "none.json"),
    )  # fmt: skip
    lines = [line for line in log.splitlines() if "second:v1" in line]
    assert len(lines) == 1 and "same version as the served first:v1" in lines[0], log


def test_tokens_guard_the_apis_and_a_rate_limit_answers_429(trained_store, artifacts, digit_png):
    log_path = artifacts / "server-auth.log"
    env = {"API_TOKENS": TOKENS, "RATE_LIMIT": "10/minute", "WORKERS": "1"}  # limit per worker
    files = {"image": ("d.png", digit_png, "image/png")}
    first, second = TOKENS.split(",")
    with serve(trained_store, log_path, env=env) as server:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        refused = httpx.post(f"{server.url}/analyze", files=files)
        assert refused.status_code == 401 and envelope_code(refused) == "UNAUTHORIZED"
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(
            f"{server.url}/analyze", files=files, headers={"Authorization": "Bearer guess"}
        )
        assert wrong.status_code == 401
        info = httpx.get(f"{server.url}/info")
        assert info.status_code == 401 and info.headers["www-authenticate"] == "Bearer"

        with bentoml.SyncHTTPClient(server.url, token=first) as client:
            assert client.analyze(image=_digit_file(artifacts, digit_png))["success"] is True
        statuses = []
        for _ in range(12):
            response = httpx.post(
                f"{server.url}/analyze", files=files, headers={"Authorization": f"Bearer {second}"}
            )
            statuses.append(response.status_code)
        assert statuses[:10] == [200] * 10 and statuses[10:] == [429, 429]
        assert envelope_code(response) == "RATE_LIMITED"
        assert 1 <= int(response.headers["retry-after"]) <= 60
        # The first token is another client with its own budget.
        other = httpx.post(
            f"{server.url}/analyze", files=files, headers={"Authorization": f"Bearer {first}"}
        )
        assert other.status_code == 200
        log = server.log()
    for token in TOKENS.split(","):
        assert token not in log
    # Each refusal's access line says who was refused, so its owners can be told.
    refusals = [line for line in access_lines(log) if line["status"] in (401, 429)]
    assert len(refusals) == 5 and {line["client"] for line in refusals} == {"127.0.0.1"}, refusals


def test_cors_origins_let_a_page_of_that_origin_call_and_read_every_answer(
    trained_store, artifacts, digit_png
):
    """A browser app on another origin: its preflight (which carries no token) is answered, and
    every answer, a 401 too, names its origin; another origin gets nothing it could read."""
    app, token = "https://app.example", TOKENS.split(",")[0]
    env = {"CORS_ORIGINS": app, "API_TOKENS": TOKENS}
    files = {"image": ("d.png", digit_png, "image/png")}
    with serve(trained_store, artifacts / "server-cors.log", env=env) as server:
        url = f"{server.url}/analyze"
        asks = {"access-control-request-method": "POST",
                "access-control-request-headers": "authorization, x-request-id"}  # fmt: skip
        preflight = httpx.options(url, headers={"origin": app, **asks})
        answered = httpx.post(url, files=files, headers={
            "origin": app, "authorization": f"Bearer {token}"})  # fmt: skip
        refused = httpx.post(url, files=files, headers={"origin": app})
        elsewhere = httpx.post(url, files=files, headers={
            "origin": "https://evil.example", "authorization": f"Bearer {token}"})  # fmt: skip
        # Found by a black-box review: a bare text 400, no request id, code or access line.
        refused_preflight = httpx.options(url, headers={"origin": "https://evil.example", **asks})
        log = server.log()
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == app
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == app
    assert "x-request-id" in answered.headers["access-control-expose-headers"].lower()
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == app
    assert elsewhere.status_code == 200
    assert "access-control-allow-origin" not in elsewhere.headers
    assert refused_preflight.status_code == 400, refused_preflight.text
    assert refused_preflight.json()["error"]["code"] == "INVALID_REQUEST"
    assert "not allowed: origin" in refused_preflight.json()["error"]["message"]
    assert refused_preflight.headers["x-error-code"] == "INVALID_REQUEST"
    request_id = refused_preflight.headers["x-request-id"]
    assert refused_preflight.json()["request_id"] == request_id
    assert "access-control-allow-origin" not in refused_preflight.headers
    (line,) = [line for line in access_lines(log) if line.get("request_id") == request_id]
    assert (line["method"], line["status"], line["error_code"]) == (
        "OPTIONS",
        400,
        "INVALID_REQUEST",
    )


def _digit_file(artifacts, digit_png: bytes):
    path = artifacts / "digit.png"
    path.write_bytes(digit_png)
    return path


def test_sigterm_finishes_accepted_work_and_refuses_new(trained_store, artifacts, heldout):
    """Steady load plus one long batch in work when SIGTERM arrives: nothing accepted is lost."""
    digit = encode(heldout[0][0], "PNG")
    # Big enough to take seconds to decode, so it is still in work when the signal arrives.
    big = [encode(image.resize((3000, 3000)), "PNG") for image, _ in heldout[:64]]
    log_path = artifacts / "server-sigterm.log"
    with serve(trained_store, log_path, env={"SHUTDOWN_GRACE_S": "30"}) as server:
        report = asyncio.run(_load_then_sigterm(server, digit, big))
        exit_code = server.process.wait(60)
        log = server.log()
    summary = {k: v for k, v in report.items() if k not in ("outcomes", "signalled_at")}
    measured(f"\nSIGTERM drain: {summary}")
    outcomes, signalled_at = report["outcomes"], report["signalled_at"]
    assert report["batch_status"] == 200 and report["batch_items_ok"] == len(big)
    # 503; SHUTTING_DOWN from a draining worker, NOT_READY from one whose peer drains first.
    assert report["readyz_while_draining"] in ((503, "SHUTTING_DOWN"), (503, "NOT_READY"))
    assert report["v2_ready_while_draining"] == 503  # it said 200 while /readyz said 503
    # gRPC drains alike: the call in work finishes, a new one is told to go elsewhere.
    assert report["grpc_in_work"] == ("OK", 16), report["grpc_in_work"]
    assert report["grpc_ready_while_draining"] == (False, "NOT_SERVING")
    assert report["grpc_new_call"][0] == "StatusCode.UNAVAILABLE", report["grpc_new_call"]
    assert report["grpc_new_call"][1].startswith("SHUTTING_DOWN: "), report["grpc_new_call"]
    for outcome in outcomes:
        if outcome.started < signalled_at - 0.2:  # sent well before the signal: accepted
            assert outcome.status == 200, outcome
        if outcome.status is None:  # no answer at all: only once a worker has stopped (a worker
            # done draining exits, and a keep-alive connection to it closes under a new request)
            assert outcome.failure in ("ConnectError", "ClientOSError", "ServerDisconnectedError")
            assert outcome.started > signalled_at, outcome
        elif outcome.status != 200:
            assert (outcome.status, outcome.code) == (503, "SHUTTING_DOWN"), outcome
            assert outcome.retry_after == "1"
    assert sum(o.status == 200 for o in outcomes) > 20
    assert "drain done, 0 request(s) still in work" in log, log[-3000:]
    assert exit_code == 0, log[-3000:]  # a clean exit after the drain, not a kill


def test_work_still_in_work_when_the_grace_is_over_is_answered_shutting_down(
    trained_store, artifacts, heldout
):
    """SHUTDOWN_GRACE_S bounds the shutdown: a batch that outlives it got its 200 seconds later
    (the process exited at REQUEST_TIMEOUT_S at worst, past Kubernetes' grace period)."""
    big = [encode(image.resize((3000, 3000)), "PNG") for image, _ in heldout[:64]]
    with serve(
        trained_store, artifacts / "server-grace-over.log", env={"SHUTDOWN_GRACE_S": "1"}
    ) as server:

        async def batch_then_sigterm() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(timeout=120) as client:
                files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(big)]
                batch = asyncio.create_task(client.post(f"{server.url}/analyze_batch", files=files))
                series = 'bentoml_service_request_in_progress{endpoint="/analyze_batch"}'
                await _until_in_work(client, server.url, series)
                signalled_at = time.monotonic()
                os.kill(server.process.pid, signal.SIGTERM)
                return await batch, signalled_at

        answer, signalled_at = asyncio.run(batch_then_sigterm())
        answered_after = time.monotonic() - signalled_at
        exit_code = server.process.wait(60)
        exited_after = time.monotonic() - signalled_at
        log = server.log()
    measured(
        f"SIGTERM with SHUTDOWN_GRACE_S 1 and a 64-picture batch in work: answered "
        f"{answer.status_code} after {answered_after:.1f} s, exited after {exited_after:.1f} s",
        doc="operations",
    )
    assert (answer.status_code, envelope_code(answer)) == (503, "SHUTTING_DOWN"), answer.text
    assert answer.headers["retry-after"] == "1" and "SHUTDOWN_GRACE_S" in answer.text
    assert "drain done, 1 request(s) still in work" in log, log[-3000:]
    assert exit_code == 0, log[-3000:]


DRAIN_SEEN_WITHIN_S = 5.0  # far less than the drain itself (the 64 big pictures take longer)


async def _until_in_work(client: httpx.AsyncClient, url: str, series: str) -> None:
    """Wait until a gauge of requests in progress (`series`: its name and labels) is above 0."""
    wanted = series.removesuffix("}")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = (await client.get(f"{url}/metrics")).text
        if any(
            line.startswith(wanted) and not line.endswith(" 0.0") for line in metrics.splitlines()
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{series} never in progress")


async def _load_then_sigterm(server, digit: bytes, big: list[bytes]) -> dict:
    async with httpx.AsyncClient(timeout=120) as client:
        batch = asyncio.create_task(
            client.post(
                f"{server.url}/analyze_batch",
                files=[("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(big)],
            )
        )
        steady = asyncio.create_task(
            closed_loops(
                f"{server.url}/analyze", digit, concurrency=8, seconds=15, stop_on_refusal=True
            )
        )
        await asyncio.sleep(0.5)  # the steady load gets answers meanwhile
        batch_series = 'bentoml_service_request_in_progress{endpoint="/analyze_batch"}'
        await _until_in_work(client, server.url, batch_series)
        # A gRPC call in work too: 16 big pictures take seconds to decode. Waited for as the
        # batch is: a fixed 0.3 s once let the signal in before the call was admitted.
        grpc_in_work = asyncio.create_task(_grpc_infer(server.grpc_target, big[:16]))
        await _until_in_work(client, server.url, "image_classifier_grpc_infer_in_work")
        signalled_at = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)  # as Kubernetes or `docker stop` would
        # The signal reaches the workers through BentoML's arbiter, itself on the busy cores:
        # /readyz is asked until it says 503 (the drain lasts seconds: the batch is in work).
        readyz = await client.get(f"{server.url}/readyz")
        while readyz.status_code == 200 and time.monotonic() - signalled_at < DRAIN_SEEN_WITHIN_S:
            await asyncio.sleep(0.02)
            readyz = await client.get(f"{server.url}/readyz")
        readyz_503_after_s = round(time.monotonic() - signalled_at, 3)
        v2_ready = await client.get(f"{server.url}/v2/health/ready")
        grpc_ready = await _grpc_ready(server.grpc_target)
        grpc_new_call = await _grpc_infer(server.grpc_target, [digit])
        batch_response = await batch
        outcomes = await steady
    results = batch_response.json().get("results", [])
    return {
        "signalled_at": signalled_at,
        "outcomes": outcomes,
        "readyz_while_draining": (readyz.status_code, readyz.headers.get("x-error-code")),
        "v2_ready_while_draining": v2_ready.status_code,
        "readyz_503_after_s": readyz_503_after_s,
        "grpc_in_work": await grpc_in_work,
        "grpc_ready_while_draining": grpc_ready,
        "grpc_new_call": grpc_new_call,
        "batch_status": batch_response.status_code,
        "batch_items_ok": sum(r["success"] for r in results),
        "ok": sum(o.status == 200 for o in outcomes),
        "refused": sum(o.status == 503 for o in outcomes),
        "unanswered": sum(o.status is None for o in outcomes),
    }


async def _grpc_infer(target: str, images: list[bytes]) -> tuple[str, int | str]:
    """("OK", labels answered) or (gRPC status, message): tritonclient.grpc.aio's view."""
    client = grpc_aio.InferenceServerClient(target)
    tensor = grpc_aio.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    try:
        result = await client.infer("digits-cnn", [tensor], client_timeout=60)
        return "OK", len(result.as_numpy("label"))
    except InferenceServerException as exc:
        return str(exc.status()), exc.message()
    finally:
        await client.close()


async def _grpc_ready(target: str) -> tuple[bool, str]:
    """Readiness as Triton's client asks it, and as the standard health check answers it."""
    client = grpc_aio.InferenceServerClient(target)
    try:
        ready = await client.is_server_ready()
    finally:
        await client.close()
    async with grpc.aio.insecure_channel(target) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return ready, health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def _probe(url: str, since: float) -> int | str:
    """The status, or "reset at once" for a probe the kernel queued on the killed worker's
    socket in the instant before its death closed it (as a Kubernetes probe could meet once)."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        if since < 0.1:
            return "reset at once"
        raise


def test_workers_drain_and_exit_when_their_arbiter_is_killed(trained_store, artifacts, digit_png):
    """SIGKILL to `bentoml serve` itself: its workers went on answering with nothing to supervise
    them, and held the ports against a restart."""
    with serve(trained_store, artifacts / "server-arbiter-killed.log", env={"WORKERS": "2"}) as s:
        workers = [psutil.Process(pid) for pid in worker_pids(s.process.pid)]
        try:
            assert len(workers) == 2, workers
            os.kill(s.process.pid, signal.SIGKILL)
            gone, alive = psutil.wait_procs(workers, timeout=30)
        finally:
            for worker in workers:
                with contextlib.suppress(psutil.Error):
                    worker.kill()
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{s.url}/analyze", files={"image": ("d.png", digit_png)}, timeout=5)
        log = s.log()
    assert alive == [], f"still running 30 s after their arbiter died: {alive}"
    assert log.count("SIGTERM: taking no new work") == 2, log[-3000:]


def _replaced_and_ready(url: str) -> bool:
    """One worker replaced, and both workers' models loaded, as /metrics says."""
    metrics_text = httpx.get(f"{url}/metrics", timeout=5).text
    ready = [
        line[-4:]
        for line in metrics_text.splitlines()
        if line.startswith("image_classifier_ready{")
    ]
    replaced = metric_value(metrics_text, "image_classifier_workers_replaced_total")
    return replaced == 1 and ready == [" 1.0"] * 2


def test_a_worker_replaced_after_a_promote_serves_the_version_the_server_started_with(
    artifacts, tmp_path, digit_png
):
    """`models promote` while a server runs is for its next start: a worker that replaces a dead
    one loaded the promoted version, and one server answered with two."""
    home, record = tmp_path / "home", tmp_path / "served_model.json"
    for tag in ("first:v1", "first:v2"):
        import_model(home, build_onnx_classifier(tmp_path / tag.replace(":", "-")), tag)
    write_record(record, ReleaseRecord(model_tag="first:v1"))
    env = {"WORKERS": "2", "SERVED_MODEL_FILE": str(record)}
    with serve(home, artifacts / "server-promoted-meanwhile.log", env=env) as s:
        write_record(record, ReleaseRecord(model_tag="first:v2", history=["first:v1"]))
        os.kill(worker_pids(s.process.pid)[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not _replaced_and_ready(s.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        versions = Counter(
            httpx.post(
                f"{s.url}/analyze", files={"image": ("d.png", digit_png)}, timeout=10
            ).json()["model"]["version"]
            for _ in range(16)
        )
        informed = {
            httpx.get(f"{s.url}/info", timeout=5).json()["model"]["version"] for _ in range(8)
        }
    assert time.monotonic() < deadline, "the killed worker was not replaced within 30 s"
    assert versions == {"v1": 16} and informed == {"v1"}, (versions, informed)


def test_a_killed_worker_is_replaced_and_the_other_keeps_answering(
    trained_store, artifacts, digit_png
):
    """SIGKILL one of two workers under load: only the requests it held fail, the survivor keeps
    answering (and /readyz with it), the worker is replaced, and /metrics and the log say so."""
    with serve(trained_store, artifacts / "server-worker-killed.log", env={"WORKERS": "2"}) as s:
        first = worker_pids(s.process.pid)
        assert len(first) == 2, first
        url = f"{s.url}/analyze"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(asyncio.run, closed_loops(url, digit_png, concurrency=4, seconds=14))
            time.sleep(3)
            killed_at = time.monotonic()
            os.kill(first[0], signal.SIGKILL)
            readyz, replaced_after = [], None
            while time.monotonic() - killed_at < 30 and replaced_after is None:
                readyz.append(_probe(f"{s.url}/readyz", since=time.monotonic() - killed_at))
                if _replaced_and_ready(s.url):
                    replaced_after = time.monotonic() - killed_at
                time.sleep(0.2)
            outcomes = load.result(timeout=60)
        now = worker_pids(s.process.pid)
        log = s.log()

    failed = [o for o in outcomes if o.status != 200]
    assert replaced_after is not None, "not replaced and ready within 30 s"
    measured(
        f"worker killed (SIGKILL, 1 of 2, 4 clients): {len(outcomes)} requests, {len(failed)} "
        f"failed (all in the killed worker at the time), replaced and ready after "
        f"{replaced_after:.1f} s; /readyz {set(readyz)} meanwhile",
        doc="operations",
    )
    assert len(now) == 2 and first[0] not in now and first[1] in now, (first, now)
    assert len(failed) <= 4, failed  # at most one in-flight request per client
    assert all(o.started < killed_at + 0.05 for o in failed), (killed_at, failed)
    assert [o for o in outcomes if o.started > killed_at + 0.05 and o.status == 200]
    assert set(readyz) <= {200, "reset at once"}, readyz
    assert f"worker {first[0]} died without shutting down" in log


def test_a_reload_replaces_every_worker_without_counting_a_death(trained_store, artifacts):
    """SIGHUP to `bentoml serve` (its process manager's reload): every worker drains and exits,
    and new ones start. Their start counted the drained ones as dead, and the alert on
    image_classifier_workers_replaced_total fired for a reload (a review)."""
    with serve(trained_store, artifacts / "server-reloaded.log", env={"WORKERS": "2"}) as s:
        first = set(worker_pids(s.process.pid))
        os.kill(s.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not (len(now := set(worker_pids(s.process.pid))) == 2 and not now & first):
            assert time.monotonic() < deadline, (first, now)
            time.sleep(0.2)
        while True:
            with contextlib.suppress(httpx.TransportError):  # (refused while the sockets move)
                if httpx.get(f"{s.url}/readyz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "not ready again within 60 s of the reload"
            time.sleep(0.2)
        metrics_text = httpx.get(f"{s.url}/metrics", timeout=5).text
        log = s.log()
    assert log.count("SIGTERM: taking no new work") == 2, log[-3000:]  # drained: a reload
    assert metric_value(metrics_text, "image_classifier_workers_replaced_total") == 0
    assert "died without shutting down" not in log
