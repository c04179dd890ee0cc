"""Operating a real server with two workers, a candidate version beside the served one, canary
and shadow traffic: metrics merged across workers and labelled by version, the drift alarm, and
one JSON log line per request."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpc_client
import yaml
from PIL import Image, PngImagePlugin

from image_classifier.serving.release_record import ReleaseRecord, write_record
from loadtest.servers import REPO, serve
from tests.figures import measured
from tests.http.responses import access_lines as access_log_lines
from tests.http.responses import envelope_code, metric_names
from tests.pictures import encode

TOKEN = "ops-test-token-5f1c9a"
DRIFT_WINDOW = 30
CANARY_FRACTION = 0.3
MARKER = "PIXEL-MARKER-93b1e4"  # hidden in an uploaded file: must never reach the log
SENT: list[dict] = []  # every request the tests made: the log test finds each one


@pytest.fixture(scope="module")
def ops_server(trained_store, second_version, artifacts, tmp_path_factory):
    record = tmp_path_factory.mktemp("ops") / "served_model.json"
    write_record(record, ReleaseRecord(model_tag="digits-cnn:v1", candidate_tag=second_version))
    env = {
        "WORKERS": "2",
        "SERVED_MODEL_FILE": str(record),
        "CANARY_FRACTION": str(CANARY_FRACTION),
        "SHADOW_FRACTION": "0.5",
        "DRIFT_WINDOW": str(DRIFT_WINDOW),
        "API_TOKENS": TOKEN,
    }
    with serve(trained_store, artifacts / "ops-server.log", env=env) as server:
        yield server


def post(server, data: bytes, pin: str | None = None, token: str = TOKEN) -> httpx.Response:
    """A fresh connection per request, so the kernel may hand it to either worker."""
    headers = {"Authorization": f"Bearer {token}"}
    if pin:
        headers["X-Model-Version"] = pin
    files = {"image": ("picture.png", data, "image/png")}
    response = httpx.post(f"{server.url}/analyze", files=files, headers=headers, timeout=30)
    SENT.append({
        "request_id": response.headers["x-request-id"],
        "status": response.status_code,
        "version": response.headers.get("x-model-version"),
        "body": response.json(),
    })  # fmt: skip
    return response


def scrape(server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def samples(metrics_text: str, name: str) -> dict[str, float]:
    """Label set -> value for one metric (labels as their raw text)."""
    found = {}
    for line in metrics_text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            found[labels] = float(value)
    return found


def total(metrics_text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples whose label text contains `labels`."""
    return sum(v for k, v in samples(metrics_text, name).items() if labels in k)


def access_lines(server) -> list[dict]:
    return access_log_lines(server.log())


def test_metrics_are_whole_across_two_workers_and_labelled_by_version(ops_server, heldout):
    deadline = time.monotonic() + 60  # /readyz answered by one worker: the other may be loading
    while set((ready := samples(scrape(ops_server), "image_classifier_ready")).values()) != {1.0}:
        assert time.monotonic() < deadline, ready
        time.sleep(0.2)
    assert len(ready) == 2, ready  # one series per worker pid
    before = scrape(ops_server)
    answered = Counter()
    for image, _ in heldout[:120]:
        response = post(ops_server, encode(image, "PNG"))
        assert response.status_code == 200, response.text
        version = response.json()["model"]["version"]
        assert response.headers["x-model-version"] == version  # header and body agree
        answered[version] += 1
    workers = {line["component"] for line in access_lines(ops_server)}
    assert len(workers) == 2, f"all requests reached one worker: {workers}"
    time.sleep(0.5)  # shadow scoring runs after the answers
    after = scrape(ops_server)

    def grew(name: str, labels: str) -> float:
        return total(after, name, labels) - total(before, name, labels)

    for version in ("v1", "v2"):  # nothing lost between the two workers' metric files
        by_version = f'model_version="{version}"'
        assert grew("image_classifier_predictions_total", by_version) == answered[version]
        assert grew("image_classifier_top1_confidence_count", by_version) == answered[version]
    served_ok = 'endpoint="/analyze",http_response_code="200"'
    assert grew("bentoml_service_request_total", served_ok) == 120
    share = answered["v2"] / 120
    assert 0.15 <= share <= 0.45, answered  # CANARY_FRACTION 0.3, 120 draws: ±3.5 sd
    shadow = samples(after, "image_classifier_shadow_comparisons_total")
    agreed = sum(v for k, v in shadow.items() if 'agreed="true"' in k)
    assert agreed > 0 and agreed == sum(shadow.values()), shadow  # same weights: always agree
    info = samples(after, "image_classifier_model_info")
    assert set(info) == {
        'name="digits-cnn",role="primary",version="v1"',
        'name="digits-cnn",role="candidate",version="v2"',
    }, info
    measured(
        f"operations: 2 workers, 120 requests: {answered['v1']} by v1, {answered['v2']} by the "
        f"v2 canary ({share:.0%} for CANARY_FRACTION {CANARY_FRACTION}); {agreed:.0f} shadowed, "
        f"all agreeing; metrics matched exactly",
        doc="operations",
    )


