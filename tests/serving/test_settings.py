"""Configuration from the environment: documented defaults, parsed values, loud failures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from image_classifier.serving import metrics
from image_classifier.serving.release_record import ReleaseRecord, write_record
from image_classifier.serving.settings import DEFAULT_MODEL_TAG, MIB, Settings


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.model_tag == DEFAULT_MODEL_TAG
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.max_batch_images == 64
    assert settings.batching is True


def test_values_are_parsed_by_type():
    settings = Settings.from_env(
        {
            "MODEL_TAG": "mine:v3",
            "MAX_UPLOAD_BYTES": "2048",
            "GRADE_HIGH": "0.8",
            "BATCHING": "off",
            "ALLOWED_FORMATS": "png, jpeg",
        }
    )
    assert settings.model_tag == "mine:v3"
    assert settings.max_upload_bytes == 2048
    assert settings.grade_high == 0.8
    assert settings.batching is False
    assert settings.allowed_formats == ("PNG", "JPEG")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_UPLOAD_BYTES", "ten", "MAX_UPLOAD_BYTES"),
        ("BATCHING", "maybe", "BATCHING"),
        ("THREADS", "-1", "THREADS"),
        ("BATCH_MAX_SIZE", "0", "BATCH_MAX_SIZE"),
        ("BATCHING_MIN_GAIN", "-1", "BATCHING_MIN_GAIN"),
        ("GRADE_MEDIUM", "0.95", "GRADE_MEDIUM"),
        ("GIL_SWITCH_INTERVAL_MS", "0", "GIL_SWITCH_INTERVAL_MS"),
        ("API_TOKENS", " , ", "names nothing"),
        ("API_TOKENS", " ", "blank"),  # an empty Secret: before, no auth at all
        ("CORS_ORIGINS", "https://app.example/", "not an origin"),  # a browser sends no "/"
        ("CORS_ORIGINS", "app.example", "not an origin"),
        # Found by a black-box review: accepted, and then never matched (origins are compared as
        # strings), or a port no browser sends.
        ("CORS_ORIGINS", "https://*.example.org", "no patterns"),
        ("CORS_ORIGINS", "http://a.example:99999", "not an origin"),
        ("CORS_ORIGINS", "https://App.Example", "lower case"),
        ("MAX_RECEIVING", "2", "MAX_RECEIVING_PER_CLIENT=64 must be at most MAX_RECEIVING=2"),
        ("GIL_SWITCH_INTERVAL_MS", "nan", "GIL_SWITCH_INTERVAL_MS"),  # every worker aborted
        ("GIL_SWITCH_INTERVAL_MS", "1e6", "at most 100"),
        ("BATCHING_MIN_GAIN", "nan", "BATCHING_MIN_GAIN"),  # then /info was a 500
        ("CACHE_TTL_S", "inf", "CACHE_TTL_S"),
        ("DRIFT_WINDOW", "99999999999999999999999", "DRIFT_WINDOW must be <="),
        ("ORT_INTRA_OP_THREADS", "5000", "ORT_INTRA_OP_THREADS must be <= 1,024"),
        ("MAX_CONCURRENCY", "1e23", "MAX_CONCURRENCY"),
        ("ALLOWED_FORMATS", "png,PNGG", "PNGG"),
        ("RATE_LIMIT", "0/second", "RATE_LIMIT"),
        ("RATE_LIMIT", "3/second;0/minute", "RATE_LIMIT"),  # only the first part was checked
        # Found by a black-box review: an 88-line traceback, or "Invalid Tag :v1" naming nothing.
        ("MODEL_TAG", "Bad Tag!", "MODEL_TAG='Bad Tag!' is not a model tag: use name:version"),
        ("MODEL_TAG", "digits-cnn:v1:extra", "MODEL_TAG="),
        ("MODEL_TAG", ":v1", "MODEL_TAG="),
        ("CANDIDATE_MODEL_TAG", "Digits-CNN:v2", "CANDIDATE_MODEL_TAG="),
        ("WORKERS", "-1", r"WORKERS must be >= 0 \(0: from the CPUs\), got -1"),
        ("ORT_SOLO_THREADS", "-1", r">= 0 \(0: from the CPUs\)"),
        ("GRADE_MEDIUM", "0.95", "GRADE_MEDIUM=0.95, GRADE_HIGH=0.9"),
        ("BODY_TIMEOUT_S", "45", "BODY_TIMEOUT_S=45, REQUEST_TIMEOUT_S=30"),
        ("MAX_UPLOAD_BYTES", str(65 * MIB), "must be at most MAX_BATCH_BYTES=67108864"),
        ("MAX_BODY_MEMORY", str(MIB), "must be at least MAX_UPLOAD_BYTES=10485760"),
        # Found by a review: accepted, then a traceback wall at the rate limiter's start.
        ("REDIS_URL", "redis://127.0.0.1:notaport/0", "REDIS_URL is not a Redis URL: Port"),
        ("REDIS_URL", "redis://:pw@[bad", "REDIS_URL is not a Redis URL: Invalid IPv6"),
        ("THREAD_NICE", "20", "THREAD_NICE must be between 0 and 19"),
        ("DECODING_PIXELS", "-1", r"DECODING_PIXELS must be >= 0 \(0: twice MAX_IMAGE_PIXELS\)"),
    ],
)
def test_bad_values_fail_loudly(name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({name: value})


@pytest.mark.parametrize("tag", ["digits-cnn", "digits-cnn:latest", "my_model.2:v1-rc.3"])
def test_a_name_alone_or_latest_is_a_model_tag(tag):
    assert Settings.from_env({"MODEL_TAG": tag}).model_tag == tag


@pytest.mark.parametrize(
    ("environ", "served", "candidate"),
    [
        ({}, "digits-cnn:v1", "digits-cnn:v2"),  # the record, whole
        ({"MODEL_TAG": "digits-cnn:v1"}, "digits-cnn:v1", "digits-cnn:v2"),
        ({"CANDIDATE_MODEL_TAG": ""}, "digits-cnn:v1", ""),  # turned off
        ({"MODEL_TAG": "mine:v3"}, "mine:v3", ""),  # the record's candidate goes with its model
        ({"MODEL_TAG": "mine:v3", "CANDIDATE_MODEL_TAG": "mine:v4"}, "mine:v3", "mine:v4"),
    ],
)
def test_the_records_candidate_rides_with_its_model_and_a_blank_turns_it_off(
    tmp_path, environ, served, candidate
):
    record = tmp_path / "served.json"
    write_record(record, ReleaseRecord(model_tag="digits-cnn:v1", candidate_tag="digits-cnn:v2"))
    settings = Settings.from_env({"SERVED_MODEL_FILE": str(record), **environ})
    assert (settings.model_tag, settings.candidate_model_tag) == (served, candidate)


def test_the_body_caps_a_deployment_sets_are_accepted():
    """The caps tests and deploy/k8s set: the cross-checks refuse only what can never work."""
    limited = Settings.from_env({"MAX_BATCH_BYTES": "12000", "MAX_UPLOAD_BYTES": "8000"})
    assert (limited.max_upload_bytes, limited.max_batch_bytes) == (8000, 12000)
    assert Settings.from_env({"MAX_BODY_MEMORY": str(256 * MIB)}).max_body_memory == 256 * MIB


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("folder", "cannot be read: Is a directory"),  # was a 71-line traceback
        ("garbage.json", "is not a valid served-model record: file: Invalid JSON"),
        ("absent/served.json", "its folder does not exist"),  # was silently the default
    ],
)
def test_a_served_model_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, where, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "garbage.json").write_text("not json")
    path = tmp_path / where
    with pytest.raises(ValueError) as caught:
        Settings.from_env({"SERVED_MODEL_FILE": str(path)})
    error = str(caught.value)
    assert error.startswith(f"SERVED_MODEL_FILE={path}") and message in error and "\n" not in error


def test_the_stage_histograms_reach_the_default_deadlines():
    """A body may take BODY_TIMEOUT_S and a wait REQUEST_TIMEOUT_S: with buckets ending at 2.5 s,
    every slower one fell in +Inf."""
    for histogram, deadline in [
        (metrics.BODY_SECONDS, Settings.body_timeout_s),
        (metrics.QUEUE_WAIT_SECONDS, Settings.request_timeout_s),
    ]:
        buckets = [
            float(sample.labels["le"])
            for sample in histogram.collect()[0].samples
            if sample.name.endswith("_bucket")
        ]
        assert deadline in buckets and len(buckets) <= 20, buckets


def test_settings_table_lists_every_variable():
    out = subprocess.run(
        [sys.executable, "-m", "image_classifier.serving.settings"], capture_output=True, text=True
    ).stdout
    for name in (
        "MODEL_TAG",
        "SERVED_MODEL_FILE",
        "MAX_UPLOAD_BYTES",
        "MAX_IMAGE_PIXELS",
        "BATCHING",
        "WORKERS",
    ):
        assert name in out


def test_the_settings_table_never_prints_a_secret():
    environment = {
        **os.environ,
        "API_TOKENS": "tok-secret",
        "REDIS_URL": "redis://:pw-secret@h:1/0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "image_classifier.serving.settings"],
        capture_output=True, text=True, env=environment, check=True,
    ).stdout  # fmt: skip
    assert "redis://:***@h:1/0" in out and "(1 set)" in out
    assert "secret" not in out, out


def test_the_decoding_budget_is_twice_the_largest_picture_unless_set():
    assert Settings.from_env({"MAX_IMAGE_PIXELS": "1000"}).decoding_budget().pixels == 2000
    assert Settings.from_env({"DECODING_PIXELS": "5000"}).decoding_budget().pixels == 5000
