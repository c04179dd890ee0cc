"""The Open Inference Protocol v2 (KServe, Triton) without a transport.

The REST codec (`http/open_inference.py`: JSON, and Triton's binary tensor extension) and the gRPC
servicer (`http/grpc_inference.py`) turn their wire formats into an `InferenceRequest` and back;
everything between (which tensors are accepted, what the model answers, Triton's classification
extension, the metadata) is decided here once, so both transports answer alike. Inference goes
through the `Predictor`, on /analyze's path: the same batching, metrics and drift.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__
from ..core.errors import ClassifierError, ErrorCode
from ..core.model_card import ModelCard
from .predictor import Predictor
from .routing import ModelRouter, ServedVersion
from .settings import Settings

SERVER_NAME = "image_classifier"
# What `GET /v2` and ServerMetadata announce. Triton's names: binary tensor data (HTTP), the
# classification parameter on an output, and the model configuration route.
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")
PROBABILITIES = "probabilities"
LABEL = "label"
IMAGE_INPUT = "image"
BYTES, FP32 = "BYTES", "FP32"
_LENGTH = struct.Struct("<I")  # a BYTES element in binary form: its length, then its bytes
OUTPUT_NAMES = (PROBABILITIES, LABEL)
MAX_NAME_CHARS = 256  # a tensor name longer than this is refused, and not echoed back
# A request's id is echoed in its answer: a client's correlation token, not a payload (an 80 MiB
# id was answered whole, a black-box review found).
MAX_ID_CHARS = 1024
MAX_INPUTS = 8  # inputs a request may list (one is served): more are refused before they are read


@dataclass(frozen=True)
class InputTensor:
    """One input as the client sent it: BYTES elements (encoded images), or FP32 numbers."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Sequence[bytes] | np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0  # > 0: the top-k classes as "score:index:label" strings


@dataclass(frozen=True)
class InferenceRequest:
    inputs: Sequence[InputTensor]
    outputs: Sequence[RequestedOutput] = ()  # empty: every output
    id: str | None = None


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # FP32 values, or BYTES elements
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceResult:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


def served_model(
    router: ModelRouter,
    name: str,
    version: str | None,
    pinned: str | None = None,
    canary: bool = True,
) -> ServedVersion:
    """The model a request names; without a version, the router chooses (an X-Model-Version pin,
    the canary share) among the served models of that name. A call that describes the model
    (ready, metadata, config) passes `canary=False`: it gets the served version, not a draw."""
    served_tags = ", ".join(served.tag for served in router.models)
    not_served = ClassifierError(
        ErrorCode.NOT_FOUND, f"model {name}:{version or '*'} is not served here ({served_tags})"
    )
    if version:  # a version that names nothing served is NOT_FOUND, as any other unknown path
        if pinned and pinned.strip() not in (version, f"{name}:{version}"):
            raise invalid(f"the path names version {version[:80]!r}, the pin {pinned[:80]!r}")
        try:
            return router.find(f"{name}:{version}")
        except ClassifierError:
            raise not_served from None
    chosen = router.route(pinned) if canary or pinned else router.primary
    if not pinned and not _described_alike(chosen, router.primary):
        chosen = router.primary  # what the metadata describes: the canary only when alike
    if chosen.ref.name == name:
        return chosen
    for served in router.models:
        if served.ref.name == name:
            return served
    raise not_served


def _described_alike(drawn: ServedVersion, primary: ServedVersion) -> bool:
    """A call that names no version is built from the metadata, which describes the primary:
    a canary candidate with other inputs or labels answered half of such calls with a 400 for
    the tensor shape the metadata gave, or with other classes (a review). A candidate not yet
    loaded is taken as alike: it answers NOT_READY as any other call to it."""
    if drawn is primary or drawn.classifier is None or primary.classifier is None:
        return True
    ours, theirs = primary.classifier.card, drawn.classifier.card
    return (
        ours.labels == theirs.labels
        and ours.preprocessing.tensor_shape == theirs.preprocessing.tensor_shape
        and tensor_input_name(ours) == tensor_input_name(theirs)
    )