def test_a_request_pins_a_version_and_an_unknown_one_is_refused(ops_server, heldout):
    data = encode(heldout[0][0], "PNG")
    for _ in range(5):
        response = post(ops_server, data, pin="v2")
        assert response.status_code == 200 and response.json()["model"]["version"] == "v2"
    response = post(ops_server, data, pin="digits-cnn:v1")
    assert response.json()["model"]["version"] == "v1"
    response = post(ops_server, data, pin="v7")
    assert response.status_code == 404 and envelope_code(response) == "UNKNOWN_MODEL_VERSION"
    # Two different pins: the first was served, silently (a black-box review). One pin twice
    # is still one.
    for pins, status in [(("v1", "v2"), 400), (("v2", "v2"), 200)]:
        response = httpx.post(
            f"{ops_server.url}/analyze",
            files={"image": ("d.png", data, "image/png")},
            headers=[("authorization", f"Bearer {TOKEN}"), *(("x-model-version", p) for p in pins)],
        )
        assert response.status_code == status, response.text
        if status == 400:
            assert envelope_code(response) == "INVALID_REQUEST"


def _out_of_distribution(count: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    pictures = []
    for i in range(count):
        if i % 5 == 4:
            pictures.append(encode(Image.new("L", (96, 96), int(rng.integers(0, 256))), "PNG"))
        else:
            noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            pictures.append(encode(Image.fromarray(noise), "PNG"))
    return pictures


def _alarm(server, version: str) -> float:
    return samples(scrape(server), "image_classifier_drift_alarm")[f'model_version="{version}"']


def test_drift_alarm_rises_on_noise_and_blanks_not_on_digits(ops_server, heldout):
    # Twice the window on fresh connections: whichever way they split, a worker's window fills.
    for image, _ in heldout[200 : 200 + 2 * DRIFT_WINDOW]:
        assert post(ops_server, encode(image, "PNG"), pin="v1").status_code == 200
    assert _alarm(ops_server, "v1") == 0
    change = samples(scrape(ops_server), "image_classifier_drift_relative_change")
    in_distribution = change['model_version="v1"']
    assert in_distribution > -0.05, change
    for data in _out_of_distribution(2 * DRIFT_WINDOW):
        assert post(ops_server, data, pin="v1").status_code == 200
    assert _alarm(ops_server, "v1") == 1
    assert _alarm(ops_server, "v2") == 0  # the candidate's answers were not the odd ones
    drifted = total(scrape(ops_server), "image_classifier_drift_relative_change", '"v1"')
    measured(
        f"drift: rolling-mean change {in_distribution:+.1%} on held-out digits (no alarm), "
        f"{drifted:+.1%} on noise/blank pictures (alarm)",
        doc="operations",
    )


def test_every_log_line_is_json_and_each_request_has_one_access_line(ops_server, heldout):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARKER)
    marked = heldout[1][0].copy()
    buffer = encode(marked, "PNG", pnginfo=info)
    assert MARKER.encode() in buffer
    assert post(ops_server, buffer).status_code == 200
    assert post(ops_server, buffer, token="wrong-token-77e2").status_code == 401
    assert post(ops_server, b"not an image at all").status_code == 415
    time.sleep(0.3)

    raw = ops_server.log()
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]  # raises if not JSON
    assert all({"timestamp", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("bentoml") for line in lines)  # BentoML's own, as JSON
    assert TOKEN not in raw and "wrong-token-77e2" not in raw and MARKER not in raw
    by_id = {}
    for line in access_lines(ops_server):
        assert line["request_id"] not in by_id, f"two access lines for {line['request_id']}"
        by_id[line["request_id"]] = line
    for sent in SENT:
        line = by_id[sent["request_id"]]
        assert line["endpoint"] == "/analyze" and line["status"] == sent["status"]
        assert line["latency_ms"] > 0
        if sent["status"] == 200:
            prediction = sent["body"]["prediction"]
            assert line["model_version"] == sent["version"]
            assert line["label"] == prediction["label"]
            assert line["confidence"] == pytest.approx(prediction["confidence"])
            assert line["batch_size"] >= 1 and "error_code" not in line
        else:
            assert line["error_code"] == sent["body"]["error"]["code"]
    refused = by_id[SENT[-2]["request_id"]]
    assert refused["error_code"] == "UNAUTHORIZED" and refused["level"] == "INFO"
    measured(
        f"logs: {len(lines)} JSON lines, {len(by_id)} access lines, every request found",
        doc="operations",
    )


def test_batches_are_shadowed_and_open_inference_calls_logged_with_their_version(
    ops_server, heldout
):
    """Found by a black-box review: /analyze_batch pictures took a path of their own past the
    cache and shadow scoring (0 comparisons for 10 pictures at SHADOW_FRACTION 1), and Open
    Inference access lines, HTTP and gRPC, named no model version."""
    auth = {"authorization": f"Bearer {TOKEN}"}
    pictures = [encode(image, "PNG") for image, _ in heldout[20:40]]
    before = total(scrape(ops_server), "image_classifier_shadow_comparisons_total")
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(pictures)]
    headers = {**auth, "X-Model-Version": "v1"}  # the primary, which the candidate shadows
    response = httpx.post(
        f"{ops_server.url}/analyze_batch", files=files, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    grown = 0.0
    for _ in range(50):  # shadow scoring runs after the answer
        grown = total(scrape(ops_server), "image_classifier_shadow_comparisons_total") - before
        if grown:
            break
        time.sleep(0.1)
    assert 0 < grown <= len(pictures)  # SHADOW_FRACTION 0.5 of 20: none at all has odds 1e-6

    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(pictures[0]).decode()]}]}  # fmt: skip
    url = f"{ops_server.url}/v2/models/digits-cnn"
    rest = httpx.post(f"{url}/infer", json=body, headers={**auth, "x-request-id": "oip-log-1"})
    assert rest.status_code == 200, rest.text
    with grpc_client.InferenceServerClient(ops_server.grpc_target) as client:
        tensor = grpc_client.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([pictures[0]], dtype=object))
        called = client.infer("digits-cnn", [tensor], headers={**auth, "x-request-id": "oip-log-2"})
    # A version in the path and another pinned in the header: refused, not one silently chosen.
    conflict = httpx.post(
        f"{url}/versions/v1/infer", json=body, headers={**auth, "X-Model-Version": "v2"}
    )
    assert conflict.status_code == 400 and "the pin" in conflict.json()["error"], conflict.text
    time.sleep(0.3)
    logged = {line["request_id"]: line for line in access_lines(ops_server)}
    assert logged["oip-log-1"]["model_version"] == rest.json()["model_version"]
    assert logged["oip-log-2"]["model_version"] == called.get_response().model_version


