"""A stored model judged on a labelled folder, through the service's own code: the core's
`Classifier` decodes, preprocesses, runs ONNX Runtime and turns outputs into probabilities, so
the figures are those of the model as served, not of a re-implementation.

Metrics come from scikit-learn; the expected calibration error is written here (scikit-learn
has none): top-1 confidence in 15 equal-width bins, the bins' accuracy-confidence gaps weighted
by their share of the pictures.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from image_classifier.core.classifier import Classifier, NonFiniteOutput
from image_classifier.core.errors import ClassifierError
from image_classifier.serving.evaluation_record import (
    SavedEvaluation,
    add_evaluation,
    evaluations_path,
    file_sha256,
)

from .folders import UNREADABLE, ImageFolderError, Picture, PictureFolder, scan_labelled
from .store import stored_classifier, stored_tag

BATCH = 32  # pictures prepared and run at a time: memory stays bounded on large folders
CALIBRATION_BINS = 15


@dataclass
class ModelAnswers:
    """One model's answers on the readable pictures, in order, with the time each took."""

    probabilities: np.ndarray  # (pictures, labels)
    prepare_seconds: np.ndarray  # decode + preprocess, per picture
    run_seconds: np.ndarray  # the model run's share, per picture

    @property
    def milliseconds_per_picture(self) -> float:
        return float(np.median(self.prepare_seconds + self.run_seconds) * 1000)


@dataclass
class Answered:
    pictures: list[Picture]  # the readable ones
    digests: list[bytes]  # sha256 of each one's bytes
    answers: list[ModelAnswers]  # one per classifier


def prepared_chunks(
    classifiers: Sequence[Classifier], folder: PictureFolder, batch: int = BATCH
) -> Iterator[tuple[list[Picture], list[bytes], list[list[np.ndarray]], list[list[float]]]]:
    """Read each picture once and prepare it for every classifier; a picture any of them cannot
    read is skipped for all (and counted in `folder.skipped`)."""
    for start in range(0, len(folder.pictures), batch):
        pictures, digests = [], []
        tensors: list[list[np.ndarray]] = [[] for _ in classifiers]
        seconds: list[list[float]] = [[] for _ in classifiers]
        for picture in folder.pictures[start : start + batch]:
            relative = str(picture.path.relative_to(folder.root))
            try:
                data = picture.path.read_bytes()
                prepared = [_timed(classifier.prepare, data) for classifier in classifiers]
            except (OSError, ClassifierError) as exc:
                folder.skip(UNREADABLE, f"{relative}: {exc}")
                continue
            pictures.append(picture)
            digests.append(hashlib.sha256(data).digest())
            for i, (tensor, took) in enumerate(prepared):
                tensors[i].append(tensor)
                seconds[i].append(took)
        yield pictures, digests, tensors, seconds


def answer_all(
    classifiers: Sequence[Classifier], folder: PictureFolder, batch: int = BATCH
) -> Answered:
    """Every readable picture through every classifier (runs of `batch`; 1 times each alone)."""
    pictures: list[Picture] = []
    digests: list[bytes] = []
    rows: list[list[np.ndarray]] = [[] for _ in classifiers]
    prepare: list[list[float]] = [[] for _ in classifiers]
    run: list[list[float]] = [[] for _ in classifiers]
    for chunk, chunk_digests, tensors, seconds in prepared_chunks(classifiers, folder, batch):
        pictures += chunk
        digests += chunk_digests
        for i, classifier in enumerate(classifiers):
            probabilities, took = _timed(_run_finite, classifier, chunk, tensors[i])
            rows[i] += list(probabilities)
            prepare[i] += seconds[i]
            run[i] += [took / max(1, len(chunk))] * len(chunk)
    if not pictures:
        raise ImageFolderError(
            f"none of the {len(folder.pictures)} pictures in {folder.root} could be read; "
            + folder.describe_skipped()
        )
    answers = [
        ModelAnswers(np.stack(rows[i]), np.array(prepare[i]), np.array(run[i]))
        for i in range(len(classifiers))
    ]
    return Answered(pictures, digests, answers)


def _run_finite(
    classifier: Classifier, pictures: Sequence[Picture], tensors: list[np.ndarray]
) -> np.ndarray:
    """The model's rows; a model answering NaN or infinity has no figures to give (counting its
    NaN as the first label would make up an accuracy): say on which pictures, and stop."""
    try:
        return classifier.run(tensors)
    except NonFiniteOutput:
        rows = classifier.run_isolating_faults(tensors)
        answered = zip(pictures, rows, strict=True)
        failed = [str(picture.path) for picture, row in answered if isinstance(row, Exception)]
        raise ValueError(
            f"{classifier.card.name} answers NaN or infinity on {len(failed)} pictures, e.g. "
            f"{', '.join(failed[:3])}: it cannot be evaluated (check its export and preprocessing)"
        ) from None


