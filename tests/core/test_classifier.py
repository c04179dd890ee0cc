"""The core end to end in one process, on small ONNX models the tests build themselves."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from image_classifier.core.classifier import (
    Classifier,
    ClassifierOptions,
    ModelLoadError,
    NonFiniteOutput,
)
from image_classifier.core.decoding import PixelBudget
from image_classifier.core.errors import ClassifierError, ErrorCode
from image_classifier.core.preprocessing import preprocess
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode

OPTIONS = ClassifierOptions(max_batch=32)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Classifier:
    model_dir = build_onnx_classifier(tmp_path_factory.mktemp("model"), mean=(0.5,), std=(0.5,))
    instance = Classifier(model_dir, OPTIONS)
    instance.warm_up()
    return instance


def test_core_and_serving_run_without_a_web_framework():
    code = (
        "import sys, importlib, pkgutil, image_classifier.core, image_classifier.serving\n"
        "for package in (image_classifier.core, image_classifier.serving):\n"
        "    for m in pkgutil.iter_modules(package.__path__):\n"
        "        importlib.import_module(package.__name__ + '.' + m.name)\n"
        "loaded = {'bentoml', 'starlette', 'fastapi'} & set(sys.modules)\n"
        "assert not loaded, f'imported below the http floor: {loaded}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_classify_matches_a_direct_model_run(classifier):
    image = Image.effect_noise((40, 30), 80).convert("L")
    prediction = classifier.classify(encode(image, "PNG"), top_k=4)
    expected = classifier.run([preprocess(image, classifier.card.preprocessing)])
    assert prediction.label == classifier.card.labels[int(expected[0].argmax())]
    assert prediction.confidence == pytest.approx(float(expected[0].max()), rel=1e-6)
    assert len(prediction.top_k) == 4
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, rel=1e-5)


def test_batched_and_single_runs_agree(classifier):
    tensors = [preprocess(Image.effect_noise((28, 28), s).convert("L"),
                          classifier.card.preprocessing) for s in range(5, 45)]  # fmt: skip
    batched = classifier.run(tensors)  # 40 items: two runs of at most 32
    singles = np.concatenate([classifier.run([t]) for t in tensors])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


@pytest.mark.parametrize("top_k", [0, 11, -1])
def test_top_k_out_of_range(classifier, top_k):
    with pytest.raises(ClassifierError) as caught:
        classifier.resolve_top_k(top_k)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_default_top_k(classifier):
    assert classifier.resolve_top_k(None) == OPTIONS.default_top_k


def test_probability_models_are_not_softmaxed_twice(tmp_path):
    model_dir = build_onnx_classifier(tmp_path, labels=4, output_kind="probabilities")
    classifier = Classifier(model_dir, OPTIONS)
    probabilities = classifier.run([np.ones((1, 28, 28), np.float32)])
    raw = classifier.session.run(None, {"input": np.ones((1, 1, 28, 28), np.float32)})[0]
    np.testing.assert_allclose(probabilities, raw, rtol=1e-6)


def test_rgb_models_are_served_from_their_card(tmp_path):
    model_dir = build_onnx_classifier(
        tmp_path, labels=3, input_size=(32, 48), color_mode="RGB", resize_mode="letterbox"
    )
    prediction = Classifier(model_dir, OPTIONS).classify(encode(Image.new("L", (5, 90)), "PNG"))
    assert prediction.label in {"class_0", "class_1", "class_2"}


def test_one_poison_input_fails_alone(tmp_path):
    model_dir = build_onnx_classifier(tmp_path, fail_when_mean_below=-0.5)
    classifier = Classifier(model_dir, OPTIONS)
    classifier.warm_up()  # zeros are fine: the fault needs a dark input
    good = np.ones((1, 28, 28), np.float32)
    poison = -np.ones((1, 28, 28), np.float32)
    with pytest.raises(Exception):  # noqa: B017 - ONNX Runtime's own error type
        classifier.run([good, poison, good])
    results = classifier.run_isolating_faults([good, poison, good])
    assert isinstance(results[1], Exception) and not isinstance(results[1], NonFiniteOutput)
    assert all(isinstance(results[i], np.ndarray) for i in (0, 2))


def test_an_input_the_model_answers_nan_for_fails_alone(tmp_path):
    classifier = Classifier(build_onnx_classifier(tmp_path), OPTIONS)
    good = np.ones((1, 28, 28), np.float32)
    overflowing = np.full((1, 28, 28), 3e38, np.float32)  # logits overflow: softmax gives NaN
    with pytest.raises(NonFiniteOutput):
        classifier.run([good, overflowing])
    results = classifier.run_isolating_faults([good, overflowing, good])
    assert isinstance(results[1], NonFiniteOutput)  # told apart from a model that raised
    assert all(np.isfinite(results[i]).all() for i in (0, 2))


def test_pixels_pillow_cannot_convert_are_the_images_fault_not_a_500(classifier):
    """Pillow decodes a palette PNG with 257 tRNS entries, then raises converting it: that is the
    picture's doing (INVALID_IMAGE), and a grey TIFF with premultiplied alpha (La) converts."""
    from tests.hostile_corpus import la_png, palette_png_with_a_long_trns, premultiplied_la_tiff

    with pytest.raises(ClassifierError) as refused:
        classifier.prepare(palette_png_with_a_long_trns(), "image/png")
    assert refused.value.code == ErrorCode.INVALID_IMAGE
    assert "(P)" in refused.value.message
    opaque_la = classifier.prepare(la_png(2), "image/png")  # the same picture, alpha 255
    np.testing.assert_array_equal(classifier.prepare(premultiplied_la_tiff(2), None), opaque_la)