def test_probes_are_not_access_logged(ops_server):
    before = len(access_lines(ops_server))
    for path in ("/readyz", "/livez", "/metrics"):
        assert httpx.get(f"{ops_server.url}{path}", timeout=10).status_code == 200
    assert len(access_lines(ops_server)) == before


def listening_sockets(port: int) -> int:
    """How many sockets listen on a loopback port: the kernel's own table."""
    hex_port = f":{port:04X}"
    rows = [row.split() for table in ("tcp", "tcp6")
            for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]]  # fmt: skip
    return sum(row[1].endswith(hex_port) and row[3] == "0A" for row in rows)  # 0A: LISTEN


def test_keep_alive_clients_end_up_evenly_spread_over_both_workers(ops_server, heldout):
    """16 keep-alive clients, as in the benchmark. BentoML's arbiter shares one listening socket
    and the worker on a CPU could accept every connection while the other idled; here each
    worker listens on its own (SO_REUSEPORT), the kernel hashes connections over them (11 and 5
    happens), and a worker holding more than its share closes one at a time until each holds 8
    (http/balance.py)."""
    port = int(ops_server.url.rsplit(":", 1)[1])
    assert listening_sockets(port) == 2  # one per worker; BentoML alone: 1 shared
    picture = encode(heldout[2][0], "PNG")
    files = {"image": ("picture.png", picture, "image/png")}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    start = threading.Barrier(16)

    def one_client(_: int) -> list[str]:
        """The request id of each answer."""
        sent = []
        with httpx.Client(base_url=ops_server.url, headers=headers, timeout=30) as client:
            start.wait(timeout=60)  # the 16 connections open together, as a load generator's do
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                answer = client.post("/analyze", files=files)
                assert answer.status_code == 200, answer.text
                sent.append(answer.headers["x-request-id"])
        return sent

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        clients = list(pool.map(one_client, range(16)))
    time.sleep(0.3)
    worker_of = {line["request_id"]: line["component"] for line in access_lines(ops_server)}
    hashed = Counter(worker_of[ids[0]] for ids in clients)  # where the kernel put them
    balanced = Counter(worker_of[ids[-1]] for ids in clients)  # where they ended
    moved = sum(len({worker_of[request] for request in ids}) > 1 for ids in clients)
    requests = Counter(worker_of[request] for ids in clients for request in ids)
    measured(
        f"2 workers, 16 keep-alive clients for 6 s: connections per worker as the kernel hashed "
        f"them {sorted(hashed.values(), reverse=True)}, at the end "
        f"{sorted(balanced.values(), reverse=True)} ({moved} clients moved); requests per "
        f"worker {sorted(requests.values(), reverse=True)}",
        doc="operations",
    )
    assert sorted(balanced.values()) == [8, 8], balanced


