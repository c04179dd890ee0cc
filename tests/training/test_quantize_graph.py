"""What the INT8 quantization keeps in float32, on small ONNX graphs built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from image_classifier.core.classifier import read_card
from image_classifier.core.model_card import ModelCard
from image_classifier.core.preprocessing import PreprocessSpec
from tests.model_store import store_model_dir
from tests.onnx_models import build_onnx_classifier
from training_export.quantize import QuantizationError, quantize_qdq, save_int8

CLASSES = 20


def _classifier_heads() -> dict[str, list[onnx.NodeProto]]:
    """Ways a net turns its features ("relu") into class scores ("logits")."""
    pooled = [
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
    ]
    return {
        "dense": [
            *pooled,
            helper.make_node("MatMul", ["flat", "dense_w"], ["logits"], name="dense"),
        ],
        # torch's `softmax(self.head(x) * 3)`: a scale between the classifier and the softmax
        "scaled-dense": [
            *pooled,
            helper.make_node("Gemm", ["flat", "dense_w"], ["dense"], name="dense"),
            helper.make_node("Constant", [], ["scale"], name="scale",
                             value=numpy_helper.from_array(np.array(3.0, np.float32))),
            helper.make_node("Mul", ["dense", "scale"], ["logits"], name="scaled"),
        ],
        # SqueezeNet's: a 1x1 convolution per class, then pooled
        "conv": [
            helper.make_node("Conv", ["relu", "class_w"], ["class_maps"], name="classes"),
            helper.make_node("GlobalAveragePool", ["class_maps"], ["pooled"], name="pool"),
            helper.make_node("Flatten", ["pooled"], ["logits"], name="flatten"),
        ],
    }  # fmt: skip


def conv_net_with_softmax(
    path: Path, head: str = "dense", named: bool = True, opset: int = 17
) -> Path:
    """Conv, ReLU, a classifier head (`_classifier_heads`) and a softmax: probabilities out.
    `named=False`: no node has a name (optional in ONNX; `onnx.helper` graphs often lack them)."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 1.0, (8, CLASSES)).astype(np.float32), "dense_w"),
        numpy_helper.from_array(
            rng.normal(0, 1.0, (CLASSES, 8, 1, 1)).astype(np.float32), "class_w"
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        *_classifier_heads()[head],
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    if not named:
        for node in nodes:
            node.name = ""
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, "net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        [weight for weight in weights if weight.name in used],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("head", "named"),
    [("dense", True), ("scaled-dense", True), ("conv", True), ("scaled-dense", False)],
    ids=["dense", "scaled-dense", "conv", "unnamed-nodes"],
)
def test_a_final_softmax_stays_float32(tmp_path, head, named):
    """Quantized, its probabilities came in steps of 1/255: most exactly 0, and tied. A scale
    before the softmax (or a convolution as the classifier) hid it from the float32 tail (found
    by a black-box review: served rows summed to 0.98). Unnamed nodes: excluded by the name ""
    they share, the conv stayed float32 too, and quantize refused the model (another review)."""
    source = conv_net_with_softmax(tmp_path / "net.onnx", head, named)
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


def test_the_int8_card_states_the_opset_of_its_file(tmp_path, bentoml_home):
    """ONNX Runtime's quantizer upgrades an opset-10 file to 11; the INT8 card said 10, the
    source's (found by a black-box review)."""
    source = conv_net_with_softmax(tmp_path / "net.onnx", opset=10)
    calibration = np.random.default_rng(3).random((16, 3, 16, 16), dtype=np.float32)
    quantize_qdq(source, tmp_path / "int8.onnx", "input", calibration)
    file_opset = next(o.version for o in onnx.load(str(tmp_path / "int8.onnx")).opset_import
                      if o.domain in ("", "ai.onnx"))  # fmt: skip
    assert file_opset > 10
    card = ModelCard(
        name="opset-ten", labels=[f"c{i}" for i in range(CLASSES)], output_kind="probabilities",
        preprocessing=PreprocessSpec(input_size=(16, 16), color_mode="RGB"),
        input_name="input", output_name="probabilities", opset=10,
    )  # fmt: skip
    tag = save_int8(tmp_path / "int8.onnx", card, "opset-ten:v1", "opset-ten-int8:v1", {}, {})
    assert read_card(store_model_dir(bentoml_home, tag)).opset == file_opset
