"""The service's request path without HTTP: routing, cache, batching, shadow, per-item errors."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import numpy as np
import pytest
from PIL import Image

from image_classifier.core.classifier import ModelLoadError
from image_classifier.core.errors import ClassifierError, ErrorCode
from image_classifier.serving import predictor as predictor_module
from image_classifier.serving.predictor import Predictor
from image_classifier.serving.routing import ModelRef, ModelRouter, ServedVersion
from image_classifier.serving.settings import Settings
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode


def pictures(count: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    return [
        encode(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)), "PNG")
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_onnx_classifier(tmp_path_factory.mktemp("model"), mean=(0.5,), std=(0.5,))


def predictor_for(model_dir, candidate_dir=None, **env) -> Predictor:
    settings = Settings.from_env({key.upper(): str(value) for key, value in env.items()})
    primary = ServedVersion(ModelRef(name="tiny", version="v1"), "primary", model_dir)
    candidate = candidate_dir and ServedVersion(
        ModelRef(name="tiny", version="v2"), "candidate", candidate_dir
    )
    router = ModelRouter(primary, candidate, shadow_fraction=settings.shadow_fraction)
    predictor = Predictor(router, settings)
    predictor.load_models()
    return predictor


def test_concurrent_answers_share_runs_and_match_one_by_one(model_dir):
    predictor = predictor_for(
        model_dir, batch_max_size=8, threads=8, model_runs=1, batching_min_gain=0
    )
    served = predictor.router.primary
    data = pictures(24)
    # A tiny model runs in microseconds: give each run the time of a real one (20 ms), so that
    # requests arrive while it runs on any machine, however loaded, and queue for the next.
    batcher = predictor.batchers[served.ref.version]
    run_each = batcher.run_each

    def like_a_real_model(tensors, solo):
        time.sleep(0.02)
        return run_each(tensors, solo)

    batcher.run_each = like_a_real_model

    async def together():
        return await asyncio.gather(*(predictor.answer(served, d, "image/png", 3) for d in data))

    merged = asyncio.run(together())
    classifier = served.ready_classifier()
    for answer, picture in zip(merged, data, strict=True):
        assert answer.prediction == classifier.classify(picture, 3) and not answer.cached
        assert 1 <= answer.batch_size <= 8
    assert max(answer.batch_size for answer in merged) > 1  # some requests really shared a run


def test_the_runners_own_request_leaves_while_it_runs_the_images_queued_behind_it(model_dir):
    """The thread that runs the model goes on with the images queued behind its own for as long
    as they come; its own request is answered as soon as its row is known. (It used to wait for
    its thread, so for the whole drain: up to 5.7 s under 16 clients of an INT8 MobileNetV2.)"""
    predictor = predictor_for(
        model_dir, batch_max_size=4, threads=2, model_runs=1, batching_min_gain=0
    )
    served = predictor.router.primary
    batcher = predictor.batchers[served.ref.version]
    run_each, hand_over = batcher.run_each, batcher.hand_over
    first_running, second_queued, second_may_run = (threading.Event() for _ in range(3))
    runs: list[int] = []

    def gated(tensors, solo):
        runs.append(len(tensors))
        if len(runs) == 1:
            first_running.set()
            assert second_queued.wait(10)
        else:
            assert second_may_run.wait(10)
        return run_each(tensors, solo)

    def noting_a_hand_over(prepare, deliver):
        ran = hand_over(prepare, deliver)
        if ran is None:
            second_queued.set()
        return ran

    batcher.run_each, batcher.hand_over = gated, noting_a_hand_over
    first, second = pictures(2)

    async def first_then_second():
        first_answer = asyncio.create_task(predictor.answer(served, first, "image/png", 3))
        assert await asyncio.to_thread(first_running.wait, 10)
        second_answer = asyncio.create_task(predictor.answer(served, second, "image/png", 3))
        try:
            answered = await asyncio.wait_for(first_answer, 10)
            second_still_running = not second_answer.done()
        finally:
            second_may_run.set()
        return answered, second_still_running, await second_answer

    answered, second_still_running, second_answer = asyncio.run(first_then_second())
    assert second_still_running and runs == [1, 1]
    classifier = served.ready_classifier()
    assert answered.prediction == classifier.classify(first, 3)
    assert second_answer.prediction == classifier.classify(second, 3)


@pytest.mark.parametrize(
    "env",
    [{"batching": "off"}, {"batching_min_gain": 1e9}],  # off, or a gain no model reaches
    ids=["batching-off", "merging-would-not-pay"],
)
def test_without_merging_every_image_runs_alone_and_info_says_why(model_dir, env):
    predictor = predictor_for(model_dir, threads=4, model_runs=1, **env)
    served = predictor.router.primary
    batcher = predictor.batchers[served.ref.version]
    assert (batcher.max_batch, batcher.runners) == (1, 1)  # MODEL_RUNS, not a run per thread
    data = pictures(12)

    async def together():
        return await asyncio.gather(*(predictor.answer(served, d, "image/png", 3) for d in data))

    assert {answer.batch_size for answer in asyncio.run(together())} == {1}
    batching = predictor.info()["batching"]
    assert batching["merges"] is False
    assert batching["measured_gain"] == round(served.ready_classifier().merging_gain, 2)


def test_the_cache_answers_repeats_when_on(model_dir):
    predictor = predictor_for(model_dir, cache_size=8)
    served = predictor.router.primary
    (data,) = pictures(1)

    async def twice():
        first = await predictor.answer(served, data, "image/png", 2)
        return first, await predictor.answer(served, data, "image/png", 2)

    first, again = asyncio.run(twice())
    assert (first.cached, again.cached, again.batch_size) == (False, True, 0)
    assert again.prediction == first.prediction


def test_a_bad_item_is_refused_alone_in_a_batch(model_dir):
    predictor = predictor_for(model_dir)
    good = pictures(2)
    uploads = [(good[0], "image/png"), (b"not an image", "image/png"), (good[1], None)]
    outcomes = asyncio.run(predictor.answer_each(predictor.router.primary, uploads, 3))
    assert isinstance(outcomes[1], ClassifierError)
    assert outcomes[1].code == ErrorCode.UNSUPPORTED_MEDIA_TYPE
    assert not isinstance(outcomes[0], ClassifierError) and not isinstance(
        outcomes[2], ClassifierError
    )


def test_shadow_scoring_counts_agreement_off_the_answer_path(model_dir, tmp_path):
    from prometheus_client import REGISTRY

    other = build_onnx_classifier(tmp_path / "other", mean=(0.5,), std=(0.5,), seed=9)
    predictor = predictor_for(model_dir, other, shadow_fraction=1)
    served = predictor.router.primary

    def compared() -> float:
        return sum(
            REGISTRY.get_sample_value("image_classifier_shadow_comparisons_total", labels) or 0
            for labels in ({"candidate_version": "v2", "agreed": a} for a in ("true", "false"))
        )

    before = compared()

    async def answer_then_settle():
        for data in pictures(5):
            await predictor.answer(served, data, "image/png", 1)
        await asyncio.sleep(0.5)  # shadow tasks run after the answers

    asyncio.run(answer_then_settle())
    assert compared() - before == 5


def test_all_or_nothing_callers_get_one_clean_error(tmp_path):
    model_dir = build_onnx_classifier(tmp_path / "poisonable", fail_when_mean_below=-0.5)
    predictor = predictor_for(model_dir)
    served = predictor.router.primary
    good, poison = np.ones((1, 28, 28), np.float32), -np.ones((1, 28, 28), np.float32)
    assert asyncio.run(predictor.probabilities(served, [good, good])).shape == (2, 10)
    with pytest.raises(ClassifierError) as caught:  # e.g. an Open Inference request: one 500
        asyncio.run(predictor.probabilities(served, [good, poison]))
    assert caught.value.code is ErrorCode.INTERNAL_ERROR


def test_a_model_that_cannot_load_is_named(tmp_path):
    broken = build_onnx_classifier(tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(ModelLoadError, match="tiny:v1"):
        predictor_for(broken)


def test_a_candidate_that_cannot_load_leaves_the_primary_served_alone(model_dir, tmp_path, caplog):
    """A candidate gets a share of the traffic at most: failing, it held the whole server unready
    (a review). It is named in the log, and dropped, its canary and shadow shares with it."""
    broken = build_onnx_classifier(tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"truncated")
    with caplog.at_level(logging.ERROR):
        predictor = predictor_for(model_dir, broken, shadow_fraction=1)
    assert predictor.router.all_loaded() and predictor.router.candidate is None
    assert predictor.router.route().ref.version == "v1" and predictor.router.shadow_fraction == 0
    assert "candidate tiny:v2 cannot be served" in caplog.text
    assert predictor.info()["candidate"] is None


@pytest.mark.parametrize(("weight_bits", "warned"), [(8, True), (7, False)])
def test_an_int8_model_that_would_saturate_here_is_named_at_start(
    tmp_path, monkeypatch, caplog, weight_bits, warned
):
    model = build_onnx_classifier(tmp_path, mean=(0.5,), std=(0.5,))
    card = json.loads((model / "card.json").read_text())
    card.setdefault("metrics", {})["int8_gate"] = {"weight_bits": weight_bits}
    (model / "card.json").write_text(json.dumps(card))
    monkeypatch.setattr(predictor_module, "int8_saturates", lambda: True)
    with caplog.at_level("WARNING", logger=predictor_module.__name__):
        predictor_for(model)
    assert ("kernels saturate here" in caplog.text) is warned


@pytest.mark.parametrize(("env", "warned"), [({"CANARY_FRACTION": "0.1"}, True), ({}, False)])
def test_a_canary_share_without_a_candidate_is_named_at_start(model_dir, caplog, env, warned):
    settings = Settings.from_env(env)
    with caplog.at_level("WARNING", logger=predictor_module.__name__):
        predictor = Predictor.for_models(settings, [("tiny:v1", model_dir)])
    assert ("no candidate to send requests to" in caplog.text) is warned
    assert predictor.router.canary_fraction == 0.0  # and nothing is routed to a missing model


def test_a_fault_of_ours_on_one_item_fails_that_item_alone(model_dir, monkeypatch, caplog):
    """Not only a refusal: an unexpected exception on one image (a bug, a library's surprise)
    is that image's INTERNAL_ERROR, logged with its traceback; the others are answered."""
    predictor = predictor_for(model_dir)
    classifier = predictor.router.primary.ready_classifier()
    good = pictures(3)
    prepare = classifier.prepare

    def failing_on_the_second(data, declared_type=None):
        if data == good[1]:
            raise RuntimeError("a surprise")
        return prepare(data, declared_type)

    monkeypatch.setattr(classifier, "prepare", failing_on_the_second)
    uploads = [(picture, "image/png") for picture in good]
    outcomes = asyncio.run(predictor.answer_each(predictor.router.primary, uploads, 3))
    assert isinstance(outcomes[1], ClassifierError), outcomes[1]
    assert outcomes[1].code == ErrorCode.INTERNAL_ERROR
    assert [isinstance(outcomes[i], ClassifierError) for i in (0, 2)] == [False, False]
    assert "a surprise" in caplog.text
