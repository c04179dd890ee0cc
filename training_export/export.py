"""torch -> one self-contained ONNX file, then proof that ONNX Runtime computes the same thing."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from image_classifier.core.model_card import ModelCard
from image_classifier.core.postprocessing import softmax

from .recipe import OPSET
from .store import git_commit, library_versions, save_to_store

INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_PROBABILITY_DIFFERENCE = 1e-4


class ExportError(RuntimeError):
    """The exported model is not faithful: never save it."""


@dataclass(frozen=True)
class OnnxSignature:
    input_name: str
    input_shape: list[int | str | None]
    output_name: str
    output_shape: list[int | str | None]
    opset: int
    input_type: str = "FLOAT"  # the input's element type, as ONNX names it


def export_onnx(module: nn.Module, path: Path, example: np.ndarray) -> OnnxSignature:
    module.eval()
    torch.onnx.export(
        module,
        (torch.from_numpy(example[:1]),),
        str(path),
        dynamo=False,  # opset 17 in one file; the dynamo exporter needs onnxscript
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return inspect_onnx(path)


def inspect_onnx(path: Path, output: str | None = None) -> OnnxSignature:
    """Check the file is a valid ONNX model with one input and one output (or `output` named
    among several); read its signature."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"{path} is not a valid ONNX model: {exc}") from None
    inputs = [
        i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    outputs = {value.name: value for value in model.graph.output}
    if len(inputs) != 1:
        raise ExportError(f"{path}: expected one input, found {len(inputs)}")
    if output is None and len(outputs) != 1:
        listed = ", ".join(f"{name} {_shape(value)}" for name, value in outputs.items())
        raise ExportError(f"{path} has {len(outputs)} outputs ({listed}): name the one that "
                          "holds the class scores with --output NAME")  # fmt: skip
    if output is not None and output not in outputs:
        raise ExportError(f"{path} has no output {output!r} (it has {', '.join(outputs)})")
    chosen = outputs[output] if output is not None else model.graph.output[0]
    return OnnxSignature(
        input_name=inputs[0].name,
        input_shape=_shape(inputs[0]),
        output_name=chosen.name,
        output_shape=_shape(chosen),
        opset=default_opset(model),
        input_type=onnx.TensorProto.DataType.Name(inputs[0].type.tensor_type.elem_type),
    )


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (ai.onnx) operator set a model uses; 0 when it names none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def verify_onnx(path: Path, module: nn.Module, inputs: np.ndarray) -> float:
    """ONNX Runtime vs torch on every input: same argmax, probabilities within 1e-4."""
    module.eval()
    with torch.no_grad():
        expected = softmax(module(torch.from_numpy(inputs)).numpy())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = softmax(session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0])
    difference = float(np.abs(actual - expected).max())
    if difference > MAX_PROBABILITY_DIFFERENCE:
        raise ExportError(f"ONNX Runtime differs from torch by {difference:.2e} in probability")
    disagreements = int((actual.argmax(axis=1) != expected.argmax(axis=1)).sum())
    if disagreements:
        raise ExportError(f"ONNX Runtime and torch disagree on {disagreements} predictions")
    return difference


def export_and_save(
    module: nn.Module, inputs: np.ndarray, tag: str, **card_fields: Any
) -> tuple[str, float]:
    """Export, verify against torch on `inputs`, and save with a card that carries the file's
    signature, the library versions and the commit. Returns the tag and the largest probability
    difference between ONNX Runtime and torch."""
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        signature = export_onnx(module, onnx_path, inputs)
        difference = verify_onnx(onnx_path, module, inputs)
        card = ModelCard(
            output_kind="logits",
            input_name=signature.input_name,
            output_name=signature.output_name,
            opset=signature.opset,
            source="trained",
            versions=library_versions(),
            git_commit=git_commit(),
            **card_fields,
        )
        return save_to_store(onnx_path, card, tag), difference
