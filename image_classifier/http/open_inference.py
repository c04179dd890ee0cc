"""The Open Inference Protocol v2 (KServe, Triton) request and response shapes, without HTTP.

A client of that ecosystem sends either encoded images as a BYTES tensor (base64 strings, the
protocol's JSON form for binary data) or an FP32 tensor already preprocessed to the model's input
shape; it gets the probabilities tensor and the top-1 labels back.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from ..core.errors import ClassifierError, ErrorCode
from ..core.model_card import ModelCard

_URLSAFE = str.maketrans("-_", "+/")
PROBABILITIES = "probabilities"
LABEL = "label"


class InferInput(BaseModel):
    name: str
    shape: list[int] = Field(min_length=1, max_length=8)
    datatype: Literal["BYTES", "FP32"]
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


def parse_request(body: bytes, max_items: int) -> InferRequest:
    try:
        request = InferRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST, f"not an inference request: {where}: {first['msg']}"
        ) from None
    items = request.inputs[0].shape[0]
    if not 1 <= items <= max_items:
        raise ClassifierError(
            ErrorCode.PAYLOAD_TOO_LARGE if items > max_items else ErrorCode.INVALID_REQUEST,
            f"the batch dimension is {items}; send 1..{max_items} items",
        )
    return request


def encoded_images(tensor: InferInput) -> list[bytes]:
    """A BYTES tensor of shape [N] or [N, 1]: one base64-encoded image file per item."""
    if tensor.shape not in ([len(tensor.data)], [len(tensor.data), 1]):
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST,
            f"a BYTES input has shape [N] or [N, 1] with N = {len(tensor.data)} strings",
        )
    images = []
    for index, item in enumerate(tensor.data):
        if not isinstance(item, str):
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST, f"item {index}: BYTES data must be base64 strings"
            )
        try:  # standard or URL-safe alphabet
            images.append(base64.b64decode(item.translate(_URLSAFE), validate=True))
        except (binascii.Error, ValueError):
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST, f"item {index}: not valid base64"
            ) from None
    return images


def preprocessed_tensor(tensor: InferInput, card: ModelCard) -> np.ndarray:
    """An FP32 tensor already in the model's input shape, [N, *tensor_shape]."""
    expected = list(card.preprocessing.tensor_shape)
    if tensor.shape[1:] != expected:
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST,
            f"an FP32 input has shape [N, {', '.join(map(str, expected))}], got {tensor.shape}",
        )
    try:
        array = np.asarray(tensor.data, dtype=np.float32)
    except (TypeError, ValueError):
        raise ClassifierError(ErrorCode.INVALID_REQUEST, "FP32 data must be numbers") from None
    if array.size != int(np.prod(tensor.shape)) or not np.isfinite(array).all():
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST,
            f"FP32 data must hold {int(np.prod(tensor.shape))} finite numbers for shape "
            f"{tensor.shape}",
        )
    return array.reshape(tensor.shape)


def infer_response(
    request: InferRequest, probabilities: np.ndarray, card: ModelCard, name: str, version: str
) -> dict[str, Any]:
    labels = [card.labels[int(i)] for i in probabilities.argmax(axis=1)]
    outputs = {
        PROBABILITIES: {
            "name": PROBABILITIES,
            "shape": list(probabilities.shape),
            "datatype": "FP32",
            "data": [round(float(p), 7) for p in probabilities.ravel()],
            "parameters": {"labels": card.labels},
        },
        LABEL: {"name": LABEL, "shape": [len(labels)], "datatype": "BYTES", "data": labels},
    }
    wanted = [output.name for output in request.outputs or []] or list(outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST, f"unknown outputs {unknown}; this model has {list(outputs)}"
        )
    response: dict[str, Any] = {
        "model_name": name,
        "model_version": version,
        "outputs": [outputs[name] for name in wanted],
    }
    if request.id is not None:
        response["id"] = request.id
    return response


def model_metadata(card: ModelCard, name: str, version: str, max_items: int) -> dict[str, Any]:
    tensor_shape = list(card.preprocessing.tensor_shape)
    return {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": card.input_name, "datatype": "FP32", "shape": [-1, *tensor_shape]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(card.labels)]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"max_batch_size": max_items, "labels": card.labels},
    }
