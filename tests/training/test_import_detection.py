"""import-onnx reads what the file says (layout, channels, size, batch axis, output kind) and
refuses what is not an image classifier; the stored model then answers through the core."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from image_classifier.core.classifier import Classifier
from image_classifier.core.postprocessing import softmax
from image_classifier.core.preprocessing import IMAGENET_SPEC, preprocess
from tests.model_store import store_model_dir, training_cli
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode
from tests.training.conftest import export_own
from tests.training.own_model import colour_picture
from training_export.export import ExportError, OnnxSignature
from training_export.onnx_facts import ModelFileError, input_facts
from training_export.onnx_import import ModelImportError, import_onnx, read_config, read_labels

LABELS = [f"kind {i}" for i in range(5)]


def imported(tmp_path, bentoml_home, name: str, notes: list[str] | None = None, **model):
    """Build a test ONNX model, import it with the imagenet preset, load it as the service."""
    folder = build_onnx_classifier(tmp_path / name, labels=5, **model)
    say = (notes if notes is not None else []).append
    tag = import_onnx(folder / "model.onnx", name, "v1", labels=LABELS, preset="imagenet", say=say)
    return Classifier(store_model_dir(bentoml_home, tag)), folder


def weights(folder) -> np.ndarray:
    model = onnx.load(str(folder / "model.onnx"))
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W")


def test_nhwc_input_size_and_channels_come_from_the_file(tmp_path, bentoml_home):
    notes: list[str] = []
    classifier, folder = imported(tmp_path, bentoml_home, "nhwc-model", notes,
                                  input_size=(40, 30), color_mode="RGB", layout="NHWC")  # fmt: skip
    spec = classifier.card.preprocessing
    assert (spec.layout, spec.color_mode, spec.input_size) == ("NHWC", "RGB", (40, 30))
    assert spec.mean == IMAGENET_SPEC.mean and spec.resize_mode == "center_crop"
    assert any("input_size (40, 30) from the file" in note for note in notes), notes
    picture = colour_picture(0, 5, "RGBA")
    # Expected through an NCHW preprocess, transposed by hand: the layout really is applied.
    nchw = preprocess(picture, spec.model_copy(update={"layout": "NCHW"}))
    expected = softmax(nchw.transpose(1, 2, 0).reshape(1, -1) @ weights(folder))[0]
    answer = classifier.classify(encode(picture, "PNG"), top_k=5)
    assert np.allclose([answer.probabilities[label] for label in LABELS], expected, atol=1e-5)


def test_a_file_with_several_outputs_is_imported_with_the_one_named(tmp_path, bentoml_home):
    """Exports often keep a second output (features, an auxiliary head): the import names them
    and asks which one holds the class scores; the stored file keeps only that one."""
    folder = build_onnx_classifier(tmp_path / "two", labels=5, input_size=(20, 20),
                                   color_mode="RGB", extra_output=True)  # fmt: skip
    path, quiet = folder / "model.onnx", {"say": lambda _: None, "preset": "imagenet"}
    with pytest.raises(ExportError, match=r"2 outputs \(features \[.*\], output \[.*\]\): "
                                          r"name the one .* with --output NAME"):  # fmt: skip
        import_onnx(path, "two", "v1", labels=LABELS, **quiet)
    with pytest.raises(ExportError, match="has no output 'logits' \\(it has features, output\\)"):
        import_onnx(path, "two", "v1", labels=LABELS, output="logits", **quiet)
    tag = import_onnx(path, "two", "v1", labels=LABELS, output="output", **quiet)
    stored = store_model_dir(bentoml_home, tag)
    saved = onnx.load(str(stored / "model.onnx"))
    assert [value.name for value in saved.graph.output] == ["output"]
    assert [node.op_type for node in saved.graph.node] == ["Reshape", "MatMul", "Identity"]
    assert "two" not in {tensor.name for tensor in saved.graph.initializer}  # its weight too
    classifier = Classifier(stored)
    picture = colour_picture(1, 3)
    tensor = preprocess(picture, classifier.card.preprocessing)
    expected = softmax(tensor.reshape(1, -1) @ weights(folder))[0]
    answer = classifier.classify(encode(picture, "PNG"), top_k=5)
    assert np.allclose([answer.probabilities[label] for label in LABELS], expected, atol=1e-5)


def test_softmax_outputs_are_detected_as_probabilities_grey_gets_one_mean(tmp_path, bentoml_home):
    notes: list[str] = []
    classifier, folder = imported(tmp_path, bentoml_home, "softmax-model", notes,
                                  input_size=(20, 20), color_mode="L",
                                  output_kind="probabilities")  # fmt: skip
    card = classifier.card
    assert card.output_kind == "probabilities"
    assert card.preprocessing.mean == (round(sum(IMAGENET_SPEC.mean) / 3, 4),), notes
    picture = colour_picture(1, 6, "L")
    flat = preprocess(picture, card.preprocessing).reshape(1, -1)
    expected = softmax(flat @ weights(folder))[0]  # the model's own softmax, applied once
    answer = classifier.classify(encode(picture, "PNG"), top_k=5)
    assert np.allclose([answer.probabilities[label] for label in LABELS], expected, atol=1e-5)


def test_a_refused_import_never_said_it_saved_anything(tmp_path, bentoml_home):
    """The batch-axis note ("saved with a dynamic one") came before the label check refused."""
    folder = build_onnx_classifier(tmp_path / "refused", labels=5, batch=1)
    notes: list[str] = []
    with pytest.raises(ModelFileError, match="labels"):
        import_onnx(folder / "model.onnx", "refused", "v1", labels=LABELS[:3], say=notes.append)
    assert not any("saved" in note for note in notes), notes


def test_a_batch_axis_fixed_at_one_is_made_dynamic_when_rows_stay_the_same(tmp_path, bentoml_home):
    notes: list[str] = []
    classifier, _ = imported(tmp_path, bentoml_home, "batch-one", notes,
                             input_size=(20, 20), color_mode="RGB", batch=1)  # fmt: skip
    assert any("fixes the batch axis at 1" in note for note in notes), notes
    assert classifier.session.get_inputs()[0].shape[0] == "batch"
    tensors = [np.full(classifier.card.preprocessing.tensor_shape, v, np.float32)
               for v in (-1.0, 0.0, 0.5, 1.0)]  # fmt: skip
    together = classifier.run(tensors)  # one run of 4: the service's merged batch
    assert np.allclose(together, np.concatenate([classifier.run([t]) for t in tensors]))


def test_weights_listed_as_inputs_before_the_picture_do_not_hide_its_batch_axis(
    tmp_path, bentoml_home
):
    """Older exporters list initializers among the graph's inputs, first: the batch axis made
    dynamic was a weight's, and the model was refused (found by a black-box review)."""
    folder = build_onnx_classifier(tmp_path / "weights-first", labels=5, input_size=(20, 20),
                                   color_mode="RGB", batch=1)  # fmt: skip
    model = onnx.load(str(folder / "model.onnx"))
    picture = list(model.graph.input)
    as_inputs = [onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                 for t in model.graph.initializer]  # fmt: skip
    del model.graph.input[:]
    model.graph.input.extend([*as_inputs, *picture])
    onnx.save(model, str(folder / "model.onnx"))
    tag = import_onnx(folder / "model.onnx", "weights-first", "v1", labels=LABELS,
                      preset="imagenet", say=lambda _: None)  # fmt: skip
    classifier = Classifier(store_model_dir(bentoml_home, tag))
    assert classifier.session.get_inputs()[0].shape[0] == "batch"
    tensors = [np.full(classifier.card.preprocessing.tensor_shape, v, np.float32) for v in (0, 1)]
    assert classifier.run(tensors).shape == (2, 5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"batch": 1, "flatten_batch": 1}, "batch axis is fixed and the graph depends on it"),
        # Found by a black-box review: imported, then each answer depended on its neighbours.
        ({"mix_batch": True}, "the images of a batch change each other's answers"),
        ({"mix_batch": True, "batch": 1}, "batch axis is fixed and the graph depends on it"),
        ({"output_kind": "sigmoid"}, "independent (sigmoid, multi-label) scores"),
        ({"labels": 10, "output_dims": (-1, 2, 5)}, "not a class vector [N, C] with C = 10"),
        ({"labels": 7}, "not a class vector [N, C] with C = 5 labels"),
    ],
    ids=[
        "graph-fixes-batch",
        "mixes-the-batch",
        "fixed-and-mixes",
        "sigmoid",
        "not-a-vector",
        "labels-mismatch",
    ],
)
def test_what_is_not_a_servable_classifier_is_refused(tmp_path, bentoml_home, model, message):
    labels = model.pop("labels", 5)
    folder = build_onnx_classifier(tmp_path / "m", labels=labels, input_size=(20, 20),
                                   color_mode="RGB", **model)  # fmt: skip
    wanted = [f"l{i}" for i in range(10 if "output_dims" in model else 5)]
    with pytest.raises(ModelFileError, match=re.escape(message)) as refused:
        import_onnx(folder / "model.onnx", "refused", "v1", labels=wanted, say=lambda _: None)
    assert not (bentoml_home / "models" / "refused").exists()
    assert "onnxruntime::" not in str(refused.value)  # ONNX Runtime's words, not its C++ names


