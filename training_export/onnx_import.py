"""Bring your own ONNX image classifier: check it against its card, then save it like ours."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from image_classifier.core.classifier import CARD_FILE, Classifier
from image_classifier.core.model_card import ModelCard
from image_classifier.core.preprocessing import PreprocessSpec

from .export import ExportError, inspect_onnx
from .store import library_versions, save_to_store

# Card fields a config file may set; the rest are read from the ONNX file or filled in here.
_CONFIG_FIELDS = {"labels", "preprocessing", "output_kind", "description", "metrics"}
_DERIVED_FIELDS = {"name", "task", "onnx_file", "input_name", "output_name", "opset", "source",
                   "versions", "git_commit", "training_data_sha256", "benchmark_only"}  # fmt: skip


class ModelImportError(ValueError):
    """The model and its description do not fit together."""


def read_labels(path: Path) -> list[str]:
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(labels) < 2:
        raise ModelImportError(f"{path}: need at least two labels, one per line")
    return labels


def read_config(path: Path) -> dict[str, Any]:
    config = json.loads(Path(path).read_text())
    unknown = set(config) - _CONFIG_FIELDS - _DERIVED_FIELDS
    if unknown:
        raise ModelImportError(f"{path}: unknown fields {sorted(unknown)}")
    return {key: value for key, value in config.items() if key in _CONFIG_FIELDS}


def detect_output_kind(session: ort.InferenceSession, spec: PreprocessSpec) -> str:
    """Rows that are all in [0, 1] and sum to 1 on random inputs are probabilities."""
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(4, *spec.tensor_shape)).astype(np.float32)
    output = session.run(None, {session.get_inputs()[0].name: batch})[0].reshape(4, -1)
    in_range = bool(((output >= 0) & (output <= 1)).all())
    sums_to_one = bool(np.allclose(output.sum(axis=1), 1.0, atol=1e-3))
    return "probabilities" if in_range and sums_to_one else "logits"


def import_onnx(
    model_path: Path,
    name: str,
    version: str | None,
    labels: list[str] | None = None,
    config: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    output_kind: str = "auto",
    description: str = "",
) -> str:
    """Validate and save; returns the tag. Flags (labels, preprocessing) override the config."""
    model_path = Path(model_path)
    config = dict(config or {})
    signature = inspect_onnx(model_path)
    labels = labels or config.pop("labels", None)
    if not labels:
        raise ModelImportError("labels are required (--labels FILE or a config file)")
    spec_fields = {**config.pop("preprocessing", {}), **(preprocessing or {})}
    try:
        spec = PreprocessSpec(**spec_fields)
    except (TypeError, ValueError) as exc:
        raise ModelImportError(f"preprocessing is incomplete or invalid: {exc}") from None
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    kind = config.pop("output_kind", output_kind) if output_kind == "auto" else output_kind
    if kind == "auto":
        kind = detect_output_kind(session, spec)
    card = ModelCard(
        name=name,
        labels=labels,
        preprocessing=spec,
        output_kind=kind,
        input_name=signature.input_name,
        output_name=signature.output_name,
        opset=signature.opset,
        source="imported",
        description=description or config.pop("description", ""),
        metrics=config.pop("metrics", {}),
        versions=library_versions(),
    )
    _check_with_runtime(model_path, card)
    tag = f"{name}:{version}" if version else name
    return save_to_store(model_path, card, tag)


def _check_with_runtime(model_path: Path, card: ModelCard) -> None:
    """Load it exactly as the service will, and run it once: mismatches fail here, not in prod."""
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder)
        (staged / card.onnx_file).symlink_to(model_path.resolve())
        (staged / CARD_FILE).write_text(card.model_dump_json())
        try:
            Classifier(staged).warm_up()
        except Exception as exc:
            raise ModelImportError(f"{model_path} does not fit its card: {exc}") from None


__all__ = ["ExportError", "ModelImportError", "import_onnx", "read_config", "read_labels"]
