"""The drift monitor, the version router and the promotion record, as plain objects."""

from __future__ import annotations

import itertools

import pytest

from image_classifier.core.errors import ClassifierError, ErrorCode
from image_classifier.serving.drift import DriftMonitor
from image_classifier.serving.release_record import ReleaseRecord, read_record, write_record
from image_classifier.serving.routing import ModelRef, ModelRouter, ServedVersion
from image_classifier.serving.settings import Settings


def test_drift_alarm_waits_for_a_full_window_then_compares_with_the_baseline():
    monitor = DriftMonitor(baseline=0.9, window=4, max_drop=0.05)
    for _ in range(3):
        state = monitor.observe(0.1)
    assert not state.alarm and state.samples == 3  # a few odd pictures after a start: no alarm
    state = monitor.observe(0.1)
    assert state.alarm and state.rolling_mean == pytest.approx(0.1)
    assert state.relative_change == pytest.approx((0.1 - 0.9) / 0.9)
    for _ in range(4):  # the window rolls: confident answers clear the alarm
        state = monitor.observe(0.9)
    assert not state.alarm and state.relative_change == pytest.approx(0.0)


def test_drift_threshold_is_relative():
    monitor = DriftMonitor(baseline=0.8, window=2, max_drop=0.05)
    monitor.observe(0.77)
    assert not monitor.observe(0.77).alarm  # -3.75 %
    assert not monitor.observe(0.76).alarm  # mean 0.765: -4.4 %
    assert monitor.observe(0.74).alarm  # mean 0.75: -6.25 %


def test_drift_without_a_baseline_reports_the_mean_but_never_alarms():
    monitor = DriftMonitor(baseline=None, window=1, max_drop=0.05)
    state = monitor.observe(0.01)
    assert state.rolling_mean == pytest.approx(0.01)
    assert state.relative_change is None and not state.alarm


def _served(version: str, role: str) -> ServedVersion:
    return ServedVersion(ModelRef(name="digits-cnn", version=version), role)


def test_router_pins_versions_and_refuses_unknown_ones():
    router = ModelRouter(_served("v1", "primary"), _served("v2", "candidate"))
    assert router.route().ref.version == "v1"  # no canary share: the primary
    assert router.route("v2").ref.version == "v2"
    assert router.route(" digits-cnn:v2 ").ref.version == "v2"
    with pytest.raises(ClassifierError) as refused:
        router.route("v3")
    assert refused.value.code == ErrorCode.UNKNOWN_MODEL_VERSION


def test_router_sends_the_configured_share_to_the_candidate():
    draws = itertools.cycle([i / 100 for i in range(100)])  # evenly spread draws
    router = ModelRouter(
        _served("v1", "primary"), _served("v2", "candidate"), canary_fraction=0.2,
        draw=lambda: next(draws),
    )  # fmt: skip
    chosen = [router.route().ref.version for _ in range(1000)]
    assert chosen.count("v2") == 200


def test_shadow_scores_only_the_primarys_answers():
    router = ModelRouter(_served("v1", "primary"), _served("v2", "candidate"), shadow_fraction=1.0)
    assert router.shadow_for(router.primary) is router.candidate
    assert router.shadow_for(router.candidate) is None
    alone = ModelRouter(_served("v1", "primary"), canary_fraction=1.0, shadow_fraction=1.0)
    assert alone.route().ref.version == "v1" and alone.shadow_for(alone.primary) is None


def test_the_record_keeps_its_history_and_a_candidate_must_differ_from_the_served(tmp_path):
    """Which of the record's versions are served: tests/serving/test_settings.py."""
    record = tmp_path / "served.json"
    write_record(record, ReleaseRecord(model_tag="m:v2", candidate_tag="m:v3", history=["m:v1"]))
    assert read_record(record).history == ["m:v1"]
    with pytest.raises(ValueError, match="differ"):
        Settings.from_env({"SERVED_MODEL_FILE": str(record), "CANDIDATE_MODEL_TAG": "m:v2"})


def test_a_damaged_record_is_an_error_not_a_silent_default(tmp_path):
    record = tmp_path / "served.json"
    record.write_text('{"model_tag": 7}')
    with pytest.raises(ValueError, match="served-model record"):
        Settings.from_env({"SERVED_MODEL_FILE": str(record)})
    missing = Settings.from_env({"SERVED_MODEL_FILE": str(tmp_path / "none.json")})
    assert missing.model_tag == "digits-cnn:v1"
