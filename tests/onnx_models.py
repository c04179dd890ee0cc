"""Small ONNX classifiers the tests build themselves, each in a model folder with its card."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_onnx_classifier(
    model_dir: Path,
    *,
    labels: int = 10,
    input_size: tuple[int, int] = (28, 28),
    color_mode: str = "L",
    output_kind: str = "logits",
    fail_when_mean_below: float | None = None,
    seed: int = 0,
    batch: int | str = "batch",
    flatten_batch: int = -1,
    output_dims: tuple[int, ...] | None = None,
    extra_output: bool = False,
    mix_batch: bool = False,
    **spec_options,
) -> Path:
    """A linear ONNX classifier and its card.json in `model_dir` (a served-model folder).

    `fail_when_mean_below` makes the model fail at run time on inputs whose mean is below the
    threshold (a Reshape to a shape that cannot fit), and so does any batch holding one:
    a real model fault, for error-path tests. `output_kind` "sigmoid" gives independent scores;
    `batch` fixes the declared batch axis, `flatten_batch` = 1 makes the graph depend on it;
    `output_dims` reshapes the output (-1 first) into something else than a class vector;
    `extra_output` adds a second output first, "features" (the flattened input, doubled);
    `mix_batch` subtracts the whole batch's mean first (`x - x.mean()` with no dim): each image's
    answer then depends on the others in its run.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from image_classifier.core.model_card import ModelCard
    from image_classifier.core.preprocessing import PreprocessSpec

    spec = PreprocessSpec(input_size=input_size, color_mode=color_mode, **spec_options)
    features = int(np.prod(spec.tensor_shape))
    rng = np.random.default_rng(seed)
    init = [
        numpy_helper.from_array(rng.normal(size=(features, labels)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([flatten_batch, features], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["batch_mean"], keepdims=1),
        helper.make_node("Sub", ["input", "batch_mean"], ["centred"]),
    ] if mix_batch else []  # fmt: skip
    nodes += [
        helper.make_node("Reshape", ["centred" if mix_batch else "input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
    ]
    final = "scores"
    if output_kind == "probabilities":
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
        final = "probs"
    elif output_kind == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["scores"], ["probs"]))
        final = "probs"
    if output_dims is not None:
        init.append(numpy_helper.from_array(np.array(output_dims, np.int64), "out_dims"))
        nodes.append(helper.make_node("Reshape", [final, "out_dims"], ["reshaped"]))
        final = "reshaped"
    if fail_when_mean_below is not None:
        # shape = [-1, labels] normally, [-1, labels + 1] (impossible) when the input is dark.
        init += [
            numpy_helper.from_array(np.array(fail_when_mean_below, np.float32), "threshold"),
            numpy_helper.from_array(np.array([-1, labels], np.int64), "good_shape"),
            numpy_helper.from_array(np.array([-1, labels + 1], np.int64), "bad_shape"),
        ]
        nodes += [
            helper.make_node("ReduceMean", ["input"], ["means"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("ReduceMin", ["means"], ["darkest"], keepdims=0),
            helper.make_node("Less", ["darkest", "threshold"], ["dark"]),
            helper.make_node("Where", ["dark", "bad_shape", "good_shape"], ["out_shape"]),
            helper.make_node("Reshape", [final, "out_shape"], ["checked"]),
        ]
        final = "checked"
    nodes.append(helper.make_node("Identity", [final], ["output"]))
    output_shape = (
        [batch, labels] if output_dims is None else [batch, *("d" * (len(output_dims) - 1))]
    )
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)]
    if extra_output:
        init.append(numpy_helper.from_array(np.array(2, np.float32), "two"))
        nodes.append(helper.make_node("Mul", ["flat", "two"], ["features"]))
        shape = [batch, features]
        outputs.insert(0, helper.make_tensor_value_info("features", TensorProto.FLOAT, shape))
    graph = helper.make_graph(
        nodes,
        "test-classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *spec.tensor_shape])],
        outputs,
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "model.onnx")
    card = ModelCard(
        name="test-classifier",
        labels=[f"class_{i}" for i in range(labels)],
        preprocessing=spec,
        output_kind="logits" if output_kind == "sigmoid" else output_kind,
        input_name="input",
        output_name="output",
        opset=17,
        source="imported",
    )
    (model_dir / "card.json").write_text(card.model_dump_json())
    return model_dir
