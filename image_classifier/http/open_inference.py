"""The Open Inference Protocol's REST form: JSON, and Triton's binary tensor data extension.

A request body is JSON, or (binary) a JSON header of `Inference-Header-Content-Length` bytes
followed by the raw data of the inputs whose `parameters` give a `binary_data_size`, in order.
Binary BYTES elements are each a 4-byte little-endian length and the bytes (an encoded image, as
Triton clients send it); JSON BYTES elements are base64 strings. Outputs come back as JSON data,
or as raw data after the JSON header when the output's `binary_data` parameter (else the request's
`binary_data_output`) asks for it: how `tritonclient.http` calls by default.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError, WithJsonSchema

from ..core.errors import ClassifierError, ErrorCode
from ..core.model_card import ModelCard
from ..serving import open_inference as oip

HEADER_LENGTH = "inference-header-content-length"
_URLSAFE = str.maketrans("-_", "+/", "\r\n")  # and line breaks dropped
_MOST_HEADER_LENGTH_DIGITS = 15  # more than any body holds; Python's int() refuses 4,300 and up
# Counted in a JSON body before it is parsed (bytes.count runs at memory speed). A request needs a
# few objects (its inputs, outputs and parameters), and commas only between the values of a full
# batch of tensors (`Limits.most_values`), base64 images holding none. Millions of tiny values
# within the body cap cost seconds of CPU and gigabytes to parse: refused before that.
_MOST_OBJECTS = 1_000
_SPARE_COMMAS = 1_000


# The protocol's tensor data types (Triton's BF16 too). Only BYTES and FP32 are served; the
# others get that reason (serving/open_inference.py), anything else is not the protocol.
# Checked there, not here, so that HTTP and gRPC say the same: the schema still lists them.
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES",
)  # fmt: skip
Datatype = Annotated[
    str, Field(max_length=8), WithJsonSchema({"type": "string", "enum": list(DATATYPES)})
]


# A shape's sizes as sent: pydantic's int would turn 1.0 and true into 1, which Triton refuses;
# `oip.model_items` refuses them for both transports. The schema still says integers.
ShapeSize = Annotated[Any, WithJsonSchema({"type": "integer"})]


class RequestInput(BaseModel):
    name: str = Field(max_length=oip.MAX_NAME_CHARS)
    shape: list[ShapeSize] = Field(max_length=8)  # [] is refused as gRPC refuses it
    datatype: Datatype
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestOutput(BaseModel):
    name: str = Field(max_length=oip.MAX_NAME_CHARS)
    parameters: dict[str, Any] | None = None


class InferenceRequestBody(BaseModel):
    """The JSON an inference request carries (the JSON header, in binary form)."""

    id: str | None = None
    inputs: list[RequestInput] = Field(max_length=oip.MAX_INPUTS)  # none: as gRPC says it
    outputs: list[RequestOutput] | None = None
    parameters: dict[str, Any] | None = None


# The answers' shapes. The routes build them as plain dicts (the hot path skips validation);
# these models document them in /docs.json, and the schemathesis tests check every answer
# against them, so the two cannot drift apart unnoticed.


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="absent when sent as binary data")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any]


class ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int]


class ModelConfig(BaseModel):
    """Triton's model configuration: the fields its clients read."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class OpenInferenceError(BaseModel):
    """The protocol's error: `"<CODE>: <message>"`, the code also in `X-Error-Code`."""

    error: str


def inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` put in place: an operation's request body is merged
    into BentoML's document as it is, where a `#/$defs/...` reference would not resolve."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


class RestRequest:
    """A parsed REST inference request, and which of its outputs go back binary."""

    def __init__(
        self, request: oip.InferenceRequest, binary_outputs: dict[str, bool], default_binary: bool
    ) -> None:
        self.request = request
        self.binary_outputs = binary_outputs  # by output name; absent: `default_binary`
        self.default_binary = default_binary  # the request's `binary_data_output`


def parse_request(
    body: bytes, header_length: str | None, limits: oip.Limits, card: ModelCard
) -> RestRequest:
    json_part, binary_part = _split(body, header_length)
    _check_json_size(json_part, limits.most_values(card))
    try:
        parsed = InferenceRequestBody.model_validate_json(json_part)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        place = f"{where}: " if where else ""
        raise oip.invalid(f"not an inference request: {place}{first['msg']}") from None
    inputs, offset = [], 0
    for tensor in parsed.inputs:
        oip.refuse_shared_memory("input", tensor.name, tensor.parameters or {})
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            inputs.append(_json_input(tensor))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise oip.invalid(f"input {tensor.name}: binary_data_size must be a byte count")
        if offset + size > len(binary_part):
            raise oip.invalid(
                f"input {tensor.name}: binary_data_size {size} runs past the body's binary data"
            )
        inputs.append(_binary_input(tensor, binary_part[offset : offset + size], limits))
        offset += size
    if offset != len(binary_part):
        raise oip.invalid(
            f"the body has {len(binary_part) - offset} bytes of binary data no input claims"
        )
    binary: dict[str, bool] = {}
    outputs = []
    for output in parsed.outputs or []:
        parameters = output.parameters or {}
        oip.refuse_shared_memory("output", output.name, parameters)
        if "binary_data" in parameters:
            binary[output.name] = _flag(parameters, "binary_data")
        count = parameters.get("classification")
        classification = 0 if count is None else oip.requested_classification(output.name, count)
        outputs.append(oip.RequestedOutput(output.name, classification))
    default_binary = _flag(parsed.parameters, "binary_data_output")
    return RestRequest(oip.InferenceRequest(inputs, outputs, parsed.id), binary, default_binary)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    digits = header_length.strip()
    if (
        not (digits.isascii() and digits.isdigit())  # str.isdigit alone takes "²" and "٣"
        or len(digits) > _MOST_HEADER_LENGTH_DIGITS
        or int(digits) > len(body)
    ):
        raise oip.invalid(
            f"Inference-Header-Content-Length must be the JSON header's byte count, at most the "
            f"body's {len(body)} bytes"
        )
    return body[: int(digits)], body[int(digits) :]


