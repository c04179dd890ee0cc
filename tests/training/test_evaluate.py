"""`evaluate`: figures through the service's own path, the report, the folder's odd cases, and
`--save` as the served model's drift baseline (a real `bentoml serve`)."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from image_classifier.core.classifier import read_card
from image_classifier.serving.evaluation_record import (
    EvaluationRecord,
    SavedEvaluation,
    evaluated_card,
    file_sha256,
    read_evaluations,
)
from loadtest.servers import serve
from tests.model_store import import_model, store_model_dir, training_cli
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode
from tests.training.own_model import LABELS
from training_export.evaluation import calibration_bins, expected_calibration_error

KEYS = {"accuracy", "mean_top1_confidence", "per_class", "confusion_matrix", "samples",
        "expected_calibration_error", "skipped"}  # fmt: skip


def evaluate(tag: str, images: Path, home: Path, tmp_path: Path, *extra: str):
    """`evaluate TAG --images DIR --json` (report and record in tmp_path); (result, parsed)."""
    result = training_cli(
        "evaluate", tag, "--images", str(images), "--json", "--report", str(tmp_path / "report"),
        *extra, home=home, extra_env={"SERVED_MODEL_FILE": str(tmp_path / "served_model.json")},
    )  # fmt: skip
    parsed = json.loads(result.stdout) if result.returncode == 0 else None
    return result, parsed


def labelled_copy(own_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "labelled"
    shutil.copytree(own_model / "pictures" / "labelled", target)
    return target


def test_figures_follow_a_known_mislabelling_exactly(own_tag, own_model, bentoml_home, tmp_path):
    images = labelled_copy(own_model, tmp_path)
    clean, figures = evaluate(own_tag, images, bentoml_home, tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert figures["accuracy"] == 1.0 and figures["samples"] == 60, figures  # it learnt
    assert figures.keys() >= KEYS
    assert figures["skipped"] == {"not pictures (by extension)": 1}, figures  # the notes.txt
    # Four red pictures filed under "blue things": exactly four wrong answers, all red.
    red = sorted((images / "red things").glob("*.*"))[:4]
    for path in red:
        path.rename(images / "blue things" / path.name)
    (images / "green things" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    moved, figures = evaluate(own_tag, images, bentoml_home, tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert figures["samples"] == 60 and figures["accuracy"] == 56 / 60
    assert figures["skipped"]["unreadable pictures"] == 1
    matrix = figures["confusion_matrix"]
    assert matrix["labels"] == LABELS
    assert matrix["matrix"][2][0] == 4 and np.trace(matrix["matrix"]) == 56
    red_row, blue_row = figures["per_class"]["red things"], figures["per_class"]["blue things"]
    assert red_row["precision"] == 16 / 20 and red_row["recall"] == 1.0
    assert blue_row["recall"] == pytest.approx(20 / 24) and blue_row["support"] == 24
    assert "skipped: 1 not pictures" in moved.stderr and "1 unreadable pictures" in moved.stderr
    for name in ("confusion_matrix.png", "reliability_diagram.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["accuracy"] == figures["accuracy"]


def test_expected_calibration_error_is_the_weighted_gap_of_the_bins():
    correct = np.array([True, False, True, True])
    confidence = np.array([0.9, 0.9, 0.6, 0.6])
    bins = calibration_bins(correct, confidence)
    assert sum(b["count"] for b in bins) == 4
    # Two bins of two: |0.5 - 0.9| and |1.0 - 0.6|, each weighted by a half.
    assert expected_calibration_error(bins) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_odd_folders_get_clear_errors_with_counts(own_tag, own_model, bentoml_home, tmp_path):
    images = labelled_copy(own_model, tmp_path)
    purple = images / "purple things"
    purple.mkdir()
    for i in range(2):
        Image.new("RGB", (17, 9), (120, 0, 120)).save(purple / f"{i}.png")
    # Inside a label's folder too, hidden entries are not pictures of it (a notebook's
    # checkpoint copies were evaluated as red things).
    checkpoints = images / "red things" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    Image.new("RGB", (17, 9), (0, 0, 200)).save(checkpoints / "copy.png")
    (images / "red things" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    unknown, _ = evaluate(own_tag, images, bentoml_home, tmp_path)
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "'purple things' (2 pictures" in unknown.stderr and "--skip-unknown" in unknown.stderr
    skipped, figures = evaluate(own_tag, images, bentoml_home, tmp_path, "--skip-unknown")
    assert skipped.returncode == 0, skipped.stderr
    assert figures["skipped"][
        "pictures in folders that are not labels of the model"] == 2  # fmt: skip
    assert figures["skipped"]["hidden entries"] == 2
    assert figures["samples"] == 60

    empty = tmp_path / "empty"
    (empty / "red things").mkdir(parents=True)
    (empty / "red things" / "readme.md").write_text("nothing")
    nothing, _ = evaluate(own_tag, empty, bentoml_home, tmp_path)
    assert nothing.returncode == 1
    assert "no pictures found" in nothing.stderr and "1 not pictures" in nothing.stderr
    broken = tmp_path / "broken" / "red things"
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    unreadable, _ = evaluate(own_tag, broken.parent, bentoml_home, tmp_path)
    assert unreadable.returncode == 1 and "none of the 3 pictures" in unreadable.stderr
    assert "3 unreadable pictures" in unreadable.stderr


def test_a_saved_evaluation_is_the_served_drift_baseline(
    own_tag, own_model, bentoml_home, tmp_path, artifacts
):
    card = read_card(store_model_dir(bentoml_home, own_tag))
    assert card.metrics.mean_top1_confidence is None  # exported: no baseline of its own
    saved, figures = evaluate(own_tag, own_model / "pictures" / "labelled", bentoml_home,
                              tmp_path, "--save")  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    baseline = read_evaluations(tmp_path / "model_evaluations.json").evaluations[own_tag][-1]
    assert baseline.mean_top1_confidence == figures["mean_top1_confidence"]
    env = {"SERVED_MODEL_FILE": str(tmp_path / "served_model.json"), "MODEL_TAG": own_tag,
           "WORKERS": "1", "DRIFT_WINDOW": "4", "DRIFT_MAX_DROP": "0.05"}  # fmt: skip
    greys = [encode(Image.new("RGB", (40, 30), (v, v, v)), "PNG") for v in (90, 128, 160, 200)]
    with serve(bentoml_home, artifacts / "own-model-drift.log", env=env) as server:
        info = httpx.get(f"{server.url}/info", timeout=10).json()
        confidences = []
        for data in greys:
            answer = httpx.post(f"{server.url}/analyze", timeout=30,
                                files={"image": ("g.png", data, "image/png")})  # fmt: skip
            assert answer.status_code == 200, answer.text
            confidences.append(answer.json()["prediction"]["confidence"])
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert info["metrics"]["mean_top1_confidence"] == baseline.mean_top1_confidence
    assert info["metrics"]["images_sha256"] == baseline.images_sha256
    drift_lines = [
        line
        for line in metrics.splitlines()
        if 'model_version="v1"' in line and line.startswith("image_classifier_drift")
    ]
    gauges = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in drift_lines}
    assert gauges["image_classifier_drift_baseline_confidence"] == pytest.approx(
        baseline.mean_top1_confidence
    )
    change = (np.mean(confidences) - baseline.mean_top1_confidence) / baseline.mean_top1_confidence
    assert gauges["image_classifier_drift_relative_change"] == pytest.approx(change, abs=1e-6)
    assert gauges["image_classifier_drift_alarm"] == (1.0 if change < -0.05 else 0.0)


def test_an_evaluation_of_other_bytes_under_the_same_tag_is_not_merged(own_tag, bentoml_home):
    folder = store_model_dir(bentoml_home, own_tag)
    card = read_card(folder)
    evaluation = SavedEvaluation(
        accuracy=0.5, mean_top1_confidence=0.7, samples=10, expected_calibration_error=0.1,
        macro_f1=0.5, images="x", images_sha256="0" * 64, model_sha256="f" * 64,
        evaluated_at="2026-12-01T00:00:00+00:00",
    )  # fmt: skip
    record = EvaluationRecord(evaluations={own_tag: [evaluation]})
    assert evaluated_card(card, own_tag, folder, record) == card
    same_file = evaluation.model_copy(update={"model_sha256": file_sha256(folder / "model.onnx")})
    record.evaluations[own_tag].append(same_file)
    merged = evaluated_card(card, own_tag, folder, record)
    assert merged.metrics.mean_top1_confidence == 0.7 and merged.labels == card.labels


def test_a_model_answering_nan_on_some_pictures_is_not_given_figures(tmp_path):
    """Counting a NaN answer as the first label would make up an accuracy: name the pictures."""
    home = tmp_path / "home"
    stored = import_model(home, build_onnx_classifier(tmp_path / "m", labels=2), "overflowing:v1")
    # A tiny std (set after the import, which tries sample inputs) turns a white pixel into 5e37:
    # the logits overflow, while a black picture is still answered.
    card = json.loads((stored / "card.json").read_text())
    card["preprocessing"].update(mean=[0.0], std=[2e-38])
    (stored / "card.json").write_text(json.dumps(card))
    images = tmp_path / "pictures"
    for label, shade in (("class_0", 0), ("class_1", 255)):
        (images / label).mkdir(parents=True)
        Image.new("L", (28, 28), shade).save(images / label / f"{shade}.png")
    result, _ = evaluate("overflowing:v1", images, home, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "answers NaN or infinity on 1 pictures" in result.stderr
    assert "255.png" in result.stderr and "0.png" not in result.stderr.replace("255.png", "")


def _model_with_labels(tmp_path, labels: list[str], tag: str):
    """A two-class test model stored as `tag` with these labels; the store's home."""
    home = tmp_path / "home"
    folder = build_onnx_classifier(tmp_path / "m", labels=len(labels))
    card = json.loads((folder / "card.json").read_text())
    card["labels"] = labels
    (folder / "card.json").write_text(json.dumps(card))
    import_model(home, folder, tag)
    return home


