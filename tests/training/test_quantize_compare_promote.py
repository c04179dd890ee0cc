"""Your own model's INT8 (calibrated on your pictures, gated), `compare`, and the promote gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_classifier.core.classifier import read_card
from image_classifier.serving.release_record import ReleaseRecord, read_record, write_record
from tests.model_store import import_model, store_model_dir, training_cli
from tests.onnx_models import build_onnx_classifier
from tests.training.conftest import export_own
from tests.training.own_model import UNLABELLED_SEEDS, train_weights
from training_export.compare import SUMMARY, comparison_lines
from training_export.quantize_folders import HELD_BACK_EVERY, MIN_PICTURES

WEAK_TAG = "colours-weak:v1"


@pytest.fixture(scope="module")
def weak_tag(own_model: Path, bentoml_home: Path, tmp_path_factory) -> str:
    """The same module after two training steps: a worse version of it."""
    weights = train_weights(own_model / "my_model.py",
                            tmp_path_factory.mktemp("weak") / "weak.pt", steps=2)  # fmt: skip
    result = export_own(own_model, bentoml_home, WEAK_TAG, weights=weights)
    assert result.returncode == 0, result.stderr
    return WEAK_TAG


def test_quantize_on_unlabelled_pictures_is_gated_on_held_back_agreement(
    own_tag, own_model, bentoml_home
):
    result = training_cli("quantize", own_tag, "--calibration",
                          str(own_model / "pictures" / "unlabelled"), "--out",
                          "colours-own-int8:agree", home=bentoml_home)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    gate = read_card(store_model_dir(bentoml_home, "colours-own-int8:agree")).metrics.model_extra[
        "int8_gate"
    ]
    held_back = len(UNLABELLED_SEEDS) // HELD_BACK_EVERY
    assert gate["evaluation_samples"] == held_back
    assert gate["calibration_samples"] == len(UNLABELLED_SEEDS) - held_back
    assert gate["top1_agreement"] >= 0.99 and "fp32_accuracy" not in gate
    # Quantizing the INT8 entry again was a TypeError from inside the card's code.
    again = training_cli("quantize", "colours-own-int8:agree", "--calibration",
                         str(own_model / "pictures" / "unlabelled"), home=bentoml_home)  # fmt: skip
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.startswith(
        f"error: colours-own-int8:agree is already INT8 (quantized from {own_tag})"
    )


def test_a_calibration_that_ruins_accuracy_is_refused_by_how_much(
    own_tag, own_model, bentoml_home, tmp_path
):
    """Calibrated on washed-out pictures, the activation ranges miss every colour: refused."""
    white = tmp_path / "white"
    white.mkdir()
    rng = np.random.default_rng(0)
    for i in range(MIN_PICTURES):
        pixels = np.clip(245 + rng.normal(0, 3, (40, 40, 3)), 0, 255)
        Image.fromarray(np.uint8(pixels)).save(white / f"{i}.png")
    result = training_cli("quantize", own_tag, "--calibration", str(white), "--images",
                          str(own_model / "pictures" / "labelled"), "--out",
                          "colours-own-int8:white", home=bentoml_home)  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "points below fp32" in result.stderr and "not saved" in result.stderr
    assert not (bentoml_home / "models" / "colours-own-int8" / "white").exists()

    # An entry that --force would replace stays until the new one passes its gate (it was
    # deleted first: the served INT8 model gone, and the server no longer started).
    unlabelled = str(own_model / "pictures" / "unlabelled")
    kept = training_cli("quantize", own_tag, "--calibration", unlabelled, "--out",
                        "colours-own-int8:kept", home=bentoml_home)  # fmt: skip
    assert kept.returncode == 0, kept.stdout + kept.stderr
    card_before = (store_model_dir(bentoml_home, "colours-own-int8:kept") / "card.json").read_text()
    forced = training_cli("quantize", own_tag, "--calibration", str(white), "--images",
                          str(own_model / "pictures" / "labelled"), "--out",
                          "colours-own-int8:kept", "--force", home=bentoml_home)  # fmt: skip
    assert forced.returncode == 1 and "not saved" in forced.stderr, forced.stdout
    card_after = (store_model_dir(bentoml_home, "colours-own-int8:kept") / "card.json").read_text()
    assert card_after == card_before
    unforced = training_cli("quantize", own_tag, "--calibration", unlabelled, "--out",
                            "colours-own-int8:kept", home=bentoml_home)  # fmt: skip
    assert unforced.returncode == 1 and "pass --force to replace it" in unforced.stderr
    onto_source = training_cli("quantize", own_tag, "--calibration", unlabelled, "--out",
                               own_tag.upper(), "--force", home=bentoml_home)  # fmt: skip
    assert onto_source.returncode == 1 and "is the model being quantized" in onto_source.stderr
    assert store_model_dir(bentoml_home, own_tag).exists()  # the float32 model is still there
    # --force replaced any model: a float32 one of another name, or the served INT8 entry, which
    # the next start then served unchecked (a black-box review's finding).
    import_model(bentoml_home, build_onnx_classifier(tmp_path / "other"), "other-fp32:v1")
    other_card = (store_model_dir(bentoml_home, "other-fp32:v1") / "card.json").read_text()
    record = tmp_path / "served_model.json"
    write_record(record, ReleaseRecord(model_tag="colours-own-int8:kept"))
    for out, env, says in [
        ("other-fp32:v1", {}, "other-fp32:v1 is not an INT8 entry"),
        ("colours-own-int8:kept", {"SERVED_MODEL_FILE": str(record)},
         "colours-own-int8:kept is served"),
        ("Bad Name:v1", {}, "--out's name 'Bad Name': may hold only"),
    ]:  # fmt: skip
        refused = training_cli("quantize", own_tag, "--calibration", unlabelled, "--out", out,
                               "--force", home=bentoml_home, extra_env=env)  # fmt: skip
        assert refused.returncode == 1 and says in refused.stderr, refused.stderr
    assert (store_model_dir(bentoml_home, "other-fp32:v1") / "card.json").read_text() == other_card
    assert (store_model_dir(bentoml_home, "colours-own-int8:kept") / "card.json").read_text() == (
        card_before
    )
    negative = training_cli("quantize", own_tag, "--calibration", unlabelled, "--max-drop", "-1",
                            home=bentoml_home)  # fmt: skip
    assert negative.returncode == 2 and "a share between 0 and 1" in negative.stderr

    few = tmp_path / "few"
    shutil.copytree(white, few, ignore=lambda _, names: sorted(names)[5:])
    too_few = training_cli("quantize", own_tag, "--calibration", str(few), "--out",
                           "colours-own-int8:few", home=bentoml_home)  # fmt: skip
    assert too_few.returncode == 1
    assert f"has 5 pictures; without --images at least {MIN_PICTURES}" in too_few.stderr


def test_compare_shows_both_side_by_side(own_tag, weak_tag, own_model, bentoml_home):
    labelled = own_model / "pictures" / "labelled"
    result = training_cli("compare", own_tag, weak_tag, "--images", str(labelled), "--json",
                          home=bentoml_home)  # fmt: skip
    assert result.returncode == 0, result.stderr
    comparison = json.loads(result.stdout)
    good, weak = comparison["models"]
    assert (good["tag"], weak["tag"]) == (own_tag, weak_tag) and comparison["samples"] == 60
    assert weak["accuracy"] < good["accuracy"] == 1.0
    assert comparison["accuracy_change"] == pytest.approx(weak["accuracy"] - 1.0)
    assert comparison["top1_agreement"] == pytest.approx(weak["accuracy"])  # good is always right
    assert all(model["ms_per_picture_median"] > 0 for model in comparison["models"])
    recall = {label: row["recall"] for label, row in comparison["per_class"].items()}
    assert all(pair[0] == 1.0 for pair in recall.values()) and any(
        pair[1] < 1.0 for pair in recall.values()
    )
    text = training_cli("compare", own_tag, weak_tag, "--images", str(labelled),
                        home=bentoml_home).stdout  # fmt: skip
    assert "per-class recall changes" in text and "ms_per_picture_median" in text


def test_compare_says_what_it_skipped_in_words():
    """It printed the counts as a Python dict: `(skipped: {'hidden entries': 1})`."""
    model = dict.fromkeys((*SUMMARY, "ms_per_picture_median"), 0.5)
    result = {
        "images": "pictures", "samples": 2, "per_class": {},
        "skipped": {"hidden entries": 1, "not pictures (by extension)": 2},
        "models": [{"tag": "a:v1", **model}, {"tag": "b:v1", **model}],
        "accuracy_change": 0.0, "top1_agreement": 1.0,
    }  # fmt: skip
    assert comparison_lines(result)[0] == (
        "2 labelled pictures in pictures (skipped: 1 hidden entries; 2 not pictures (by extension))"
    )


def test_promote_refuses_a_worse_version_unless_forced(
    own_tag, weak_tag, own_model, bentoml_home, tmp_path
):
    env = {"SERVED_MODEL_FILE": str(tmp_path / "served_model.json")}
    cli = {"home": bentoml_home, "extra_env": env}
    labelled = own_model / "pictures" / "labelled"
    report = ["--report", str(tmp_path / "report")]
    for tag in (own_tag, weak_tag):
        saved = training_cli("evaluate", tag, "--images", str(labelled), "--save", *report, **cli)
        assert saved.returncode == 0, saved.stderr
    first = training_cli("models", "promote", own_tag, **cli)
    assert first.returncode == 0, first.stderr
    # Over the default digits: "no saved evaluation", or, when the store holds it (a whole run
    # trains it), "answers other labels"; either way not compared, and promoted.
    assert "served digits-cnn:v1" in first.stdout or "digits-cnn:v1 has no saved" in first.stdout
    assert "not compared" in first.stdout, first.stdout
    refused = training_cli("models", "promote", weak_tag, **cli)
    assert refused.returncode == 1
    assert f"{weak_tag} is worse than the served {own_tag}" in refused.stderr
    assert (
        "--force" in refused.stderr
        and read_record(tmp_path / "served_model.json").model_tag == own_tag
    )
    forced = training_cli("models", "promote", weak_tag, "--force", **cli)
    assert forced.returncode == 0 and "promoted anyway (--force)" in forced.stdout
    assert read_record(tmp_path / "served_model.json").model_tag == weak_tag

    other = tmp_path / "other"
    shutil.copytree(labelled, other, ignore=shutil.ignore_patterns("*.png"))
    elsewhere = training_cli("evaluate", own_tag, "--images", str(other), "--save", *report, **cli)
    assert elsewhere.returncode == 0, elsewhere.stderr
    unmatched = training_cli("models", "promote", own_tag, **cli)
    assert unmatched.returncode == 1 and "never on those pictures" in unmatched.stderr
