"""The Open Inference Protocol without a transport: binary BYTES, the classification strings,
and the checks every request meets before the model runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from image_classifier.core.classifier import Classifier
from image_classifier.core.errors import ClassifierError, ErrorCode
from image_classifier.core.model_card import ModelCard
from image_classifier.core.preprocessing import PreprocessSpec
from image_classifier.http import open_inference as rest
from image_classifier.http.grpc_inference import _classification
from image_classifier.http.protos import grpc_predict_v2_pb2 as pb
from image_classifier.serving import open_inference as oip
from image_classifier.serving.routing import ModelRef, ModelRouter, ServedVersion
from tests.onnx_models import build_onnx_classifier


def test_bytes_elements_round_trip_and_refuse_cut_data():
    elements = [b"", b"\x00\x01", bytes(range(256)) * 3]
    raw = oip.join_bytes_elements(elements)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == b"\x02\x00\x00\x00"
    assert oip.split_bytes_elements(raw, max_elements=3) == elements
    for cut in (raw[:-1], raw[:6], raw + b"\x01"):
        with pytest.raises(ClassifierError) as refused:
            oip.split_bytes_elements(cut, max_elements=4)
        assert refused.value.code is ErrorCode.INVALID_REQUEST


def test_bytes_elements_past_the_item_cap_are_refused_before_the_rest_is_read():
    """A body of millions of empty elements was walked to its end in Python (2.2 CPU-s for
    2 million), holding the event loop: the split stops at the first element past the cap, so
    the cut element after it is never reached."""
    raw = oip.join_bytes_elements([b"x"] * 65) + b"\xff\xff\xff\x7f"
    with pytest.raises(ClassifierError) as refused:
        oip.split_bytes_elements(raw, max_elements=64)
    assert refused.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert "more than 64" in refused.value.message


def test_fp32_raw_must_be_whole_floats():
    values = np.array([0.5, -1.25, 3.0], dtype="<f4")
    np.testing.assert_array_equal(oip.fp32_from_raw(values.tobytes()), values)
    with pytest.raises(ClassifierError):
        oip.fp32_from_raw(values.tobytes()[:-1])


LIMITS = oip.Limits(max_items=64, max_item_bytes=100, max_total_bytes=400)  # 4 images of 100


def card_of(labels: list[str]) -> ModelCard:
    """A card with a 2×2 grey input (tensor shape [1, 2, 2])."""
    return ModelCard(
        name="tiny", labels=labels, input_name="x", output_name="y", output_kind="probabilities",
        preprocessing=PreprocessSpec(input_size=(2, 2), color_mode="L"),
    )  # fmt: skip


def test_classification_strings_are_best_first_with_float32_scores():
    card = card_of(["cat", "dog", "bird"])
    probabilities = np.array([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]], dtype=np.float32)
    output = oip._output(oip.RequestedOutput("probabilities", 2), probabilities, card)
    assert output.datatype == "BYTES" and output.shape == [2, 2]
    assert output.data == [b"0.7:1:dog", b"0.2:0:cat", b"0.5:0:cat", b"0.25:1:dog"]
    wide = oip._output(oip.RequestedOutput("probabilities", 9), probabilities, card)
    assert wide.shape == [2, 3]  # more than the classes: all of them


@pytest.mark.parametrize(
    ("tensor", "code"),
    [
        (oip.InputTensor("image", "BYTES", (2,), [b"a"]), ErrorCode.INVALID_REQUEST),
        (oip.InputTensor("image", "BYTES", (1, 2), [b"a", b"b"]), ErrorCode.INVALID_REQUEST),
        (oip.InputTensor("image", "BYTES", (65,), [b"a"] * 65), ErrorCode.PAYLOAD_TOO_LARGE),
        (oip.InputTensor("image", "BYTES", (1,), [b"a" * 101]), ErrorCode.PAYLOAD_TOO_LARGE),
        (oip.InputTensor("image", "BYTES", (5,), [b"a" * 100] * 5), ErrorCode.PAYLOAD_TOO_LARGE),
        (oip.InputTensor("x", "FP32", (30, 1, 2, 2), np.zeros(120)), ErrorCode.PAYLOAD_TOO_LARGE),
        (oip.InputTensor("image", "BYTES", (0,), []), ErrorCode.INVALID_REQUEST),
        (oip.InputTensor("x", "FP32", (1, 1, 2, 3), np.zeros(6)), ErrorCode.INVALID_REQUEST),
        (oip.InputTensor("x", "FP32", (1, 1, 2, 2), np.zeros(3)), ErrorCode.INVALID_REQUEST),
        (oip.InputTensor("x", "FP32", (1, 1, 2, 2), np.full(4, np.inf)), ErrorCode.INVALID_REQUEST),
        (oip.InputTensor("x", "INT64", (1, 1, 2, 2), np.zeros(4)), ErrorCode.INVALID_REQUEST),
        # One picture sent flat, more numbers than items allowed: misshapen, not too large.
        (oip.InputTensor("x", "FP32", (100,), np.zeros(100)), ErrorCode.INVALID_REQUEST),
        (oip.InputTensor("image", "BYTES", (), [b"a"]), ErrorCode.INVALID_REQUEST),
    ],
    ids=["count", "shape", "too-many", "too-big", "too-big-together", "fp32-too-big-together",
         "empty", "fp32-shape", "fp32-size", "inf",
         "int64", "fp32-flat", "scalar"],
)  # fmt: skip
def test_inputs_are_checked_before_the_model(tensor, code):
    with pytest.raises(ClassifierError) as refused:
        oip.model_items(oip.InferenceRequest([tensor]), card_of(["a", "b"]), LIMITS)
    assert refused.value.code is code, refused.value.message


def test_good_inputs_become_model_items():
    card = card_of(["a", "b"])
    images = oip.model_items(
        oip.InferenceRequest([oip.InputTensor("image", "BYTES", (2, 1), [b"p", b"q"])]),
        card,
        LIMITS,
    )
    assert images == [b"p", b"q"]
    tensor = oip.InputTensor("x", "FP32", (2, 1, 2, 2), np.arange(8, dtype=np.float32))
    items = oip.model_items(oip.InferenceRequest([tensor]), card, LIMITS)
    assert [item.shape for item in items] == [(1, 2, 2), (1, 2, 2)]
    np.testing.assert_array_equal(items[1].ravel(), [4, 5, 6, 7])


def test_outputs_are_checked_and_classification_only_on_probabilities():
    with pytest.raises(ClassifierError):
        oip._checked_outputs([oip.RequestedOutput("logits")])
    with pytest.raises(ClassifierError):
        oip._checked_outputs([oip.RequestedOutput("label", 3)])
    for bad in (0, -1, True, 2.5, "x"):
        with pytest.raises(ClassifierError):
            oip.requested_classification("probabilities", bad)
    assert oip.requested_classification("probabilities", 4) == 4


def test_what_is_refused_is_not_echoed_back_whole():
    """A million outputs, or a name of a megabyte, came back in the error message (a 630 KB
    error body): refused by count and length instead."""
    with pytest.raises(ClassifierError) as many:
        oip._checked_outputs([oip.RequestedOutput("x")] * 100_000)
    assert len(many.value.message) < 200 and "100,000 outputs" in many.value.message
    long_name = "x" * 1_000_000
    with pytest.raises(ClassifierError) as long_output:
        oip._checked_outputs([oip.RequestedOutput(long_name)])
    request = oip.InferenceRequest([oip.InputTensor(long_name, "BYTES", (1,), [b"png"])])
    with pytest.raises(ClassifierError) as long_input:
        oip.model_items(request, card_of(["a", "b"]), LIMITS)
    # An id is echoed in the answer: an 80 MiB one came back whole (a black-box review).
    request = oip.InferenceRequest(
        [oip.InputTensor("image", "BYTES", (1,), [b"png"])], (), "i" * 2000
    )
    with pytest.raises(ClassifierError) as long_id:
        oip.model_items(request, card_of(["a", "b"]), LIMITS)
    assert "an id of 2,000 characters; at most 1,024" in long_id.value.message
    for refused in (long_output, long_input):
        assert refused.value.code is ErrorCode.INVALID_REQUEST
        assert len(refused.value.message) < 200 and "1,000,000 characters" in refused.value.message


def test_a_model_whose_input_is_named_image_keeps_every_input_name_distinct():
    card = card_of(["a", "b"]).model_copy(update={"input_name": "image"})
    metadata = oip.model_metadata(card, "tiny", ["v1"], 64)
    names = [tensor["name"] for tensor in metadata["inputs"]]
    assert names == ["image", "image_tensor"]
    tensor = oip.InputTensor("image_tensor", "FP32", (1, 1, 2, 2), np.zeros(4, np.float32))
    assert len(oip.model_items(oip.InferenceRequest([tensor]), card, LIMITS)) == 1


def test_the_config_agrees_with_the_metadata_on_per_item_shapes():
    """Triton writes a per-item scalar as dims [1] reshaped to []: [N] in the metadata."""
    card = card_of(["a", "b"])
    config = oip.model_config(card, "tiny", 64)
    metadata = oip.model_metadata(card, "tiny", ["v1"], 64)
    for kind in ("input", "output"):
        for tensor, described in zip(config[kind], metadata[kind + "s"], strict=True):
            shape = tensor.get("reshape", {}).get("shape", tensor["dims"])
            assert [-1, *shape] == described["shape"], (tensor, described)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_the_config_gives_the_pixel_tensors_layout_as_tritons_format(layout):
    """Triton's image clients read `format` to lay out the pixels they send."""
    spec = PreprocessSpec(input_size=(2, 2), color_mode="RGB", layout=layout)
    card = card_of(["a", "b"]).model_copy(update={"preprocessing": spec})
    inputs = {t["name"]: t for t in oip.model_config(card, "tiny", 64)["input"]}
    assert inputs["x"]["format"] == f"FORMAT_{layout}"
    assert inputs["x"]["dims"] == list(spec.tensor_shape)
    assert "format" not in inputs["image"]  # encoded files: no layout


