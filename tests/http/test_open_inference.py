"""The Open Inference Protocol v2 routes on a real server, with the protocol's own JSON shapes."""

from __future__ import annotations

import base64
import json
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from image_classifier.core.model_card import ModelCard
from image_classifier.core.preprocessing import preprocess
from tests.http.responses import open_inference_code
from tests.pictures import encode
from tests.readme import readme_block

MODEL = "digits-cnn"


@pytest.fixture(scope="module")
def card(default_model_dir) -> ModelCard:
    return ModelCard.model_validate_json((default_model_dir / "card.json").read_text())


def infer(server, body: dict, model: str = MODEL) -> httpx.Response:
    # json.dumps, not httpx's json=: a test sends NaN, which JSON clients do emit as a bare token
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=content, headers=headers, timeout=60
    )


def bytes_request(images: list[bytes], **extra) -> dict:
    data = [base64.b64encode(image).decode() for image in images]
    return {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}],
            **extra}  # fmt: skip


def test_health_and_metadata(server, card):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready").json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/v1/ready").status_code == 200
    metadata = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert metadata["name"] == MODEL and metadata["versions"] == ["v1"]
    shapes = {tensor["name"]: tensor["shape"] for tensor in metadata["inputs"]}
    assert shapes[card.input_name] == [-1, *card.preprocessing.tensor_shape]
    assert metadata["outputs"][0] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [-1, 10],
    }
    assert httpx.get(f"{server.url}/v2").json()["name"] == "image_classifier"


def test_bytes_tensor_answers_like_analyze(server, heldout):
    images = [encode(image, "PNG") for image, _ in heldout[:6]]
    response = infer(server, bytes_request(images, id="req-7"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "v1" and body["id"] == "req-7"
    outputs = {output["name"]: output for output in body["outputs"]}
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(
        outputs["probabilities"]["shape"]
    )
    assert probabilities.shape == (6, 10)
    assert outputs["label"]["data"] == [str(label) for _, label in heldout[:6]]
    for row, image in zip(probabilities, images, strict=True):
        analyzed = httpx.post(
            f"{server.url}/analyze", files={"image": ("d.png", image, "image/png")}
        ).json()["prediction"]["probabilities"]
        # Every float32 in full: the same numbers /analyze gives, not rounded ones.
        assert row.tolist() == [analyzed[str(d)] for d in range(10)]


def test_fp32_tensor_is_served_as_given(server, heldout, card):
    tensors = np.stack([preprocess(image, card.preprocessing) for image, _ in heldout[:3]])
    body = {
        "inputs": [{"name": card.input_name, "shape": list(tensors.shape), "datatype": "FP32",
                    "data": tensors.ravel().tolist()}],
        "outputs": [{"name": "label"}],
    }  # fmt: skip
    response = infer(server, body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "label"
    assert output["data"] == [str(label) for _, label in heldout[:3]]


def test_a_tensor_the_model_answers_nan_for_fails_alone_and_poisons_no_metric(server, card):
    """Finite but absurd values (3e38 per pixel) overflow the model to NaN: no answer to give,
    and the client's doing (a 500 fed the paging alert: anyone could page the operators), so an
    enveloped 400 that says why; the metrics stay numbers."""
    shape = [1, *card.preprocessing.tensor_shape]
    absurd = {"name": card.input_name, "shape": shape, "datatype": "FP32",
              "data": [3e38] * int(np.prod(shape))}  # fmt: skip
    response = infer(server, {"inputs": [absurd]})
    assert response.status_code == 400, response.text
    assert open_inference_code(response) == "INVALID_REQUEST"
    assert "NaN or infinity for this tensor" in response.json()["error"]
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        assert not line.startswith("image_classifier") or not line.endswith("NaN"), line


PNG_B64 = base64.b64encode(encode(Image.new("L", (28, 28), 255), "PNG")).decode()


def fp32(data, shape=(1, 1, 28, 28), name="input", datatype="FP32") -> dict:
    """A request with one FP32 input named as the default model's (`input`)."""
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"inputs": []}, 400, "INVALID_REQUEST", "send one input"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
         400, "INVALID_REQUEST", "not valid base64"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]},
         400, "INVALID_REQUEST", "shape [N] or [N, 1]"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                      "data": [base64.b64encode(b"<html></html>").decode()]}]},
         415, "UNSUPPORTED_MEDIA_TYPE", "item 0: not a supported image"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                      "data": [PNG_B64, base64.b64encode(b"<html></html>").decode()]}]},
         415, "UNSUPPORTED_MEDIA_TYPE", "item 1: not a supported image"),
        (fp32([0.0], shape=(1, 3, 28, 28)), 400, "INVALID_REQUEST", "shape [N, 1, 28, 28]"),
        (fp32([float("nan")] * 784), 400, "INVALID_REQUEST", "finite numbers"),
        (fp32([1e300] * 784), 400, "INVALID_REQUEST", "finite numbers"),  # past float32
        (fp32([0] * 784, datatype="INT64"), 400, "INVALID_REQUEST", "is FP32, got INT64"),
        # An integer past float's range was a 500 (found documenting the body for the fuzzer).
        (fp32([10**400] * 784), 400, "INVALID_REQUEST", "must be numbers"),
        (fp32(["0.5"] * 784), 400, "INVALID_REQUEST", "must be numbers"),
        (fp32([True] * 784), 400, "INVALID_REQUEST", "must be numbers"),
        # One true among numbers: numpy read it as 1.0, and it was classified (Triton refuses).
        (fp32([0.5] * 783 + [True]), 400, "INVALID_REQUEST", "must be numbers"),
        (fp32([0.0] * 784, name="x"), 400, "INVALID_REQUEST", "unknown input 'x'"),
        (fp32([0.0] * 784, name="image"), 400, "INVALID_REQUEST", "input 'image' is BYTES"),
        ({"inputs": [{"name": "picture", "shape": [1], "datatype": "BYTES", "data": [PNG_B64]}]},
         400, "INVALID_REQUEST", "unknown input 'picture'"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [PNG_B64]}],
          "outputs": [{"name": "label"}, {"name": "label"}]},
         400, "INVALID_REQUEST", "once"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP33", "data": [0]}]},
         400, "INVALID_REQUEST", "datatype"),
        ({"inputs": [{"name": "image", "shape": [65], "datatype": "BYTES", "data": ["aGk="] * 65}]},
         413, "PAYLOAD_TOO_LARGE", "1..64 items"),
    ],
    ids=["no-inputs", "bad-base64", "shape-mismatch", "not-an-image", "second-not-an-image",
         "wrong-fp32-shape",
         "nan", "past-float32", "int64", "huge-integer", "strings-as-fp32", "bools-as-fp32",
         "a-bool-among-fp32",
         "unknown-fp32-name", "fp32-named-image", "unknown-bytes-name", "duplicate-output",
         "not-a-datatype", "too-many"],
)  # fmt: skip
def test_bad_requests_get_enveloped_4xx(server, body, status, code, says):
    response = infer(server, body)
    assert response.status_code == status, response.text
    assert open_inference_code(response) == code
    assert says in response.json()["error"], response.text


