"""Saved evaluations (`model_evaluations.json`, beside `served_model.json`): what a model version
scored on a labelled folder after it was saved.

Store entries are immutable, so an evaluation is not written into the stored card: it is kept
here, per tag, newest last, with the sha256 of the ONNX file it judged (an entry replaced under
the same tag with --force does not inherit it). The service merges a version's latest evaluation
into its card when it loads the model, so `mean_top1_confidence` becomes the drift alarm's
baseline; `models promote` compares candidates on them. The file goes into the bento with the
release record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from ..core.model_card import HeldOutMetrics, ModelCard
from .release_record import record_path

EVALUATIONS_FILE = "model_evaluations.json"


class SavedEvaluation(BaseModel):
    accuracy: float = Field(ge=0, le=1)
    mean_top1_confidence: float = Field(ge=0, le=1, description="the drift alarm's baseline")
    samples: int = Field(ge=1)
    expected_calibration_error: float = Field(ge=0, le=1)
    macro_f1: float = Field(ge=0, le=1)
    images: str = Field(description="the labelled folder, as given")
    images_sha256: str = Field(description="its pictures' labels, names and bytes")
    model_sha256: str = Field(description="the ONNX file evaluated")
    evaluated_at: str


class EvaluationRecord(BaseModel):
    evaluations: dict[str, list[SavedEvaluation]] = Field(
        default_factory=dict, description="per name:version, newest last"
    )

    def latest(self, tag: str, model_sha256: str) -> SavedEvaluation | None:
        """The newest evaluation of this tag made on this very ONNX file."""
        matching = [e for e in self.evaluations.get(tag, []) if e.model_sha256 == model_sha256]
        return matching[-1] if matching else None

    def on_images(self, tag: str, model_sha256: str, images_sha256: str) -> SavedEvaluation | None:
        """The newest evaluation of this tag's file on one particular labelled set."""
        matching = [
            e
            for e in self.evaluations.get(tag, [])
            if e.model_sha256 == model_sha256 and e.images_sha256 == images_sha256
        ]
        return matching[-1] if matching else None


def evaluations_path(environ: dict[str, str] | os._Environ | None = None) -> Path:
    """Beside the release record, wherever SERVED_MODEL_FILE puts it."""
    return record_path(environ).with_name(EVALUATIONS_FILE)


def read_evaluations(path: Path) -> EvaluationRecord:
    try:
        return EvaluationRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return EvaluationRecord()
    except ValidationError as exc:
        raise ValueError(f"{path} is not a valid evaluation record: {exc}") from None


def add_evaluation(path: Path, tag: str, evaluation: SavedEvaluation) -> None:
    """Append, then replace the file atomically (a starting server reads old or new)."""
    record = read_evaluations(path)
    record.evaluations.setdefault(tag, []).append(evaluation)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record.model_dump(), indent=2) + "\n")
    os.replace(temporary, path)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def with_evaluation(card: ModelCard, evaluation: SavedEvaluation | None) -> ModelCard:
    """The card whose metrics are the saved evaluation's (its other metrics kept)."""
    if evaluation is None:
        return card
    figures = evaluation.model_dump(exclude={"images"})  # a local path: not for /info
    metrics = {**card.metrics.model_dump(exclude_none=True), **figures}
    return card.model_copy(update={"metrics": HeldOutMetrics(**metrics)})


def evaluated_card(
    card: ModelCard, tag: str, model_dir: Path, record: EvaluationRecord
) -> ModelCard:
    """The card as served: the stored one, with the tag's latest saved evaluation merged in."""
    if tag not in record.evaluations:
        return card
    digest = file_sha256(Path(model_dir) / card.onnx_file)
    return with_evaluation(card, record.latest(tag, digest))