def rest_request(shape: list, output_parameters: dict | None = None) -> oip.InferenceRequest:
    """A JSON body for `card_of`'s FP32 input "x", parsed as the REST route parses it."""
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [0.0] * 4}]}
    if output_parameters is not None:
        body["outputs"] = [{"name": "probabilities", "parameters": output_parameters}]
    parsed = rest.parse_request(json.dumps(body).encode(), None, LIMITS, card_of(["a", "b"]))
    return parsed.request


@pytest.mark.parametrize(
    "shape", [[1.0, 1, 2, 2], [True, 1, 2, 2], [1, 1.0, 2.0, 2]], ids=["float", "bool", "floats"]
)
def test_a_json_shape_must_hold_integers(shape):
    """Triton's JSON parser takes integers only (true is none, though Python says so): a shape of
    1.0 or true was turned into 1 and answered 200."""
    with pytest.raises(ClassifierError) as refused:
        oip.model_items(rest_request(shape), card_of(["a", "b"]), LIMITS)
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert "input x: shape must hold integers" in refused.value.message


@pytest.mark.parametrize(
    "given",
    [
        lambda: oip.requested_classification("probabilities", "3"),
        lambda: rest_request([1, 1, 2, 2], {"classification": "3"}),
        lambda: _classification(
            pb.ModelInferRequest.InferRequestedOutputTensor(
                name="probabilities",
                parameters={"classification": pb.InferParameter(string_param="3")},
            )
        ),
    ],
    ids=["protocol", "json", "grpc-string_param"],
)
def test_classification_as_a_string_is_refused_like_any_other_non_integer(given):
    """The string "3" was read as 3, where a bool, a float or a list were refused: Triton takes
    an integer, and one place (`requested_classification`) decides for both transports."""
    with pytest.raises(ClassifierError) as refused:
        given()
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert "'classification' must be a positive integer" in refused.value.message


@pytest.mark.parametrize(
    ("candidate", "drawn"),
    [({}, "v2"), ({"input_size": (20, 20)}, "v1"), ({"labels": 3}, "v1")],
    ids=["alike", "other-input-shape", "other-labels"],
)
def test_a_call_without_a_version_gets_the_canary_only_if_the_metadata_describes_it_too(
    tmp_path, candidate, drawn
):
    """The metadata describes the primary; a call built from it must fit what answers it."""

    def served(version: str, role: str, **model) -> ServedVersion:
        folder = build_onnx_classifier(tmp_path / version, **{"labels": 5, **model})
        version_served = ServedVersion(ModelRef(name="m", version=version), role, folder)
        version_served.classifier = Classifier(folder)
        return version_served

    router = ModelRouter(served("v1", "primary"), served("v2", "candidate", **candidate), 1.0)
    assert oip.served_model(router, "m", None).ref.version == drawn
    assert oip.served_model(router, "m", None, pinned="v2").ref.version == "v2"  # asked for
    assert oip.served_model(router, "m", "v2").ref.version == "v2"