def test_mismatched_card_is_refused_at_load(tmp_path):
    model_dir = build_onnx_classifier(tmp_path)
    card = (
        (model_dir / "card.json")
        .read_text()
        .replace('"input_size":[28,28]', '"input_size":[32,32]')
    )
    (model_dir / "card.json").write_text(card)
    with pytest.raises(ModelLoadError, match="does not fit"):
        Classifier(model_dir)


def test_corrupt_onnx_file_is_refused_at_load(tmp_path):
    model_dir = build_onnx_classifier(tmp_path)
    (model_dir / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ModelLoadError, match="cannot load"):
        Classifier(model_dir)


def test_warm_up_times_what_merging_saves(classifier):
    # A tiny model's run costs mostly per call: 32 images in one run cost far less per image.
    assert classifier.merging_gain > 2


def test_a_busy_moment_at_warm_up_does_not_pass_for_a_merging_gain(tmp_path, monkeypatch):
    """The workers of one server warm up at the same time. A model whose runs cost the same per
    image at any size (10 ms) must measure a gain near 1 even when its first runs are slowed
    (by 50 ms each, the other worker busy): timed one size after the other, all of the runs of
    one were slow and the gain came out near 6."""
    instance = Classifier(build_onnx_classifier(tmp_path), ClassifierOptions(max_batch=8))
    calls = []

    def fixed_cost_per_image(batch, session, run_options=None):
        calls.append(len(batch))
        time.sleep(0.010 * len(batch) + (0.050 if len(calls) <= 4 else 0))
        return np.zeros((len(batch), len(instance.labels)), np.float32)

    monkeypatch.setattr(instance, "_probabilities", fixed_cost_per_image)
    instance.warm_up()
    assert 0.8 < instance.merging_gain < 1.25, instance.merging_gain


def test_the_fingerprint_follows_the_model_and_what_admits_or_grades_a_picture(tmp_path):
    """Replicas sharing a cache key answers by it (with the tag): another model file under the
    same tag, or stricter limits, got another replica's answers (a black-box review found it).
    Thread counts do not change an answer and keep it."""
    model_dir = build_onnx_classifier(tmp_path / "a", mean=(0.5,), std=(0.5,))
    other_weights = build_onnx_classifier(tmp_path / "b", mean=(0.5,), std=(0.5,), seed=1)
    base = Classifier(model_dir, OPTIONS).fingerprint
    assert (
        Classifier(model_dir, ClassifierOptions(max_batch=4, intra_op_threads=2)).fingerprint
        == base
    )
    assert Classifier(other_weights, OPTIONS).fingerprint != base
    for changed in ({"max_image_pixels": 1000}, {"allowed_formats": ("PNG",)},
                    {"grade_high": 0.95}, {"grade_medium": 0.5}):  # fmt: skip
        options = ClassifierOptions(**{"max_batch": 32, **changed})
        assert Classifier(model_dir, options).fingerprint != base, changed


def test_classifier_decodes_within_its_budget(tmp_path):
    """Four threads preparing 4 MP PNGs under a 5 MP budget: never two decoded at once."""

    class Recording(PixelBudget):
        most = 0

        @contextmanager
        def hold(self, pixels):
            with super().hold(pixels):
                Recording.most = max(Recording.most, self._held)
                yield

    budget = Recording(5_000_000)
    classifier = Classifier(
        build_onnx_classifier(tmp_path / "m", input_size=(32, 32), color_mode="RGB"),
        decoding=budget,
    )
    data = encode(Image.effect_noise((2000, 2000), 40).convert("RGB"), "PNG", compress_level=1)
    with ThreadPoolExecutor(4) as pool:
        tensors = list(pool.map(classifier.prepare, [data] * 4))
    assert len(tensors) == 4 and Recording.most == 4_000_000
