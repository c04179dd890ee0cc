"""The duplicate-input cache in a real server (tests/serving/test_cache.py: on its own)."""

from __future__ import annotations

import base64
import time

import httpx

from loadtest.servers import serve
from tests.http.responses import envelope_code, metric_value
from tests.pictures import encode


def test_a_repeated_picture_is_answered_from_the_cache(trained_store, heldout, artifacts):
    # One worker: each has its own cache (REDIS_URL shares one: tests/http/test_scale_out.py).
    env = {"CACHE_SIZE": "16", "CACHE_TTL_S": "3", "WORKERS": "1"}
    with serve(trained_store, artifacts / "cache-server.log", env=env) as server:

        def analyze(image, **form):
            files = {"image": ("d.png", encode(image, "PNG"), "image/png")}
            response = httpx.post(f"{server.url}/analyze", files=files, data=form, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        first, again = analyze(heldout[5][0]), analyze(heldout[5][0])
        assert (first["cached"], again["cached"]) == (False, True)
        assert again["prediction"] == first["prediction"]
        for declared in ("text/plain", "image/jpeg"):  # the same bytes, as what they are not
            files = {"image": ("d.png", encode(heldout[5][0], "PNG"), declared)}
            refused = httpx.post(f"{server.url}/analyze", files=files, timeout=30)
            assert refused.status_code == 415, (declared, refused.text)
            assert envelope_code(refused) == "UNSUPPORTED_MEDIA_TYPE"
        assert analyze(heldout[5][0], top_k="2")["cached"] is False  # top_k is part of the key
        assert analyze(heldout[6][0])["cached"] is False
        time.sleep(3.5)
        assert analyze(heldout[5][0])["cached"] is False  # expired
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric_value(metrics, 'image_classifier_cache_lookups_total{result="hit"}') == 1
        assert metric_value(metrics, 'image_classifier_cache_lookups_total{result="miss"}') == 4
        assert metric_value(metrics, "image_classifier_predictions_total") == 5  # hits count too
        # Open Inference images take the same cache: /analyze answered this one (top_k 1).
        answered = analyze(heldout[7][0], top_k="1")
        body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [
            base64.b64encode(encode(heldout[7][0], "PNG")).decode(),
            base64.b64encode(encode(heldout[8][0], "PNG")).decode()]}]}  # fmt: skip
        response = httpx.post(f"{server.url}/v2/models/digits-cnn/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        probabilities = response.json()["outputs"][0]["data"][:10]
        expected = [answered["prediction"]["probabilities"][str(digit)] for digit in range(10)]
        assert probabilities == expected
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric_value(metrics, 'image_classifier_cache_lookups_total{result="hit"}') == 2
        assert metric_value(metrics, 'image_classifier_cache_lookups_total{result="miss"}') == 6
