"""What an ONNX classifier file says about itself: its input's layout, channels and size when
they are static, a fixed batch axis (made dynamic when the graph allows), whether it answers a
class vector, and whether that vector is logits or probabilities.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data
from PIL import Image

from image_classifier.core.preprocessing import PreprocessSpec, preprocess

from .export import OnnxSignature
from .photos import photo

BATCH_CHECK = 3  # a batch of this many must give the rows of as many single runs
_CHANNELS = {1: "L", 3: "RGB"}


class ModelFileError(ValueError):
    """The file is not an image classifier this service can run as it is."""


@dataclass(frozen=True)
class InputFacts:
    """Read from the input's declared shape; None where the file leaves it open."""

    layout: str | None
    color_mode: str | None
    input_size: tuple[int, int] | None
    static_batch: int | None

    def as_spec_fields(self) -> dict:
        found = {
            "layout": self.layout,
            "color_mode": self.color_mode,
            "input_size": self.input_size,
        }
        return {key: value for key, value in found.items() if value is not None}


def input_facts(signature: OnnxSignature, layout_given: str | None = None) -> InputFacts:
    """`layout_given` settles a shape both layouts could read ([N, 3, 32, 3])."""
    check_float_input(signature)
    shape = signature.input_shape
    if len(shape) != 4:
        raise ModelFileError(
            f"the input {signature.input_name!r} has shape {shape}: an image "
            "classifier takes a 4-D batch (NCHW or NHWC)"
        )
    batch, d1, d2, d3 = shape
    first, last = _is_channels(d1), _is_channels(d3)
    if isinstance(d1, int) and isinstance(d3, int) and not (first or last):
        raise ModelFileError(
            f"the input {signature.input_name!r} has shape {shape}: {d1} channels (NCHW) or "
            f"{d3} (NHWC), and the service feeds 1 (L) or 3 (RGB)"
        )
    if not (first or last):  # a channel axis left open: the fixed side is the picture's
        first = not isinstance(d1, int) and isinstance(d3, int)
        last = not isinstance(d3, int) and isinstance(d1, int)
    layout = "NCHW" if first and not last else "NHWC" if last and not first else None
    if first and last and layout_given in ("NCHW", "NHWC"):
        layout = layout_given
    channels = {"NCHW": d1, "NHWC": d3}.get(layout)
    height, width = (d2, d3) if layout == "NCHW" else (d1, d2)
    sized = layout is not None and isinstance(height, int) and isinstance(width, int)
    return InputFacts(
        layout=layout,
        color_mode=_CHANNELS.get(channels) if layout else None,
        input_size=(height, width) if sized and height > 0 and width > 0 else None,
        static_batch=batch if isinstance(batch, int) else None,  # 0 too: fixed, and empty
    )