def test_nested_bytes_for_shape_n_1_are_images_too(server, heldout):
    """The protocol lets JSON data follow the shape: [[b64], [b64]] for [2, 1]."""
    images = [base64.b64encode(encode(image, "PNG")).decode() for image, _ in heldout[:2]]
    tensor = {"name": "image", "shape": [2, 1], "datatype": "BYTES", "data": [[i] for i in images]}
    response = infer(server, {"inputs": [tensor], "outputs": [{"name": "label"}]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [str(label) for _, label in heldout[:2]]


def test_base64_as_the_base64_tool_writes_it_with_line_breaks_is_read(server, heldout):
    """`base64 FILE` wraps at 76 characters; the strict decoder refused it (a review's)."""
    wrapped = base64.encodebytes(encode(heldout[0][0], "PNG")).decode()
    assert "\n" in wrapped
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [wrapped]}
    response = infer(server, {"inputs": [tensor], "outputs": [{"name": "label"}]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [str(heldout[0][1])]


def test_unknown_model_and_version_are_404(server, heldout):
    request = bytes_request([encode(heldout[0][0], "PNG")])
    assert open_inference_code(infer(server, request, model="resnet")) == "NOT_FOUND"
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/v9/infer", json=request)
    assert response.status_code == 404 and open_inference_code(response) == "NOT_FOUND"


def test_readme_example_runs(server, heldout, tmp_path):
    """The README's Open Inference example, run as written (only the address differs)."""
    block = readme_block("oip-example", "bash")
    image, truth = heldout[4]
    image.save(tmp_path / "digit.png")
    script = block.replace("http://127.0.0.1:3000", server.url)
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    outputs = {output["name"]: output for output in json.loads(result.stdout)["outputs"]}
    assert outputs["label"]["data"] == [str(truth)]


@pytest.mark.parametrize(
    "path", [f"/v2/models/{MODEL}/extra/infer", f"/v2/models/{MODEL}/versions/v1/extra/infer"]
)
def test_a_deeper_path_ending_in_infer_is_404(server, heldout, path):
    request = bytes_request([encode(heldout[0][0], "PNG")])
    response = httpx.post(f"{server.url}{path}", json=request, timeout=60)
    assert response.status_code == 404 and open_inference_code(response) == "NOT_FOUND"