def test_an_input_of_neither_1_nor_3_channels_is_refused_by_its_shape(tmp_path, bentoml_home):
    """A 4-channel input was told "the file leaves it open" and, given the flags asked for,
    failed inside ONNX Runtime (found by a black-box review)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((4 * 8 * 8, 5), np.float32), "W")
    flat = numpy_helper.from_array(np.array([-1, 4 * 8 * 8], np.int64), "flat_shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["scores"])],
        "rgba",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
        [weights, flat],
    )  # fmt: skip
    path = tmp_path / "rgba.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelFileError, match=re.escape("4 channels (NCHW) or 8 (NHWC)")):
        import_onnx(path, "rgba", "v1", labels=LABELS, say=lambda _: None)


def test_cli_refusals_are_one_line_with_exit_1(tmp_path, bentoml_home):
    folder = build_onnx_classifier(tmp_path / "m", labels=5, input_size=(20, 20),
                                   color_mode="RGB", output_kind="sigmoid")  # fmt: skip
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    args = ["import-onnx", str(folder / "model.onnx"), "--name", "cli-sigmoid", "--labels",
            str(labels), "--preset", "imagenet"]  # fmt: skip
    refused = training_cli(*args, "--version", "v1", home=bentoml_home)
    assert refused.returncode == 1 and refused.stderr.startswith("error: its outputs lie in")
    assert "Traceback" not in refused.stderr
    contradicted = training_cli(*args, "--version", "v2", "--layout", "NHWC", home=bentoml_home)
    assert contradicted.returncode == 1, contradicted.stdout
    assert "layout is given as NHWC but the file's input says NCHW" in contradicted.stderr
    forced = training_cli(*args, "--version", "v3", "--output-kind", "logits", home=bentoml_home)
    assert forced.returncode == 0, forced.stderr
    again = training_cli(*args, "--version", "v3", "--output-kind", "logits", home=bentoml_home)
    assert again.returncode == 1 and "already in the model store" in again.stderr
    # A field the card refuses (labels twice, a mean of the wrong length) was pydantic's text
    # over several lines, with its links.
    labels.write_text("\n".join([LABELS[0], *LABELS[:4]]))
    for extra in (("--output-kind", "logits"), ("--output-kind", "logits", "--mean", "0.5", "0.5")):
        refused = training_cli(*args, "--version", "v4", *extra, home=bentoml_home)
        assert refused.returncode == 1 and refused.stderr.startswith("error: "), refused.stderr
        assert refused.stderr.count("\n") == 1 and "pydantic.dev" not in refused.stderr


@pytest.mark.parametrize(
    ("model", "given", "message"),
    [
        ("sigmoid", "probabilities", "output kind is given as probabilities but the model answers "
                                     "rows summing to"),
        ("logits", "probabilities", "output kind is given as probabilities"),
        ("probabilities", "logits", "output kind is given as logits but the model answers "
                                    "probabilities (rows summing to 1..1"),
    ],
    ids=["sigmoid-as-probabilities", "logits-as-probabilities", "probabilities-as-logits"],
)  # fmt: skip
def test_an_output_kind_its_rows_contradict_is_refused(tmp_path, bentoml_home, model, given,
                                                       message):  # fmt: skip
    """Sigmoid scores served as probabilities (rows summing to 2.7), a softmax applied twice:
    both were accepted silently (found by a black-box review)."""
    folder = build_onnx_classifier(tmp_path / "m", labels=5, input_size=(20, 20),
                                   color_mode="RGB", output_kind=model)  # fmt: skip
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    name = f"{model}-as-{given}"
    refused = training_cli("import-onnx", str(folder / "model.onnx"), "--name", name, "--version",
                           "v1", "--labels", str(labels), "--preset", "imagenet", "--output-kind",
                           given, home=bentoml_home)  # fmt: skip
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith(f"error: {message}"), refused.stderr
    assert refused.stderr.count("\n") == 1 and "--output-kind" in refused.stderr
    assert not (bentoml_home / "models" / name).exists()


@pytest.mark.parametrize(
    ("name", "labels", "says"),
    [
        ("latin1", b"caf\xe9\ndog\nbird\nfish\nfrog\n",
         "labels.txt: not UTF-8 text (byte 0xe9 at position 3); save it as UTF-8, one label per "
         "line"),
        ("dup", b"cat\ndog\ncat\nfish\nfish\n",
         "labels.txt: labels must be unique; given more than once: 'cat', 'fish'"),
        ("my model", b"cat\ndog\nbird\nfish\nfrog\n",
         "--name 'my model': may hold only a-z, 0-9, '_', '-' and '.' (no spaces)"),
    ],
    ids=["labels-not-utf8", "labels-repeated", "name-with-a-space"],
)  # fmt: skip
def test_a_mistake_is_named_in_one_line_before_any_output(tmp_path, bentoml_home, name, labels,
                                                          says):  # fmt: skip
    """The codec's, pydantic's and BentoML's own words named neither the file nor the fix, and
    repeated labels were refused only after the import's first line (found by a black-box
    review)."""
    folder = build_onnx_classifier(tmp_path / "m", labels=5, input_size=(20, 20), color_mode="RGB")
    (tmp_path / "labels.txt").write_bytes(labels)
    refused = training_cli("import-onnx", str(folder / "model.onnx"), "--name", name, "--version",
                           "v1", "--labels", str(tmp_path / "labels.txt"), "--preset", "imagenet",
                           home=bentoml_home)  # fmt: skip
    assert refused.returncode == 1 and refused.stdout == "", refused.stdout
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert says in refused.stderr, refused.stderr


def test_export_torch_refuses_a_name_the_store_cannot_hold_before_exporting(own_model, tmp_path):
    refused = export_own(own_model, tmp_path / "home", "my model:v1")
    assert refused.returncode == 1 and refused.stdout == "", refused.stdout  # no parity lines
    assert refused.stderr.startswith("error: --name 'my model': may hold only"), refused.stderr


def test_a_labels_file_from_a_windows_editor_reads_as_plain_labels(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffcat\r\ndog\r\n\r\nbird\r\n".encode())
    assert read_labels(path) == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"labels": ["a", "b"]\n "output_kind": "logits"}', "not a readable JSON file"),
        ('["a", "b"]', "a JSON object of card fields"),
        ('{"labels": "red,green,blue"}', "'labels' must be a list of strings"),
        ('{"labels": ["only"]}', "need at least two labels"),
        ('{"labels": ["cat", " ", "dog"]}', "labels must not be blank (at positions [1])"),
        ('{"labels": ["cat", "dog", "cat"]}', "given more than once: 'cat'"),
    ],
    ids=["broken-json", "a-list", "labels-as-one-string", "one-label", "blank-label", "repeat"],
)
def test_a_config_file_that_cannot_be_read_is_named(tmp_path, content, says):
    """A string of labels was read as one label per character; broken JSON was refused without
    the file's name; a config's labels skipped the labels file's checks."""
    path = tmp_path / "card.json"
    path.write_text(content)
    with pytest.raises(ModelImportError) as refused:
        read_config(path)
    assert str(refused.value).startswith(f"{path}: ") and says in str(refused.value)