def invalid(message: str) -> ClassifierError:
    return ClassifierError(ErrorCode.INVALID_REQUEST, message)


def split_bytes_elements(raw: bytes, max_elements: int) -> list[bytes]:
    """A BYTES tensor in binary form (each element: 4-byte little-endian length, then bytes).
    It stops past `max_elements` (a request's item cap): millions of empty elements in a body
    would otherwise hold the event loop for seconds, before any other check could refuse them."""
    elements, offset = [], 0
    while offset < len(raw):
        if len(elements) == max_elements:
            raise too_many_items(f"more than {max_elements}", max_elements)
        if offset + _LENGTH.size > len(raw):
            raise invalid("binary BYTES data ends inside an element's length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise invalid("binary BYTES data ends inside an element")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def too_many_items(count: int | str, max_items: int) -> ClassifierError:
    return ClassifierError(
        ErrorCode.PAYLOAD_TOO_LARGE, f"the input holds {count} items; send 1..{max_items} items"
    )


def too_many_values(most_values: int) -> ClassifierError:
    return ClassifierError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"more values than a full batch of this model's tensors ({most_values:,} numbers)",
    )


def refuse_shared_memory(kind: str, name: str, parameters: Iterable[str]) -> None:
    """Triton's shared-memory parameters name a region this server never registered (it serves
    no shared memory): an output would come back inline while the client reads the region."""
    if any(key.startswith("shared_memory_") for key in parameters):
        raise invalid(
            f"{kind} {name}: the shared memory extension is not served here; send and receive "
            "tensors in the request and the answer"
        )


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_CHARS:
        raise invalid(f"a tensor name of {len(name):,} characters; at most {MAX_NAME_CHARS}")
    return name


def join_bytes_elements(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def raw_contents(output: OutputTensor) -> bytes:
    """An output in binary form (HTTP binary data, gRPC `raw_output_contents`)."""
    if output.datatype == BYTES:
        return join_bytes_elements(output.data)
    return np.asarray(output.data, dtype="<f4").tobytes()


def fp32_from_raw(raw: bytes) -> np.ndarray:
    if len(raw) % 4:
        raise invalid(f"binary FP32 data has {len(raw)} bytes, not a multiple of 4")
    return np.frombuffer(raw, dtype="<f4")


def is_integer(value: Any) -> bool:
    """An integer as the protocol means it: not a bool (which Python counts as one), not a
    float or string that reads as one."""
    return isinstance(value, int) and not isinstance(value, bool)


def requested_classification(name: str, value: Any) -> int:
    """Triton's `classification` output parameter: a positive integer (a JSON number, a gRPC
    int64_param). Triton reads no other type: a string "3" is refused like a bool or a float."""
    if not is_integer(value) or value < 1:
        raise invalid(f"output {name}: 'classification' must be a positive integer")
    return value


def tensor_input_name(card: ModelCard) -> str:
    """The name of the FP32 input (tensors already preprocessed): the model's own input's, unless
    that is `image`, the name of the encoded-images input, which keeps it."""
    return card.input_name if card.input_name != IMAGE_INPUT else f"{IMAGE_INPUT}_tensor"


@dataclass(frozen=True)
class Limits:
    """What one request may hold: the same over HTTP (JSON or binary) and gRPC, and as for
    /analyze_batch (items, bytes of one image, bytes of them all)."""

    max_items: int
    max_item_bytes: int
    max_total_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_batch_images, settings.max_upload_bytes, settings.max_batch_bytes)

    def most_values(self, card: ModelCard) -> int:
        """The most numbers a request can need: a full batch of the model's input tensors. The
        transports refuse more before they turn them into objects (a body of tiny values costs
        far more to parse than its bytes suggest)."""
        return self.max_items * math.prod(card.preprocessing.tensor_shape)