def header_length(values: list[str]) -> str | None:
    """The binary extension's header (every value the request gave), at most once or repeated
    alike: two lengths would split the body in two ways, and which one counted would depend on
    which one a proxy kept."""
    given = set(values)
    if len(given) > 1:
        raise oip.invalid("Inference-Header-Content-Length is given twice, with different values")
    return given.pop() if given else None


def _check_json_size(json_part: bytes, most_values: int) -> None:
    if json_part.count(b",") > most_values + _SPARE_COMMAS:
        raise oip.too_many_values(most_values)
    if json_part.count(b"{") > _MOST_OBJECTS:
        raise ClassifierError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"the JSON holds more than {_MOST_OBJECTS:,} objects"
        )


def _flag(parameters: dict[str, Any] | None, name: str) -> bool:
    value = (parameters or {}).get(name, False)
    if not isinstance(value, bool):
        raise oip.invalid(f"parameter {name!r} must be true or false")
    return value


def _binary_input(tensor: RequestInput, raw: bytes, limits: oip.Limits) -> oip.InputTensor:
    if tensor.data is not None:
        raise oip.invalid(f"input {tensor.name}: send data or binary_data_size, not both")
    if tensor.datatype == oip.BYTES:
        data: list[bytes] | np.ndarray = oip.split_bytes_elements(raw, limits.max_items)
    elif tensor.datatype == oip.FP32:
        data = oip.fp32_from_raw(raw)
    else:
        data = []  # the datatype is refused, with the reason, by the protocol's checks
    return oip.InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data)


def _json_input(tensor: RequestInput) -> oip.InputTensor:
    if tensor.data is None:
        raise oip.invalid(f"input {tensor.name}: no data and no binary_data_size")
    if tensor.datatype == oip.BYTES:
        data: list[bytes] | np.ndarray = _base64_images(tensor.data)
    elif tensor.datatype == oip.FP32:
        data = _numbers(tensor)
    else:
        data = []
    return oip.InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data)


def _numbers(tensor: RequestInput) -> np.ndarray:
    """FP32 data as JSON numbers (flat or nested by the shape): not strings, not true/false."""
    try:
        data = np.asarray(tensor.data)
    except (TypeError, ValueError):  # ragged nesting
        data = None
    if data is None or data.dtype.kind not in "iuf" or _with_booleans(tensor.data, data.ndim):
        # "b": booleans alone, "U"/"O": strings, ints over 64 bits; among numbers, a true or
        # false is read as 1.0 or 0.0, so the elements' own types are looked at too
        raise oip.invalid(f"input {tensor.name}: FP32 data must be numbers")
    return data


def _with_booleans(data: list[Any], depth: int) -> bool:
    leaves = data
    for _ in range(depth - 1):  # nested by the shape: flattened at C speed, as the types are read
        leaves = itertools.chain.from_iterable(leaves)
    return bool in set(map(type, leaves))


def _base64_images(data: list[Any]) -> list[bytes]:
    """JSON carries an image file as a base64 string (standard or URL-safe alphabet, and line
    breaks allowed: `base64 FILE` wraps its lines at 76); for shape [N, 1] the strings may come
    nested, one list per item."""
    if all(isinstance(item, list) and len(item) == 1 for item in data):
        data = [item[0] for item in data]
    images = []
    for index, item in enumerate(data):
        if not isinstance(item, str):
            raise oip.invalid(f"item {index}: BYTES data must be base64 strings")
        try:
            images.append(base64.b64decode(item.translate(_URLSAFE), validate=True))
        except (binascii.Error, ValueError):
            raise oip.invalid(f"item {index}: not valid base64") from None
    return images


def encode_response(
    result: oip.InferenceResult, rest: RestRequest, labels: list[str]
) -> tuple[bytes, dict[str, str]]:
    """The body and its headers: JSON, or a JSON header and the binary outputs after it."""
    outputs, binary_parts = [], []
    for output in result.outputs:
        described: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        }
        parameters = dict(output.parameters)
        if output.name == oip.PROBABILITIES and output.datatype == oip.FP32:
            parameters["labels"] = labels
        if rest.binary_outputs.get(output.name, rest.default_binary):
            raw = oip.raw_contents(output)
            parameters["binary_data_size"] = len(raw)
            binary_parts.append(raw)
        else:
            described["data"] = _json_data(output)
        if parameters:
            described["parameters"] = parameters
        outputs.append(described)
    response: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "outputs": outputs,
    }
    if result.id is not None:
        response["id"] = result.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not binary_parts:
        return header, {"content-type": "application/json"}
    return header + b"".join(binary_parts), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _json_data(output: oip.OutputTensor) -> list[Any]:
    if output.datatype == oip.BYTES:
        return [element.decode() for element in output.data]
    return np.asarray(output.data, dtype=np.float32).ravel().tolist()  # each float32 exactly
