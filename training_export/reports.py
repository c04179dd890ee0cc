"""An evaluation's report folder: the figures as JSON, a confusion matrix and a reliability
diagram as PNGs (matplotlib's Agg backend: no display; a training-only dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

MAX_NAMED_LABELS = 40  # beyond this, the matrix is drawn without names and counts


def write_report(folder: Path, result: dict) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _confusion_matrix(result, folder / "confusion_matrix.png"),
        _reliability_diagram(result, folder / "reliability_diagram.png"),
        folder / "evaluation.json",
    ]
    written[2].write_text(json.dumps(result, indent=2) + "\n")
    return written


def _confusion_matrix(result: dict, path: Path) -> Path:
    labels = result["confusion_matrix"]["labels"]
    named = len(labels) <= MAX_NAMED_LABELS
    side = min(30.0, max(5.0, 0.45 * len(labels)))
    figure, axes = plt.subplots(figsize=(side, side))
    display = ConfusionMatrixDisplay(
        confusion_matrix=np.array(result["confusion_matrix"]["matrix"]),
        display_labels=labels if named else None,
    )
    display.plot(
        ax=axes, cmap="Blues", colorbar=False, include_values=named, xticks_rotation="vertical"
    )
    if not named:
        axes.set_xticks([])
        axes.set_yticks([])
    axes.set_title(
        f"{result['model']}: accuracy {result['accuracy']:.4f} on {result['samples']} pictures"
    )
    return _save(figure, path)


def _reliability_diagram(result: dict, path: Path) -> Path:
    bins = [b for b in result["calibration_bins"] if b["count"]]
    width = result["calibration_bins"][0]["to"] - result["calibration_bins"][0]["from"]
    figure, axes = plt.subplots(figsize=(6, 6))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    axes.bar(
        [b["from"] for b in bins],
        [b["accuracy"] for b in bins],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy in the bin",
    )
    axes.scatter(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        color="red",
        zorder=3,
        label="mean confidence in the bin",
    )
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="top-1 confidence",
        ylabel="accuracy",
        title=f"{result['model']}: ECE {result['expected_calibration_error']:.4f}",
    )
    axes.legend(loc="upper left")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