def _is_channels(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim in _CHANNELS


def check_float_input(signature: OnnxSignature) -> None:
    """First of all: nothing else about the file matters if the service cannot feed it."""
    if signature.input_type != "FLOAT":
        how = {
            "FLOAT16": "e.g. onnxconverter_common's float16 conversion with keep_io_types=True",
            "UINT8": "take float32 pixels and scale them in the model or with --mean/--std",
        }.get(signature.input_type, "a Cast to the model's own type as its first node")
        raise ModelFileError(
            f"the input is {signature.input_type}; the service feeds float32 tensors (give the "
            f"model a float32 input: {how})"
        )


def with_weights_inside(path: Path, folder: Path) -> Path:
    """The file itself, or a copy holding the weights it keeps beside it (ONNX external data):
    the store keeps one file, and ONNX Runtime cannot read every tensor from outside."""
    model = onnx.load(str(path), load_external_data=False)
    if not any(uses_external_data(tensor) for tensor in model.graph.initializer):
        return path
    model = onnx.load(str(path))  # with the weights read in
    if model.ByteSize() >= 2**31 - 1:
        raise ModelFileError(
            "its weights are kept outside the file (external data) and are 2 GB or more: the "
            "service serves one file of less than 2 GB"
        )
    inside = folder / "weights_inside.onnx"
    onnx.save(model, str(inside))
    return inside


def with_only_output(path: Path, folder: Path, output: str) -> Path:
    """A copy whose one output is `output`, without the nodes and weights only the others
    needed: the service, the quantizer and the evaluation each read the file's one output."""
    model = onnx.load(str(path))
    if [value.name for value in model.graph.output] == [output]:
        return path
    kept = [value for value in model.graph.output if value.name == output]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    needed, nodes = {output}, []
    for node in reversed(model.graph.node):  # nodes are stored in a topological order
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(_names_read_by(node))
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    dropped = {tensor.name for tensor in model.graph.initializer} - needed
    weights = [tensor for tensor in model.graph.initializer if tensor.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(weights)
    inputs = [value for value in model.graph.input if value.name not in dropped]  # old IRs
    del model.graph.input[:]  # list weights as inputs too: one left would need feeding
    model.graph.input.extend(inputs)
    pruned = folder / "one_output.onnx"
    onnx.save(model, str(pruned))
    return pruned


def _names_read_by(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, and the names its subgraphs (If, Loop, Scan) read from outside them."""
    names = set(node.input)
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs]:
            for inner in graph.node:
                names |= _names_read_by(inner)
    return names


def ort_reason(error: Exception, most: int = 200) -> str:
    """ONNX Runtime's own words from its error, without the C++ file and function they came
    from (`…/reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(…) The input…`)."""
    said = str(error).split("Status Message:")[-1].strip()
    said = _ORT_SOURCE.sub("", said).strip()
    return said if len(said) <= most else said[: most - 1].rsplit(" ", 1)[0] + "…"


_ORT_SOURCE = re.compile(r"^\S+\.(?:h|cc|cpp):\d+\s+[\w:~<>]+\([^)]*\)\s*")


def with_dynamic_batch(path: Path, folder: Path, spec: PreprocessSpec) -> Path:
    """A copy whose batch axis is symbolic, if a batch then gives the same rows as single runs.

    The service merges concurrent requests into one model run, so a file fixed at batch 1 would
    fail at the first merged run; most such files are only declared that way. One that really
    computes per batch of one (a Reshape to [1, -1]) is refused with what to do.
    """
    model = onnx.load(str(path))
    weights = {tensor.name for tensor in model.graph.initializer}  # older exporters list them
    image = next(value for value in model.graph.input if value.name not in weights)  # as inputs
    for value in (image, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]  # inferred shapes with the old batch size would conflict
    rewritten = folder / "dynamic_batch.onnx"
    onnx.save(model, str(rewritten))
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 4  # the failure is expected here, and reported below
    try:
        session = ort.InferenceSession(
            str(rewritten), sess_options=quiet, providers=["CPUExecutionProvider"]
        )
        mixed = _rows_mixed(session, spec)
    except Exception as exc:  # ORT refuses the rewritten graph: it does depend on the batch
        mixed = ort_reason(exc)
    if mixed:
        raise ModelFileError(
            f"its batch axis is fixed and the graph depends on it (a batch of {BATCH_CHECK}: "
            f"{mixed}); re-export it with a dynamic batch axis (torch.onnx.export "
            "dynamic_axes={input: {0: 'batch'}}, flatten(1) rather than view(1, -1)), each "
            "image computed on its own"
        )
    return rewritten


def check_rows_independent(session: ort.InferenceSession, spec: PreprocessSpec) -> None:
    """A batch must give each image the answer it gets alone: the service merges concurrent
    requests into one run, and `evaluate` runs pictures 32 at a time. A graph that takes a
    statistic over the batch axis (`x - x.mean()` without `dim`, batch norm left in training
    mode) answered each image according to its neighbours, silently (a black-box review)."""
    try:
        mixed = _rows_mixed(session, spec)
    except Exception as exc:  # noqa: BLE001 - ORT's own words, in the refusal
        mixed = f"a batch failed where single runs did not: {str(exc)[-160:]}"
    if mixed:
        raise ModelFileError(
            f"the images of a batch change each other's answers (a batch of {BATCH_CHECK}: "
            f"{mixed}); the service runs concurrent requests together, so each image must be "
            "computed on its own: no statistic over the batch axis (x - x.mean() without dim, "
            "batch norm in training mode; export with model.eval())"
        )


def _rows_mixed(session: ort.InferenceSession, spec: PreprocessSpec) -> str:
    """Why a batch's rows differ from the same images run one at a time; "" when they do not."""
    inputs = sample_inputs(spec, BATCH_CHECK)
    name = session.get_inputs()[0].name
    together = session.run(None, {name: inputs})[0]
    alone = np.concatenate(
        [session.run(None, {name: inputs[i : i + 1]})[0] for i in range(BATCH_CHECK)]
    )
    # Loose enough for kernels that sum in another order for a batch; mixing moves far more.
    # (NaN where alone it is NaN too is the model's own answer: `output_facts` says so.)
    if together.shape == alone.shape and np.allclose(
        together, alone, rtol=1e-3, atol=1e-4, equal_nan=True
    ):
        return ""
    return "a batch gave other rows than single runs"


def sample_inputs(spec: PreprocessSpec, count: int) -> np.ndarray:
    """Half pictures of random pixels, half photo-like pictures, through the service's
    preprocess: only values a served picture can give. Noise drawn in tensor space (negative
    where the pixels are scaled to [0, 1]) made a model with a Sqrt of its input answer NaN, and
    that working model was refused (a review)."""
    rng = np.random.default_rng(0)
    noise = [
        Image.fromarray(rng.integers(0, 256, size=(72, 96, 3), dtype=np.uint8))
        for _ in range(count - count // 2)
    ]
    pictures = noise + [photo((96, 72), seed) for seed in range(count // 2)]
    return np.stack([preprocess(picture, spec) for picture in pictures])


@dataclass(frozen=True)
class OutputFacts:
    kind: str  # "logits" or "probabilities"
    note: str


def output_facts(
    session: ort.InferenceSession, spec: PreprocessSpec, labels: int, declared_kind: str
) -> OutputFacts:
    """Check the output is one class vector per image; tell logits from probabilities.

    Rows all in [0, 1] summing to 1 are probabilities (a softmax inside); rows in [0, 1] that do
    not sum to 1 are independent scores (a sigmoid): refused unless the kind is given. A kind
    given that the rows contradict is refused (`_check_declared_kind`).
    """
    inputs = sample_inputs(spec, 8)
    output = np.asarray(session.run(None, {session.get_inputs()[0].name: inputs})[0])
    squeezed = output.reshape(len(output), -1) if _one_vector_each(output.shape) else output
    if squeezed.ndim != 2 or squeezed.shape != (len(inputs), labels):
        raise ModelFileError(
            f"for a batch of {len(inputs)} it answers shape {list(output.shape)}: not a class "
            f"vector [N, C] with C = {labels} labels (detection, segmentation and embedding "
            "models are not image classifiers; or the labels file does not match the model: "
            "one label per line, blank lines not counted)"
        )
    if not np.isfinite(squeezed).all():
        raise ModelFileError("it answers non-finite values (NaN or infinity) on sample inputs")
    in_range = bool(((squeezed >= -1e-6) & (squeezed <= 1 + 1e-6)).all())
    sums = squeezed.sum(axis=1)
    probabilities = in_range and bool(np.allclose(sums, 1.0, atol=1e-3))
    if declared_kind != "auto":
        _check_declared_kind(declared_kind, probabilities, sums)
        return OutputFacts(declared_kind, f"output kind {declared_kind} (as given)")
    if probabilities:
        return OutputFacts("probabilities", "outputs are probabilities (rows in [0, 1], sum 1)")
    if in_range:
        raise ModelFileError(
            f"its outputs lie in [0, 1] but rows sum to {sums.min():.3g}..{sums.max():.3g}, not "
            "1: independent (sigmoid, multi-label) scores, not one class distribution; pass "
            "--output-kind logits to serve their softmax anyway"
        )
    return OutputFacts("logits", "outputs are logits (a softmax is applied when serving)")


def _check_declared_kind(kind: str, probabilities: bool, sums: np.ndarray) -> None:
    """A kind the sample rows contradict would be served wrong: "probabilities" that are not
    would be shown as they are (not summing to 1), and "logits" that already are probabilities
    would get a second softmax, which flattens them towards 1/C."""
    seen = f"rows summing to {sums.min():.3g}..{sums.max():.3g} on sample inputs"
    if kind == "probabilities" and not probabilities:
        raise ModelFileError(
            f"output kind is given as probabilities but the model answers {seen}, not "
            "probabilities (each in [0, 1], summing to 1): pass --output-kind logits to serve "
            "their softmax"
        )
    if kind == "logits" and probabilities:
        raise ModelFileError(
            f"output kind is given as logits but the model answers probabilities ({seen}, each "
            "in [0, 1]): a softmax over them would flatten them; pass --output-kind probabilities "
            "(or leave it auto)"
        )


def _one_vector_each(shape: tuple[int, ...]) -> bool:
    """[N, C, 1, 1] or [N, 1, C]: one vector per item with axes of one around it (as served)."""
    return len(shape) > 2 and sum(d != 1 for d in shape[1:]) <= 1


def staging_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="onnx-import-")
