"""INT8 of any stored classifier, calibrated on the user's own pictures (`quantize --calibration`).

Calibration tensors come from the service's own decode and preprocess (the core `Classifier`), so
the activation ranges fit what the served model sees. The gate:
- with --images (a labelled folder): INT8 accuracy may fall at most --max-drop below fp32's, both
  measured through the same `Classifier` path as `evaluate`;
- without: every 4th calibration picture is held back from calibration, and INT8's top-1 must
  equal fp32's on at least 99% of them (`MIN_TOP1_AGREEMENT`; with fewer than 100 held-back
  pictures that means not one may change).
Nothing that fails is saved; the error says by how much it failed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from image_classifier.core.classifier import CARD_FILE, Classifier

from .evaluation import answer_all, figures, prepared_chunks, truth_of
from .folders import PictureFolder, scan_labelled, scan_pictures
from .quantize import (
    MAX_ACCURACY_DROP,
    MIN_TOP1_AGREEMENT,
    QuantizationError,
    check_out_tag,
    judge_accuracy,
    judge_agreement,
    quantize_qdq,
    refuse_int8_source,
    save_int8,
)
from .store import stored_classifier, stored_tag

HELD_BACK_EVERY = 4  # without labelled pictures, every 4th calibration picture judges
MAX_CALIBRATION_PICTURES = 128  # ONNX Runtime's calibrator keeps every run's activations
MIN_PICTURES = 20  # without --images: 15 to calibrate, 5 to judge, at the least


def quantize_with_folders(
    tag: str,
    calibration: Path,
    images: Path | None = None,
    max_drop: float | None = None,
    out_tag: str | None = None,
    force: bool = False,
    skip_unknown: bool = False,
    say: Callable[[str], None] = print,
) -> str:
    tag = stored_tag(tag)
    fp32, model_dir = stored_classifier(tag)
    refuse_int8_source(tag, fp32.card)
    name, version = tag.split(":", 1)
    out_tag = out_tag or f"{name}-int8:{version}"
    check_out_tag(tag, out_tag, force)
    max_drop = MAX_ACCURACY_DROP if max_drop is None else max_drop
    pictures = scan_pictures(calibration)
    if images is None:
        held_back = pictures.pictures[HELD_BACK_EVERY - 1 :: HELD_BACK_EVERY]
        judged = PictureFolder(pictures.root, held_back)
        calibrating = [p for p in pictures.pictures if p not in set(held_back)]
        if len(pictures.pictures) < MIN_PICTURES:
            raise QuantizationError(
                f"{calibration} has {len(pictures.pictures)} pictures; without --images at "
                f"least {MIN_PICTURES} are needed (a quarter are held back to judge INT8)"
            )
    else:
        judged = scan_labelled(images, fp32.labels, skip_unknown)
        calibrating = pictures.pictures
    tensors = _calibration_tensors(fp32, PictureFolder(pictures.root, calibrating), say)
    with tempfile.TemporaryDirectory(prefix="quantize-") as staging:
        folder = Path(staging)
        card = fp32.card
        quantize_qdq(model_dir / card.onnx_file, folder / card.onnx_file, card.input_name, tensors)
        (folder / CARD_FILE).write_text(card.model_dump_json())
        int8 = Classifier(folder, fp32.options)
        answered = answer_all([fp32, int8], judged)
        before, after = (a.probabilities.argmax(axis=1) for a in answered.answers)
        gate = {
            "top1_agreement": round(float((before == after).mean()), 4),
            "calibration_samples": len(tensors),
            "evaluation_samples": len(answered.pictures),
        }
        for checked in (pictures, judged):
            if skipped := checked.describe_skipped():
                say(f"{checked.root}: {skipped}")
        metrics = card.metrics.model_dump(exclude_none=True)
        if images is None:
            judge_agreement(gate["top1_agreement"], len(answered.pictures), MIN_TOP1_AGREEMENT)
        else:
            truth = truth_of(answered)
            fp32_figures, int8_figures = (
                figures(fp32.labels, truth, a.probabilities) for a in answered.answers
            )
            gate["fp32_accuracy"] = round(fp32_figures["accuracy"], 4)
            gate["int8_accuracy"] = round(int8_figures["accuracy"], 4)
            gate["accuracy_drop"] = judge_accuracy(
                fp32_figures["accuracy"], int8_figures["accuracy"], max_drop
            )
            metrics.update({key: int8_figures[key] for key in _CARD_FIGURES})
        saved = save_int8(folder / card.onnx_file, card, tag, out_tag, metrics, gate)
    say(f"saved {saved}: gate passed {gate}")
    return saved


_CARD_FIGURES = (
    "accuracy",
    "mean_top1_confidence",
    "samples",
    "expected_calibration_error",
    "macro_f1",
)


def _calibration_tensors(
    classifier: Classifier, folder: PictureFolder, say: Callable[[str], None]
) -> np.ndarray:
    if len(folder.pictures) > MAX_CALIBRATION_PICTURES:
        every = np.linspace(0, len(folder.pictures) - 1, MAX_CALIBRATION_PICTURES).astype(int)
        say(
            f"calibrating on {MAX_CALIBRATION_PICTURES} of {len(folder.pictures)} pictures, "
            "evenly spread"
        )
        folder = replace(folder, pictures=[folder.pictures[i] for i in every])
    tensors = [t for _, _, chunk, _ in prepared_chunks([classifier], folder) for t in chunk[0]]
    skipped = folder.describe_skipped()
    if not tensors:
        raise QuantizationError(f"none of the calibration pictures could be read; {skipped}")
    if skipped:
        say(f"calibration: {skipped}")
    return np.stack(tensors)
