"""Configuration from the environment: documented defaults, parsed values, loud failures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from image_classifier.serving.settings import DEFAULT_MODEL_TAG, Settings


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
        ("GIL_SWITCH_INTERVAL_MS", "nan", "GIL_SWITCH_INTERVAL_MS"),  # every worker aborted
        ("GIL_SWITCH_INTERVAL_MS", "1e6", "at most 100"),
        ("BATCHING_MIN_GAIN", "nan", "BATCHING_MIN_GAIN"),  # then /info was a 500
        ("CACHE_TTL_S", "inf", "CACHE_TTL_S"),
        ("DRIFT_WINDOW", "99999999999999999999999", "DRIFT_WINDOW must be <="),
        ("ORT_INTRA_OP_THREADS", "5000", "ORT_INTRA_OP_THREADS must be <= 1,024"),
        ("MAX_CONCURRENCY", "1e23", "MAX_CONCURRENCY"),
        ("ALLOWED_FORMATS", "png,PNGG", "PNGG"),
        ("RATE_LIMIT", "0/second", "RATE_LIMIT"),
    ],
)
def test_bad_values_fail_loudly(name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({name: value})


def test_settings_table_lists_every_variable():
    out = subprocess.run(
        [sys.executable, "-m", "image_classifier.serving.settings"], capture_output=True, text=True
    ).stdout
    for name in ("MODEL_TAG", "MAX_UPLOAD_BYTES", "MAX_IMAGE_PIXELS", "BATCHING", "WORKERS"):
        assert name in out
