"""The BentoML service in this process: its ASGI app with lifespan, model loading and batcher."""

from __future__ import annotations

import os
import time

import pytest
from starlette.testclient import TestClient

from tests.http.responses import envelope_code
from tests.pictures import encode


@pytest.fixture(scope="module")
def client(trained_store):
    # No gRPC here: in this process it would bind the default port, whoever else holds it.
    os.environ["GRPC_PORT"] = "0"  # read when service.py is imported
    try:
        from service import ImageClassifier
    finally:
        del os.environ["GRPC_PORT"]

    with TestClient(ImageClassifier.to_asgi(), raise_server_exceptions=False) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.1)
        yield test_client


def test_analyze_answers_with_the_card_labels(client, heldout):
    image, label = heldout[0]
    files = {"image": ("d.png", encode(image, "PNG"), "image/png")}
    response = client.post("/analyze", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert body["prediction"]["label"] == str(label)
    assert body["model"] == {"name": "digits-cnn", "version": "v1"}
    assert len(body["prediction"]["top_k"]) == 3


def test_batch_isolates_bad_items(client, heldout):
    (first, first_label), (second, second_label) = heldout[1], heldout[2]
    files = [
        ("images", ("a.png", encode(first, "PNG"), "image/png")),
        ("images", ("b.jpg", b"<html>not an image</html>", "image/jpeg")),
        ("images", ("c.png", encode(second, "PNG")[:40], "image/png")),
        ("images", ("d.jpg", encode(second, "JPEG", quality=95), "image/jpeg")),
    ]
    response = client.post("/analyze_batch", files=files, data={"top_k": "2"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["success"] for r in results] == [True, False, False, True]
    assert results[0]["prediction"]["label"] == str(first_label)
    assert results[3]["prediction"]["label"] == str(second_label)
    assert results[1]["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert results[2]["error"]["code"] == "INVALID_IMAGE"
    assert "error" not in results[0] and "prediction" not in results[1]
    assert [r["filename"] for r in results] == ["a.png", "b.jpg", "c.png", "d.jpg"]


def test_info_describes_the_model(client):
    info = client.get("/info").json()
    assert info["labels"] == [str(d) for d in range(10)]
    assert info["metrics"]["accuracy"] >= 0.97
    assert info["preprocessing"]["input_size"] == [28, 28]
    assert info["batching"]["enabled"] is True


def test_errors_come_in_the_envelope(client):
    response = client.post("/analyze", files={"image": ("x.png", b"", "image/png")})
    assert response.status_code == 422
    assert envelope_code(response) == "INVALID_IMAGE"