def test_a_float16_input_is_named_as_the_reason_even_with_a_fixed_batch(tmp_path, bentoml_home):
    """The batch axis is not what is wrong with it: say what is, first."""
    folder = build_onnx_classifier(tmp_path / "m", labels=5, input_size=(20, 20), batch=1,
                                   color_mode="RGB", flatten_batch=1)  # fmt: skip
    model = onnx.load(str(folder / "model.onnx"))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model.graph.input[0].name = "half"
    cast = onnx.helper.make_node("Cast", ["half"], ["input"], to=onnx.TensorProto.FLOAT)
    model.graph.node.insert(0, cast)
    onnx.save(model, str(folder / "half.onnx"))
    with pytest.raises(ModelFileError, match="the input is FLOAT16; the service feeds float32"):
        import_onnx(folder / "half.onnx", "half", "v1", labels=LABELS, say=lambda _: None)


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ({"output_dims": (-1, 1, 5)}, {}),  # [N, 1, C]: one class vector per item
        ({"batch": 0}, {}),  # a batch axis fixed at 0 (nothing fits it): made dynamic
        ({"input_size": (32, 3)}, {"preprocessing": {"layout": "NCHW"}}),  # [N, 3, 32, 3]
    ],
    ids=["n-1-c-output", "batch-0", "layout-settles-3-32-3"],
)
def test_odd_but_servable_files_import_and_answer(tmp_path, bentoml_home, request, model, options):
    name = f"odd-{request.node.callspec.id}"
    folder = build_onnx_classifier(tmp_path / "m", labels=5, color_mode="RGB",
                                   **{"input_size": (20, 20), **model})  # fmt: skip
    tag = import_onnx(folder / "model.onnx", name, "v1", labels=LABELS, preset="imagenet",
                      say=lambda _: None, **options)  # fmt: skip
    classifier = Classifier(store_model_dir(bentoml_home, tag))
    assert classifier.card.preprocessing.input_size == model.get("input_size", (20, 20))
    tensors = [np.full(classifier.card.preprocessing.tensor_shape, v, np.float32) for v in (0, 1)]
    assert classifier.run(tensors).shape == (2, 5)


