"""What the INT8 quantization keeps in float32, on small ONNX graphs built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_models import build_onnx_classifier
from training_export.quantize import QuantizationError, quantize_qdq

CLASSES = 20


def conv_net_with_softmax(path: Path) -> Path:
    """Conv, ReLU, pooling, a dense classifier and a softmax: probabilities out."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 1.0, (8, CLASSES)).astype(np.float32), "dense_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "dense_w"], ["logits"], name="dense"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_a_final_softmax_stays_float32(tmp_path):
    """Quantized, its probabilities came in steps of 1/255: most exactly 0, and tied."""
    source = conv_net_with_softmax(tmp_path / "net.onnx")
    calibration = np.random.default_rng(1).random((32, 3, 16, 16), dtype=np.float32)
    quantize_qdq(source, tmp_path / "int8.onnx", "input", calibration)
    quantized = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    assert any(node.op_type == "QuantizeLinear" for node in quantized)  # the conv is INT8
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"input": calibration[:8]})[0]
    assert np.allclose(rows.sum(axis=1), 1.0, atol=1e-5)
    assert (rows > 0).all()  # no class rounded down to exactly 0
    steps = rows * 255
    assert not np.allclose(steps, np.round(steps), atol=1e-3)  # not in 1/255 steps


def test_a_model_with_nothing_to_quantize_is_refused(tmp_path):
    """Its one dense layer is the classifier, which stays float32: an "INT8" model of it was
    saved, float32 all through."""
    folder = build_onnx_classifier(tmp_path / "linear")
    calibration = np.random.default_rng(2).random((16, 1, 28, 28), dtype=np.float32)
    with pytest.raises(QuantizationError, match="nothing in this model is quantized"):
        quantize_qdq(folder / "model.onnx", tmp_path / "int8.onnx", "input", calibration)