def model_items(
    request: InferenceRequest, card: ModelCard, limits: Limits
) -> list[bytes | np.ndarray]:
    """The request's items for the model: encoded images, or tensors already preprocessed."""
    accepted = {IMAGE_INPUT: BYTES, tensor_input_name(card): FP32}
    expected = " or ".join(f"{name!r} ({datatype})" for name, datatype in accepted.items())
    if request.id is not None and len(request.id) > MAX_ID_CHARS:
        raise invalid(f"an id of {len(request.id):,} characters; at most {MAX_ID_CHARS:,}")
    if len(request.inputs) != 1:
        raise invalid(f"send one input, {expected}; got {len(request.inputs)}")
    tensor = request.inputs[0]
    check_name(tensor.name)
    if accepted.get(tensor.name, tensor.datatype) != tensor.datatype:
        raise invalid(f"input {tensor.name!r} is {accepted[tensor.name]}, got {tensor.datatype}")
    if tensor.name not in accepted and tensor.datatype in accepted.values():
        raise invalid(f"unknown input {tensor.name!r}; this model takes {expected}")
    if not all(map(is_integer, tensor.shape)):
        raise invalid(f"input {tensor.name}: shape must hold integers, got {list(tensor.shape)}")
    if not tensor.shape:
        raise invalid(f"input {tensor.name}: a shape of one dimension or more (the batch), got []")
    if any(dim < 0 for dim in tensor.shape):
        raise invalid(f"input {tensor.name}: sizes must not be negative, got {list(tensor.shape)}")
    if tensor.datatype == FP32:  # a wrong shape first: [784] is one digit misshapen, not 784
        _check_tensor_shape(tensor, card)
    items = tensor.shape[0]
    if items > limits.max_items:
        raise too_many_items(items, limits.max_items)
    if items < 1:
        raise invalid(f"the batch dimension is {items}; send 1..{limits.max_items} items")
    if tensor.datatype not in (BYTES, FP32):
        raise invalid(
            f"input {tensor.name}: datatype BYTES (images) or FP32, got {tensor.datatype}"
        )
    total = sum(map(len, tensor.data)) if tensor.datatype == BYTES else 4 * np.size(tensor.data)
    if total > limits.max_total_bytes:
        raise ClassifierError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the input holds {total:,} bytes; a request may hold {limits.max_total_bytes:,}",
        )
    if tensor.datatype == BYTES:
        return _images(tensor, limits.max_item_bytes)
    return list(_preprocessed(tensor, card))


def _images(tensor: InputTensor, max_item_bytes: int) -> list[bytes]:
    count = len(tensor.data)
    if list(tensor.shape) not in ([count], [count, 1]):
        raise invalid(
            f"input {tensor.name}: a BYTES input has shape [N] or [N, 1] with N = {count} "
            f"elements, got {list(tensor.shape)}"
        )
    for index, image in enumerate(tensor.data):
        if len(image) > max_item_bytes:
            raise ClassifierError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"item {index}: {len(image)} bytes; an image may have {max_item_bytes}",
            )
    return list(tensor.data)


def _check_tensor_shape(tensor: InputTensor, card: ModelCard) -> None:
    expected = list(card.preprocessing.tensor_shape)
    if list(tensor.shape[1:]) != expected:
        raise invalid(
            f"input {tensor.name}: an FP32 input has shape [N, {', '.join(map(str, expected))}], "
            f"got {list(tensor.shape)}"
        )


def _preprocessed(tensor: InputTensor, card: ModelCard) -> np.ndarray:
    with np.errstate(over="ignore"):  # a number past float32 becomes inf, refused just below
        array = np.asarray(tensor.data, dtype=np.float32).ravel()
    size = int(np.prod(tensor.shape))
    if array.size != size or not np.isfinite(array).all():
        raise invalid(
            f"input {tensor.name}: FP32 data must hold {size} finite numbers for shape "
            f"{list(tensor.shape)}"
        )
    return array.reshape(tensor.shape)


async def infer(
    predictor: Predictor,
    served: ServedVersion,
    request: InferenceRequest,
    limits: Limits,
) -> InferenceResult:
    card = served.ready_classifier().card
    outputs = _checked_outputs(request.outputs)
    items = model_items(request, card, limits)
    probabilities = await predictor.probabilities(served, items)
    return InferenceResult(
        model_name=served.ref.name,
        model_version=served.ref.version,
        outputs=[_output(wanted, probabilities, card) for wanted in outputs],
        id=request.id,
    )