def test_weights_kept_beside_the_file_are_stored_inside_it(tmp_path, bentoml_home):
    """ONNX external data: the store keeps one file, so the weights go into it."""
    folder = build_onnx_classifier(tmp_path / "m", labels=5, input_size=(20, 20), color_mode="RGB")
    outside = tmp_path / "outside"
    outside.mkdir()
    onnx.save(onnx.load(str(folder / "model.onnx")), str(outside / "model.onnx"),
              save_as_external_data=True, location="weights.bin", size_threshold=0)  # fmt: skip
    tag = import_onnx(outside / "model.onnx", "outside", "v1", labels=LABELS, preset="imagenet",
                      say=lambda _: None)  # fmt: skip
    stored = store_model_dir(bentoml_home, tag)
    assert not (stored / "weights.bin").exists()
    np.testing.assert_array_equal(weights(stored), weights(folder))
    assert Classifier(stored).run([np.zeros((3, 20, 20), np.float32)]).shape == (1, 5)


def test_a_model_finite_on_every_picture_it_can_be_sent_imports(tmp_path, bentoml_home):
    """A Sqrt of the input (a gamma step) on pixels scaled to [0, 1]: NaN only for negative
    values, which no picture gives. Sample inputs drawn as noise in tensor space were negative,
    and this working model was refused as one whose batch rows mix (a review)."""
    folder = build_onnx_classifier(tmp_path / "m", labels=5, input_size=(20, 20),
                                   color_mode="RGB")  # fmt: skip
    model = onnx.load(str(folder / "model.onnx"))
    picture = model.graph.input[0].name
    for node in model.graph.node:  # every use of the input now takes its square root
        node.input[:] = ["gamma" if name == picture else name for name in node.input]
    model.graph.node.insert(0, onnx.helper.make_node("Sqrt", [picture], ["gamma"]))
    onnx.save(model, str(folder / "gamma.onnx"))
    plain = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    tag = import_onnx(folder / "gamma.onnx", "gamma", "v1", labels=LABELS,
                      preprocessing=plain, say=lambda _: None)  # fmt: skip
    classifier = Classifier(store_model_dir(bentoml_home, tag))
    tensors = [
        preprocess(colour_picture(label, 0), classifier.card.preprocessing) for label in (0, 1)
    ]
    assert np.isfinite(classifier.run(tensors)).all()


@pytest.mark.parametrize(
    ("shape", "layout", "size"),
    [
        (["N", "C", 32, 24], "NCHW", (32, 24)),  # the channels left open, the size fixed
        (["N", 32, 24, "C"], "NHWC", (32, 24)),
        (["N", 3, 32, 24], "NCHW", (32, 24)),
        (["N", "C", "H", "W"], None, None),  # nothing to read: the flags must say
    ],
)
def test_the_size_is_read_from_the_file_when_only_the_channels_are_open(shape, layout, size):
    """[N, C, 32, 32] asked for --input-size though the file says 32x32 (a review)."""
    facts = input_facts(OnnxSignature("x", shape, "y", ["N", 5], 17))
    assert (facts.layout, facts.input_size) == (layout, size)
