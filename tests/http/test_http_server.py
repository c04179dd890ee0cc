"""A real `bentoml serve` of the trained default model, over HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

from image_classifier.core.classifier import Classifier
from image_classifier.core.preprocessing import preprocess
from image_classifier.serving.settings import Settings
from loadtest.h2load import h2load
from loadtest.load import raw_multipart
from loadtest.servers import serve, worker_pids
from tests.http.responses import access_lines, assert_no_traceback, envelope_code, metric_value
from tests.pictures import encode, png_claiming


@pytest.fixture(scope="module")
def offline_labels(default_model_dir, heldout) -> list[str]:
    """What ONNX Runtime says for each held-out picture, with no server in between."""
    model = Classifier(default_model_dir)
    batch = [preprocess(image, model.card.preprocessing) for image, _ in heldout]
    return [model.labels[i] for i in model.run(batch).argmax(axis=1)]


def analyze(url: str, data: bytes, name="digit.png", mime="image/png", **fields) -> httpx.Response:
    files = {"image": (name, data, mime)}
    return httpx.post(f"{url}/analyze", files=files, data=fields, timeout=30)


def analyze_batch(url: str, items: list[tuple[str, bytes, str]]) -> list[dict]:
    files = [("images", item) for item in items]
    response = httpx.post(f"{url}/analyze_batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def labels_via_analyze(url: str, encoded: list[bytes], mime: str) -> list[str]:
    def one(data: bytes) -> str:
        response = analyze(url, data, mime=mime)
        assert response.status_code == 200, response.text
        return response.json()["prediction"]["label"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, encoded))


def labels_via_batch(url: str, encoded: list[bytes], mime: str) -> list[str]:
    labels = []
    for start in range(0, len(encoded), 64):
        chunk = [(f"{i}", data, mime) for i, data in enumerate(encoded[start : start + 64])]
        results = analyze_batch(url, chunk)
        assert all(r["success"] for r in results), results
        labels += [r["prediction"]["label"] for r in results]
    return labels


def test_probes_and_info(server):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    info = httpx.get(f"{server.url}/info").json()
    assert info["model"] == {"name": "digits-cnn", "version": "v1"}
    assert info["metrics"]["accuracy"] >= 0.97
    assert info["limits"]["max_upload_bytes"] == 10 * 1024 * 1024
    assert info["limits"]["max_body_memory"] == 512 * 1024 * 1024
    assert info["limits"]["decoding_pixels"] == 2 * info["limits"]["max_image_pixels"]
    admission = info["admission"]  # what decides refusals, said where an operator looks
    assert (admission["auth"], admission["rate_limit"], admission["max_concurrency"]) == (
        False, "", 128,
    )  # fmt: skip
    assert admission["grpc_port"] > 0 and admission["body_timeout_s"] == 10.0
    sizing = info["sizing"]  # chosen from the CPUs this process may use, and said so
    assert sizing["workers"] >= 1 and sizing["threads"] >= sizing["model_runs"] >= 1
    assert "usable CPU(s)" in sizing["chosen_from"] and "affinity mask" in sizing["chosen_from"]
    assert sizing["gil_switch_interval_ms"] == 1.0  # in effect in the worker (Python's own: 5)
    assert sizing["thread_nice"] == 5


def _nice(pid: int, tid: int) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19, counted after the name's ")"


def test_threads_that_decode_run_below_their_event_loop(server, heldout):
    """Each worker's event loop (its main thread) keeps its priority, and the threads that
    decoded and ran the requests' images run THREAD_NICE steps below it."""
    pictures = [encode(image, "PNG") for image, _ in heldout[:40]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # so that every worker gets some
        answers = pool.map(lambda picture: analyze(server.url, picture).status_code, pictures)
        assert set(answers) == {200}
    for pid in worker_pids(server.process.pid):
        loop = _nice(pid, pid)
        nices = {_nice(pid, int(tid.name)) for tid in Path(f"/proc/{pid}/task").iterdir()}
        assert min(19, loop + 5) in nices and loop == min(nices), (pid, loop, nices)


def test_png_predictions_equal_offline_onnx(server, heldout, offline_labels):
    encoded = [encode(image, "PNG") for image, _ in heldout]
    assert labels_via_analyze(server.url, encoded, "image/png") == offline_labels
    assert labels_via_batch(server.url, encoded, "image/png") == offline_labels


def test_jpeg_accuracy(server, heldout):
    encoded = [encode(image.convert("RGB"), "JPEG", quality=85) for image, _ in heldout]
    truth = [str(label) for _, label in heldout]
    for labels in (
        labels_via_analyze(server.url, encoded, "image/jpeg"),
        labels_via_batch(server.url, encoded, "image/jpeg"),
    ):
        accuracy = np.mean([a == b for a, b in zip(labels, truth, strict=True)])
        assert accuracy >= 0.97, accuracy


@pytest.mark.parametrize(
    ("fmt", "mime", "options"),
    [
        ("HEIF", "image/heic", {"quality": 90}),
        ("AVIF", "image/avif", {"quality": 90}),
        ("MPO", "image/jpeg", {"save_all": True, "append_images": [Image.new("RGB", (8, 8))]}),
    ],
)
def test_phone_camera_formats_are_classified(server, heldout, fmt, mime, options):
    """HEIC (iPhone default), AVIF, and MPO JPEGs, each with the type phones declare."""
    sample = heldout[:40]
    encoded = [encode(image.convert("RGB"), fmt, **options) for image, _ in sample]
    labels = labels_via_batch(server.url, encoded, mime)
    accuracy = np.mean(
        [label == str(truth) for label, (_, truth) in zip(labels, sample, strict=True)]
    )
    assert accuracy >= 0.95, (fmt, labels)


def test_concurrent_requests_share_model_runs(trained_store, artifacts, heldout):
    """Images queue for the model while every run is busy, and the next run takes them all: with
    one run at a time and eight threads, 32 clients' images need fewer runs than images.

    Load from h2load: a Python client sends too slowly to keep a tiny model's runs busy (with 32
    threads, once in CI, not one of 64 images found a run in progress). One worker: the batcher is
    per worker. No cache: every image is run."""
    env = {"MODEL_RUNS": "1", "THREADS": "8", "WORKERS": "1", "CACHE_SIZE": "0"}
    picture = encode(heldout[0][0], "PNG")
    body, content_type = raw_multipart([("image", "d.png", "image/png", picture)])
    with serve(trained_store, artifacts / "server-batching.log", env=env) as server:
        metrics_url = f"{server.url}/metrics"
        before = metric_value(httpx.get(metrics_url).text, "image_classifier_model_runs_total")
        run = h2load(f"{server.url}/analyze", body, content_type, connections=32, seconds=3)
        runs = metric_value(httpx.get(metrics_url).text, "image_classifier_model_runs_total")
        log = server.log()
    assert run.unanswered == 0 and {o.status for o in run.outcomes} == {200}
    # Every image the server answered (h2load stops counting at its deadline) and its run's size.
    shared = [line["batch_size"] for line in access_lines(log) if line["endpoint"] == "/analyze"]
    assert len(shared) >= len(run.outcomes) > 0
    assert 0 < runs - before < len(shared), (before, runs, len(shared))
    assert max(shared) > 1


def test_requests_leave_no_garbage_for_the_collector(server, heldout):
    """A request's objects are freed as it ends, not left in reference cycles for the garbage
    collector: each collection holds its worker's event loop, refusals included, and is as long
    as the garbage it walks. When the transport wrapper of http/protocol.py held its request
    strongly, every request left its objects in a cycle. The collector must have run during
    the requests (the pause histogram counts its runs), or finding nothing proves nothing."""
    requests = 600
    pictures = [encode(image, "PNG") for image, _ in heldout]
    pictures = (pictures * 2)[:requests]
    published_s = 1.5  # the workers move their collections to /metrics each second
    time.sleep(published_s)
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    with httpx.Client(base_url=server.url, timeout=30) as client:  # one connection, kept alive
        for picture in pictures:
            files = {"image": ("digit.png", picture, "image/png")}
            assert client.post("/analyze", files=files).status_code == 200
    time.sleep(published_s)
    after = httpx.get(f"{server.url}/metrics", timeout=10).text

    def grew(name: str) -> float:
        return metric_value(after, name) - metric_value(before, name)

    collections = grew("image_classifier_gc_pause_seconds_count")
    collected = grew("image_classifier_gc_collected_objects_total")
    # At least two, so that the window holds the garbage between two collections: with cycles
    # left, gen-0's threshold (700 objects net) alone sets one off every ~90 requests, each finding
    # ~700 objects. (5 in a run of this whole file: how many depends on the tests before it.)
    assert collections >= 2, collections
    # Fewer than one object a request (4 to 34 for 300 in runs, connections' ends among them, where
    # the strong reference left 4,757 for 300).
    assert collected < len(pictures), (collected, collections)


def test_sync_http_client(server, heldout, tmp_path):
    paths = []
    for index, (image, _) in enumerate(heldout[:3]):
        path = tmp_path / f"digit{index}.png"
        image.save(path)
        paths.append(path)
    with bentoml.SyncHTTPClient(server.url) as client:
        single = client.analyze(image=paths[0], top_k=2)
        batch = client.analyze_batch(images=paths)
        # The client sends JSON null for an optional left at None: the default (it was a 400).
        unset = client.analyze(image=paths[0], top_k=None)
    assert single["prediction"]["label"] == str(heldout[0][1])
    assert len(single["prediction"]["top_k"]) == 2
    assert len(unset["prediction"]["top_k"]) == Settings.default_top_k
    assert [r["prediction"]["label"] for r in batch["results"]] == [str(d) for _, d in heldout[:3]]


def test_an_upload_over_the_cap_gets_its_413_not_a_reset(server, tmp_path):
    """Answered before its body is all in, the connection lingers: bentoml.AsyncHTTPClient,
    still sending when the 413 comes, read a reset (an empty ReadError) every time before."""
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (11 * 1024 * 1024))

    async def upload() -> str:
        async with bentoml.AsyncHTTPClient(server.url) as client:
            try:
                await client.analyze(image=big)
            except bentoml.exceptions.BentoMLException as error:
                return f"{error.error_code} {error}"
        return "200"

    for _ in range(4):
        answer = asyncio.run(upload())
        assert answer.startswith("413") and "PAYLOAD_TOO_LARGE" in answer, answer


