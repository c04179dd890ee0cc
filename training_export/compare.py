"""Two stored versions on the same labelled pictures, side by side (`compare`).

Both run through the service's own `Classifier`, one picture at a time and interleaved (A then B
on each picture), so the per-picture latency (decode + preprocess + model run, in this process)
is measured under the same conditions for both; the figures are `evaluate`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluation import answer_all, figures, truth_of
from .folders import scan_labelled
from .store import stored_classifier

SUMMARY = ("accuracy", "mean_top1_confidence", "expected_calibration_error", "macro_f1")


def compare(tag_a: str, tag_b: str, images: Path, skip_unknown: bool = False) -> dict:
    a, _ = stored_classifier(tag_a, max_batch=1)
    b, _ = stored_classifier(tag_b, max_batch=1)
    if a.labels != b.labels:
        raise ValueError(
            f"{tag_a} and {tag_b} have different labels (or label order): "
            "their answers cannot be compared picture by picture"
        )
    folder = scan_labelled(images, a.labels, skip_unknown)
    answered = answer_all([a, b], folder, batch=1)
    truth = truth_of(answered)
    results = [figures(a.labels, truth, answers.probabilities) for answers in answered.answers]
    answers = [np.argmax(x.probabilities, axis=1) for x in answered.answers]
    per_class = {}
    for label in dict.fromkeys([*results[0]["per_class"], *results[1]["per_class"]]):
        rows = [result["per_class"].get(label, {}) for result in results]
        per_class[label] = {
            metric: [row.get(metric, 0.0) for row in rows] for metric in ("recall", "f1")
        } | {"support": max(row.get("support", 0) for row in rows)}
    return {
        "images": str(images),
        "samples": len(truth),
        "skipped": folder.skipped_counts(),
        "models": [
            {
                "tag": tag,
                **{key: result[key] for key in SUMMARY},
                "ms_per_picture_median": round(model.milliseconds_per_picture, 3),
            }
            for tag, result, model in zip((tag_a, tag_b), results, answered.answers, strict=True)
        ],
        "accuracy_change": results[1]["accuracy"] - results[0]["accuracy"],
        "top1_agreement": float((answers[0] == answers[1]).mean()),
        "per_class": per_class,
    }


def comparison_lines(result: dict) -> list[str]:
    a, b = result["models"]
    skipped = "; ".join(f"{count} {reason}" for reason, count in result["skipped"].items())
    lines = [
        f"{result['samples']} labelled pictures in {result['images']}"
        + (f" (skipped: {skipped})" if skipped else ""),  # it was a Python dict
        f"{'':<30} {a['tag'][:24]:>24} {b['tag'][:24]:>24}",
    ]
    for key in (*SUMMARY, "ms_per_picture_median"):
        lines.append(f"{key:<30} {a[key]:>24.4f} {b[key]:>24.4f}")
    lines.append(
        f"top-1 agreement {result['top1_agreement']:.4f}; accuracy change "
        f"{result['accuracy_change']:+.4f}"
    )
    changed = {k: v for k, v in result["per_class"].items() if v["recall"][0] != v["recall"][1]}
    lines.append(f"per-class recall changes: {len(changed)} of {len(result['per_class'])} labels")
    for label, row in changed.items():
        lines.append(
            f"  {label[:28]:<28} recall {row['recall'][0]:.4f} -> {row['recall'][1]:.4f}"
            f"  f1 {row['f1'][0]:.4f} -> {row['f1'][1]:.4f}  ({row['support']} pictures)"
        )
    return lines