def _timed(function: Callable, *args):  # noqa: ANN202 - (result, seconds)
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def calibration_bins(correct: np.ndarray, confidence: np.ndarray) -> list[dict]:
    """Top-1 confidence in equal-width bins (scikit-learn's calibration_curve binning)."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    ids = np.searchsorted(edges[1:-1], confidence)
    bins = []
    for b in range(CALIBRATION_BINS):
        inside = ids == b
        count = int(inside.sum())
        bins.append(
            {
                "from": round(float(edges[b]), 4),
                "to": round(float(edges[b + 1]), 4),
                "count": count,
                "accuracy": float(correct[inside].mean()) if count else None,
                "confidence": float(confidence[inside].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(bins: list[dict]) -> float:
    total = sum(b["count"] for b in bins)
    return sum(
        b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]
    )


def figures(labels: list[str], truth: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, per-class precision/recall/F1, confusion matrix, calibration: one dict.

    Per-class figures and the matrix cover the labels that occur (as truth or as an answer):
    a 1000-label model judged on five folders gets a readable table, not a million zeros.
    """
    predicted = probabilities.argmax(axis=1)
    confidence = np.clip(probabilities.max(axis=1), 0.0, 1.0)  # float32 sums may pass 1
    seen = sorted(set(truth.tolist()) | set(predicted.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=seen, zero_division=0
    )
    truth_labels = sorted(set(truth.tolist()))
    bins = calibration_bins(predicted == truth, confidence)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "mean_top1_confidence": float(confidence.mean()),
        "expected_calibration_error": expected_calibration_error(bins),
        "macro_f1": float(
            f1_score(truth, predicted, labels=truth_labels, average="macro", zero_division=0)
        ),
        "samples": len(truth),
        "per_class": {
            labels[k]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, k in enumerate(seen)
        },
        "confusion_matrix": {
            "labels": [labels[k] for k in seen],  # rows: truth, columns: answers
            "matrix": confusion_matrix(truth, predicted, labels=seen).tolist(),
        },
        "calibration_bins": bins,
    }


def images_sha256(answered: Answered, folder: PictureFolder, labels: list[str]) -> str:
    """The labelled set's identity: labels, relative names and bytes of the readable pictures."""
    digest = hashlib.sha256()
    for picture, content in zip(answered.pictures, answered.digests, strict=True):
        name = str(picture.path.relative_to(folder.root))
        digest.update(f"{labels[picture.label]}\0{name}\0".encode() + content)
    return digest.hexdigest()


def truth_of(answered: Answered) -> np.ndarray:
    return np.array([picture.label for picture in answered.pictures])


def evaluate_classifier(
    classifier: Classifier, images: Path, skip_unknown: bool = False
) -> tuple[dict, PictureFolder]:
    """The figures of one loaded model on a labelled folder (and the folder, with its skips)."""
    folder = scan_labelled(images, classifier.labels, skip_unknown)
    answered = answer_all([classifier], folder)
    result = figures(classifier.labels, truth_of(answered), answered.answers[0].probabilities)
    result["images"] = str(Path(images).resolve())
    result["images_sha256"] = images_sha256(answered, folder, classifier.labels)
    result["skipped"] = folder.skipped_counts()
    return result, folder


def evaluate(
    tag: str,
    images: Path,
    report: Path | None = None,
    save: bool = False,
    skip_unknown: bool = False,
) -> tuple[dict, PictureFolder]:
    """`python -m training_export evaluate`: figures, a report folder, optionally saved."""
    tag = stored_tag(tag)
    classifier, model_dir = stored_classifier(tag)
    result, folder = evaluate_classifier(classifier, images, skip_unknown)
    result = {"model": tag, **result}
    if report is not None:
        from .reports import write_report

        result["report"] = [str(path) for path in write_report(report, result)]
    if save:
        saved = saved_evaluation(result, model_dir / classifier.card.onnx_file)
        add_evaluation(evaluations_path(), tag, saved)
        result["saved_to"] = str(evaluations_path())
    return result, folder


def saved_evaluation(result: dict, onnx_file: Path) -> SavedEvaluation:
    return SavedEvaluation(
        **{key: result[key] for key in SavedEvaluation.model_fields if key in result},
        model_sha256=file_sha256(onnx_file),
        evaluated_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def summary_lines(result: dict, skipped: str) -> list[str]:
    """The text `evaluate` prints (its --json prints `result` itself)."""
    lines = [
        f"{result['model']} on {result['images']}: {result['samples']} pictures"
        + (f" ({skipped})" if skipped else ""),
        f"accuracy {result['accuracy']:.4f}   mean top-1 confidence "
        f"{result['mean_top1_confidence']:.4f}   expected calibration error "
        f"{result['expected_calibration_error']:.4f}   macro F1 {result['macro_f1']:.4f}",
        f"{'label':<28} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}",
    ]
    for label, row in result["per_class"].items():
        lines.append(
            f"{label[:28]:<28} {row['precision']:>9.4f} {row['recall']:>7.4f} "
            f"{row['f1']:>7.4f} {row['support']:>8}"
        )
    return lines