def test_request_id_round_trip(server, heldout):
    data = encode(heldout[0][0], "PNG")
    given = httpx.post(
        f"{server.url}/analyze",
        files={"image": ("d.png", data, "image/png")},
        headers={"X-Request-ID": "trace-42.a_b"},
    )
    assert given.headers["x-request-id"] == "trace-42.a_b" == given.json()["request_id"]
    unsafe = httpx.post(
        f"{server.url}/analyze", files={"image": ("", b"", "")}, headers={"X-Request-ID": "a b"}
    )
    assert unsafe.headers["x-request-id"] != "a b"
    assert unsafe.json()["request_id"] == unsafe.headers["x-request-id"]


def _real_error_requests(png: bytes) -> list[tuple[str, dict, int, str]]:
    return [
        ("/analyze", {"files": {"file": ("d.png", png, "image/png")}}, 400, "INVALID_REQUEST"),
        ("/analyze", {"files": {"image": ("d.png", png)}, "data": {"top_k": "x"}}, 400,
         "INVALID_REQUEST"),
        ("/analyze", {"files": {"image": ("d.png", png)}, "data": {"top_k": "11"}}, 400,
         "INVALID_REQUEST"),
        ("/analyze", {"files": [("image", ("a.png", png)), ("image", ("b.png", png))]}, 400,
         "INVALID_REQUEST"),
        ("/analyze", {"files": {"image": ("big.png", b"\0" * (10 * 1024 * 1024 + 1))}}, 413,
         "PAYLOAD_TOO_LARGE"),
        ("/analyze", {"files": {"image": ("x.jpg", b"<html>hi</html>", "image/jpeg")}}, 415,
         "UNSUPPORTED_MEDIA_TYPE"),
        ("/analyze", {"files": {"image": ("d.png", png, "image/jpeg")}}, 415,
         "UNSUPPORTED_MEDIA_TYPE"),
        ("/analyze", {"json": {"image": "http://127.0.0.1:1/x.png"}}, 415,
         "UNSUPPORTED_MEDIA_TYPE"),
        ("/analyze", {"files": {"image": ("t.png", png[: len(png) // 2], "image/png")}}, 422,
         "INVALID_IMAGE"),
        ("/analyze", {"files": {"image": ("e.png", b"", "image/png")}}, 422, "INVALID_IMAGE"),
        ("/analyze", {"files": {"image": ("bomb.png", png_claiming(50_000, 50_000))}}, 422,
         "IMAGE_TOO_LARGE"),
        ("/analyze_batch", {"files": [("images", ("a.png", png))] * 65}, 413,
         "PAYLOAD_TOO_LARGE"),
        ("/nowhere", {}, 404, "NOT_FOUND"),
    ]  # fmt: skip


def test_every_error_code_from_real_requests(server, heldout):
    png = encode(heldout[0][0], "PNG")
    for path, kwargs, status, code in _real_error_requests(png):
        response = httpx.post(f"{server.url}{path}", timeout=30, **kwargs)
        assert response.status_code == status, (path, code, response.text)
        assert envelope_code(response) == code
        assert "Traceback" not in response.text
    assert httpx.get(f"{server.url}/analyze").status_code == 405


def test_server_logged_no_tracebacks_for_client_errors(server):
    assert_no_traceback(server.log())


def test_readme_curl_example_shape(server, heldout, tmp_path):
    """The README's curl line, as a user types it (curl guesses the type from the name)."""
    import subprocess

    path = Path(tmp_path) / "digit.png"
    heldout[0][0].save(path)
    out = subprocess.run(
        ["curl", "-s", "-F", f"image=@{path}", f"{server.url}/analyze"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert '"success":true' in out.stdout.replace(" ", ""), out.stdout


@pytest.mark.parametrize(
    "path",
    ["/info", "/ui", "/v2", "/v2/health/ready", "/v2/models/digits-cnn/versions/v1/config",
     "/livez", "/metrics"],
)  # fmt: skip
def test_head_answers_every_get_route_like_get_without_a_body(server, path):
    """RFC 9110 9.3.2: monitors and link checkers send HEAD; a 405 reads as a broken route."""
    got = httpx.get(f"{server.url}{path}")
    head = httpx.head(f"{server.url}{path}")
    assert got.status_code == 200 and head.status_code == 200, head.headers
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/analyze", {"POST"}), ("PUT", "/analyze_batch", {"POST"}),
     ("POST", "/livez", {"GET", "HEAD"}), ("DELETE", "/info", {"GET", "HEAD"}),
     ("POST", "/ui", {"GET", "HEAD"}), ("POST", "/v2/models/digits-cnn", {"GET", "HEAD"}),
     ("GET", "/v2/models/digits-cnn/infer", {"POST"})],
)  # fmt: skip
def test_a_method_a_route_does_not_take_gets_405_saying_which_it_takes(
    server, method, path, allowed
):
    """RFC 9110 15.5.6: a 405 names the methods the route takes (`Allow`), in the route's error
    shape (the envelope, or Open Inference's `{"error": "CODE: message"}` under /v2)."""
    response = httpx.request(method, f"{server.url}{path}")
    assert response.status_code == 405, response.text
    # With HEAD wherever GET is: Starlette named only the first matching route's (GET's) methods.
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    if path.startswith("/v2/"):
        assert response.json()["error"].startswith("METHOD_NOT_ALLOWED: "), response.text
    else:
        assert envelope_code(response) == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/info/"), ("GET", "/v2/"), ("POST", "/analyze/"), ("GET", "/ui/")]
)
def test_a_path_with_a_slash_too_many_is_a_404_not_a_redirect_to_the_hosts_header(
    server, method, path
):
    """Starlette answered a 307 to the other spelling on the client's own Host header
    (`Location: http://evil.example/info`): cache poisoning behind a shared cache."""
    response = httpx.request(method, f"{server.url}{path}", headers={"Host": "evil.example"})
    assert response.status_code == 404, (response.status_code, response.headers)
    assert "location" not in response.headers
    assert response.headers["x-error-code"] == "NOT_FOUND", response.text  # /v2: its own shape


def test_top_k_in_the_query_string_is_honoured_and_other_parameters_refused(server, heldout):
    """`?top_k=2` is what users try first: it counts like the form field, not silently ignored."""
    png = encode(heldout[0][0], "PNG")
    image = {"image": ("d.png", png, "image/png")}

    def top_k_of(query: str, **fields) -> int:
        response = httpx.post(f"{server.url}/analyze?{query}", files=image, data=fields)
        assert response.status_code == 200, response.text
        return len(response.json()["prediction"]["top_k"])

    assert top_k_of("top_k=2") == 2
    assert top_k_of("top_k=2", top_k="2") == 2
    batch = httpx.post(
        f"{server.url}/analyze_batch?top_k=1", files=[("images", ("a.png", png))] * 2, timeout=30
    )
    assert [len(r["prediction"]["top_k"]) for r in batch.json()["results"]] == [1, 1]
    for path, query, fields, named in [
        ("/analyze", "top_k=2", {"top_k": "3"}, "different values"),
        ("/analyze", "top_k=x", {}, "must be an integer"),
        ("/analyze", "top_k=11", {}, "top_k"),
        ("/analyze", "top_k=99999999999", {}, "between 1 and 10, got 99999999999"),
        ("/analyze", "topk=2", {}, "'topk'"),
        ("/analyze_batch", "model=v1", {}, "'model'"),
    ]:
        files = image if path == "/analyze" else [("images", ("a.png", png))]
        response = httpx.post(f"{server.url}{path}?{query}", files=files, data=fields)
        assert response.status_code == 400, (query, response.text)
        assert envelope_code(response) == "INVALID_REQUEST"
        assert named in response.json()["error"]["message"], response.text


def test_a_multipart_preamble_is_skipped(server, heldout):
    """RFC 2046 lets a body say something before its first boundary (some curl, PHP and Java
    clients do)."""
    png = encode(heldout[0][0], "PNG")
    body, content_type = raw_multipart([("image", "d.png", "image/png", png)])
    preamble = b"This is a multi-part message in MIME format.\r\n"
    response = httpx.post(
        f"{server.url}/analyze", content=preamble + body, headers={"content-type": content_type}
    )
    assert response.status_code == 200, response.text
    assert response.json()["prediction"]["label"] == str(heldout[0][1])


def test_a_part_declared_image_star_is_judged_by_its_bytes(server, heldout):
    """`image/*` says only "an image" (some browsers' and phones' pickers send it): the bytes
    decide, as for application/octet-stream."""
    png = encode(heldout[0][0], "PNG")
    assert analyze(server.url, png, mime="image/*").status_code == 200
    not_an_image = analyze(server.url, b"<html>hi</html>", mime="image/*")
    assert not_an_image.status_code == 415, not_an_image.text
    assert envelope_code(not_an_image) == "UNSUPPORTED_MEDIA_TYPE"