# Monitoring as code (deploy/monitoring): the rules parse and pass their unit tests, the
# dashboard's queries parse, and every metric either uses exists on this live server.

MONITORING = REPO / "deploy" / "monitoring"
_METRIC_NAME = re.compile(r"\b((?:image_classifier|bentoml_service)_[a-z0-9_]+)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("promtool"), "promtool missing: `make test` installs Debian's prometheus"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alert_rules_parse_and_pass_their_unit_tests():
    checked = promtool("check", "rules", str(MONITORING / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(MONITORING / "alerts.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_dashboard_queries_parse(tmp_path):
    queries = dashboard_queries()
    recorded = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_model_metadata_lists_both_versions_and_never_draws_the_canary(ops_server):
    """Metadata, config and ready describe the model: the canary draw applied to them, so the
    metadata named v1 or v2 at random, and never both (a black-box review's finding)."""
    auth = {"authorization": f"Bearer {TOKEN}"}
    with grpc_client.InferenceServerClient(ops_server.grpc_target) as client:
        over_grpc = [
            list(client.get_model_metadata("digits-cnn", headers=auth).versions) for _ in range(12)
        ]
    over_http = [
        httpx.get(f"{ops_server.url}/v2/models/digits-cnn", headers=auth).json()["versions"]
        for _ in range(12)
    ]
    assert over_http == over_grpc == [["v1", "v2"]] * 12, (over_http, over_grpc)


def test_every_metric_the_rules_and_dashboard_use_exists_live(ops_server, heldout):
    data = encode(heldout[2][0], "PNG")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    batch = [("images", ("ok.png", data, "image/png")), ("images", ("bad.png", b"x", "image/png"))]
    response = httpx.post(f"{ops_server.url}/analyze_batch", files=batch, headers=headers)
    assert response.status_code == 200, response.text
    for _ in range(40):  # until the candidate has shadowed an answer (SHADOW_FRACTION 0.5)
        post(ops_server, data)
        if "image_classifier_shadow_comparisons_total{" in scrape(ops_server):
            break
    with grpc_client.InferenceServerClient(ops_server.grpc_target) as client:  # a gRPC call too
        client.get_model_metadata("digits-cnn", headers={"authorization": f"Bearer {TOKEN}"})
    live = metric_names(scrape(ops_server))
    rules_text = (MONITORING / "alerts.yml").read_text()
    used = set(_METRIC_NAME.findall(rules_text + "\n".join(dashboard_queries())))
    assert len(used) >= 10, used
    missing = {name for name in used if name not in live}
    assert not missing, f"referenced but not on /metrics: {sorted(missing)}"


def test_request_metrics_are_labelled_by_route_not_by_made_up_paths(ops_server):
    # BentoML labelled them with the raw path: each made-up URL, even refused 401 or 404, added
    # series to /metrics for good.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=ops_server.url, timeout=10) as client:
        for i in range(25):
            assert client.get(f"/made/up/{i}").status_code == 401  # no token: refused first
            assert client.get(f"/made/up/{i}", headers=headers).status_code == 404
            unknown = client.get(f"/v2/models/made-up-{i}/ready", headers=headers)
            assert unknown.status_code == 404
            assert client.get("/v2/models/digits-cnn/ready", headers=headers).status_code == 200
    endpoints = {
        re.search(r'endpoint="([^"]*)"', labels).group(1)
        for labels in samples(scrape(ops_server), "bentoml_service_request_total")
    }
    assert {"unmatched", "/v2/models/{name}/ready", "/analyze"} <= endpoints, endpoints
    assert not any("made" in endpoint for endpoint in endpoints), endpoints
    assert len(endpoints) < 15, endpoints