def _one_picture_per_folder(tmp_path, folder_names: list[str]):
    """pictures/<name>/: a black picture in the first, a white one in the second."""
    images = tmp_path / "pictures"
    for name, shade in zip(folder_names, (0, 255), strict=True):
        (images / name).mkdir(parents=True)
        Image.new("L", (28, 28), shade).save(images / name / f"{shade}.png")
    return images


def test_label_folders_named_by_macos_are_the_labels(tmp_path):
    """macOS writes names decomposed (NFD: 'u' and a combining diaeresis): 'grün/' was refused
    as not a label of the model, "did you mean 'grün'?" (found by a black-box review)."""
    labels = ["grün", "café crème"]
    home = _model_with_labels(tmp_path, labels, "umlauts:v1")
    images = _one_picture_per_folder(tmp_path, [unicodedata.normalize("NFD", n) for n in labels])
    assert {path.name for path in images.iterdir()} != set(labels)  # kept decomposed
    result, figures = evaluate("umlauts:v1", images, home, tmp_path)
    assert result.returncode == 0, result.stderr
    assert figures["samples"] == 2 and figures["skipped"] == {}, figures


def test_a_label_with_a_slash_has_a_percent_encoded_folder(tmp_path):
    """Fashion-MNIST's `T-shirt/top` can name no folder: its pictures go in `T-shirt%2Ftop/`,
    and the hint for a folder named `T-shirt` says so (found by a black-box review)."""
    home = _model_with_labels(tmp_path, ["T-shirt/top", "Trouser"], "fashion:v1")
    images = _one_picture_per_folder(tmp_path, ["T-shirt%2Ftop", "Trouser"])
    result, figures = evaluate("fashion:v1", images, home, tmp_path)
    assert result.returncode == 0, result.stderr
    assert figures["samples"] == 2 and figures["skipped"] == {}, figures
    (images / "T-shirt%2Ftop").rename(images / "T-shirt")
    result, _ = evaluate("fashion:v1", images, home, tmp_path)
    assert result.returncode != 0 and "did you mean 'T-shirt%2Ftop'?" in result.stderr


def test_a_label_that_begins_with_a_dot_is_a_label_not_a_hidden_folder(tmp_path):
    """`.net/` was skipped as a hidden entry, so its pictures were never evaluated; a hidden
    entry that is no label (`.ipynb_checkpoints`) still is."""
    home = _model_with_labels(tmp_path, [".net", "java"], "dotted:v1")
    images = _one_picture_per_folder(tmp_path, [".net", "java"])
    (images / ".ipynb_checkpoints").mkdir()
    Image.new("L", (28, 28), 0).save(images / ".ipynb_checkpoints" / "copy.png")
    result, figures = evaluate("dotted:v1", images, home, tmp_path)
    assert result.returncode == 0, result.stderr
    assert figures["samples"] == 2 and figures["skipped"] == {"hidden entries": 1}, figures
