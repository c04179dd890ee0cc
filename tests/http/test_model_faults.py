"""Real servers with broken models: never a wrong answer, never a leaked detail."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
from PIL import Image

from loadtest.servers import serve
from tests.http.responses import envelope_code
from tests.model_store import import_model
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode


def post_image(url: str, image: Image.Image) -> httpx.Response:
    files = {"image": ("x.png", encode(image, "PNG"), "image/png")}
    return httpx.post(f"{url}/analyze", files=files, timeout=30)


def test_a_model_failing_on_some_inputs_fails_only_those(tmp_path, artifacts):
    home = tmp_path / "home"
    model = build_onnx_classifier(
        tmp_path / "m", fail_when_mean_below=-0.5, mean=(0.5,), std=(0.5,)
    )
    import_model(home, model, "faulty:v1")
    black, white = Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 255)
    with serve(home, artifacts / "faulty-model.log", env={"MODEL_TAG": "faulty:v1"}) as server:
        failed = post_image(server.url, black)
        assert failed.status_code == 500
        assert envelope_code(failed) == "INTERNAL_ERROR"
        for secret in ("Traceback", "onnxruntime", "Reshape", "/models/"):
            assert secret not in failed.text

        # Merged into one run with healthy requests, the poison input takes none of them down.
        pictures = [white] * 12 + [black] + [white] * 12
        with concurrent.futures.ThreadPoolExecutor(25) as pool:
            statuses = list(pool.map(lambda im: post_image(server.url, im).status_code, pictures))
        assert statuses == [200] * 12 + [500] + [200] * 12

        files = [("images", (f"{i}.png", encode(im, "PNG"), "image/png"))
                 for i, im in enumerate([white, black, white])]  # fmt: skip
        batch = httpx.post(f"{server.url}/analyze_batch", files=files, timeout=30)
        assert batch.status_code == 200
        assert [r["success"] for r in batch.json()["results"]] == [True, False, True]
        assert batch.json()["results"][1]["error"]["code"] == "INTERNAL_ERROR"
    assert "failed" in server.log()  # the operator gets the details


def test_a_corrupt_model_keeps_readiness_503_and_says_why(tmp_path, artifacts):
    home = tmp_path / "home"
    stored = import_model(home, build_onnx_classifier(tmp_path / "m"), "corrupt:v1")
    (stored / "model.onnx").write_bytes(b"\x08\x07 definitely not onnx" * 50)
    log_path = artifacts / "corrupt-model.log"
    with serve(home, log_path, env={"MODEL_TAG": "corrupt:v1"}, ready=False) as server:
        deadline = time.monotonic() + 60
        while "cannot be served" not in server.log():
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/livez").status_code == 200
        readyz = httpx.get(f"{server.url}/readyz")
        assert readyz.status_code == 503
        assert envelope_code(readyz) == "NOT_READY"
        refused = post_image(server.url, Image.new("L", (28, 28), 255))
        assert refused.status_code == 503
        assert envelope_code(refused) == "NOT_READY"
        assert refused.headers["retry-after"] == "1"
        log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if "cannot be served" in line]
    assert lines and all("corrupt:v1" in x["message"] and "training_export" in x["message"]
                         for x in lines), lines  # fmt: skip
    assert len({x["component"] for x in lines}) == len(lines), lines  # once per worker