def _checked_outputs(wanted: Sequence[RequestedOutput]) -> Sequence[RequestedOutput]:
    """Checked before the model runs: a bad output name must not cost a model run."""
    if not wanted:
        return tuple(map(RequestedOutput, OUTPUT_NAMES))
    if len(wanted) > len(OUTPUT_NAMES):
        raise invalid(f"{len(wanted):,} outputs asked for; this model has {list(OUTPUT_NAMES)}")
    unknown = [check_name(output.name) for output in wanted if output.name not in OUTPUT_NAMES]
    if unknown:
        raise invalid(f"unknown outputs {unknown}; this model has {list(OUTPUT_NAMES)}")
    names = [output.name for output in wanted]
    if len(set(names)) != len(names):
        raise invalid(f"each output may be asked for once, got {names}")
    for output in wanted:
        if output.classification and output.name != PROBABILITIES:
            raise invalid(f"'classification' applies to the {PROBABILITIES!r} output")
    return wanted


def _output(wanted: RequestedOutput, probabilities: np.ndarray, card: ModelCard) -> OutputTensor:
    items, classes = probabilities.shape
    if wanted.name == LABEL:
        labels = [card.labels[int(i)].encode() for i in probabilities.argmax(axis=1)]
        return OutputTensor(LABEL, BYTES, [items], labels)
    if wanted.classification:
        top = min(wanted.classification, classes)
        return OutputTensor(PROBABILITIES, BYTES, [items, top], _classes(probabilities, top, card))
    return OutputTensor(PROBABILITIES, FP32, [items, classes], probabilities.astype(np.float32))


def _classes(probabilities: np.ndarray, top: int, card: ModelCard) -> list[bytes]:
    """Triton's classification strings, best first: "score:index:label" (score as float32)."""
    strings = []
    for row in probabilities:
        for index in np.argsort(-row, kind="stable")[:top]:
            score = np.format_float_positional(np.float32(row[index]), trim="-")
            strings.append(f"{score}:{index}:{card.labels[int(index)]}".encode())
    return strings


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def served_versions(router: ModelRouter, name: str) -> list[str]:
    """The versions of `name` a client may ask for here, the served one first."""
    return [served.ref.version for served in router.models if served.ref.name == name]


def model_metadata(
    card: ModelCard, name: str, versions: list[str], max_items: int
) -> dict[str, Any]:
    tensor_shape = list(card.preprocessing.tensor_shape)
    return {
        "name": name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": BYTES, "shape": [-1]},
            {"name": tensor_input_name(card), "datatype": FP32, "shape": [-1, *tensor_shape]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": FP32, "shape": [-1, len(card.labels)]},
            {"name": LABEL, "datatype": BYTES, "shape": [-1]},
        ],
        "parameters": {"max_batch_size": max_items, "labels": card.labels},
    }


def model_config(card: ModelCard, name: str, max_items: int) -> dict[str, Any]:
    """Triton's model configuration (the fields its clients read), for `.../config` over HTTP
    and the ModelConfig method over gRPC."""
    metadata = model_metadata(card, name, [], max_items)

    def config_tensor(tensor: dict[str, Any]) -> dict[str, Any]:
        kind = "STRING" if tensor["datatype"] == BYTES else tensor["datatype"]
        config = {"name": tensor["name"], "data_type": f"TYPE_{kind}", "dims": tensor["shape"][1:]}
        if not config["dims"]:  # one value per item: Triton writes dims [1] reshaped to [] ([N])
            config.update(dims=[1], reshape={"shape": []})
        if tensor["name"] == tensor_input_name(card):  # the pixels' layout, which clients read
            config["format"] = f"FORMAT_{card.preprocessing.layout}"
        return config

    return {
        "name": name,
        "platform": metadata["platform"],
        "backend": "onnxruntime",
        "max_batch_size": max_items,
        "input": [config_tensor(tensor) for tensor in metadata["inputs"]],
        "output": [config_tensor(tensor) for tensor in metadata["outputs"]],
    }
