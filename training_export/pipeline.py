"""Train -> gate -> export -> verify -> save: the default model's whole journey into the store."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from image_classifier.model_card import HeldOutMetrics, ModelCard

from .digits import training_data_sha256
from .export import export_onnx, verify_onnx
from .recipe import (
    DIGITS_SPEC,
    EPOCHS,
    LABELS,
    MIN_HELDOUT_ACCURACY,
    MODEL_NAME,
    MODEL_VERSION,
)
from .store import delete_model, git_commit, library_versions, model_exists, save_to_store
from .train import train_default


class TrainingError(RuntimeError):
    """The trained model is not good enough to save."""


def train_and_save(
    version: str = MODEL_VERSION,
    force: bool = False,
    epochs: int = EPOCHS,
    say: Callable[[str], None] = print,
) -> str:
    tag = f"{MODEL_NAME}:{version}"
    if model_exists(tag):
        if not force:
            say(f"{tag} is already in the model store (use --force to retrain)")
            return tag
        delete_model(tag)
    started = time.perf_counter()
    trained = train_default(epochs=epochs, say=say)
    if trained.accuracy < MIN_HELDOUT_ACCURACY:
        raise TrainingError(
            f"held-out accuracy {trained.accuracy:.4f} is below {MIN_HELDOUT_ACCURACY}: not saved"
        )
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        signature = export_onnx(trained.module, onnx_path, trained.heldout_inputs)
        difference = verify_onnx(onnx_path, trained.module, trained.heldout_inputs)
        say(f"ONNX verified on {len(trained.heldout_inputs)} held-out pictures: same argmax, "
            f"max probability difference {difference:.1e}")  # fmt: skip
        card = ModelCard(
            name=MODEL_NAME,
            labels=LABELS,
            preprocessing=DIGITS_SPEC,
            output_kind="logits",
            input_name=signature.input_name,
            output_name=signature.output_name,
            opset=signature.opset,
            metrics=HeldOutMetrics(
                accuracy=trained.accuracy,
                mean_top1_confidence=trained.mean_top1_confidence,
                samples=len(trained.heldout_inputs),
            ),
            training_data_sha256=training_data_sha256(trained.split),
            source="trained",
            description="Small CNN on scikit-learn's digits rendered as dark-on-light pictures.",
            versions=library_versions(),
            git_commit=git_commit(),
        )
        saved = save_to_store(onnx_path, card, tag)
    seconds = time.perf_counter() - started
    say(f"saved {saved}: held-out accuracy {trained.accuracy:.4f}, mean confidence "
        f"{trained.mean_top1_confidence:.4f}, {seconds:.1f}s in all")  # fmt: skip
    return saved


def ensure_default_model(say: Callable[[str], None] = print) -> str:
    """The default model's tag, training it first only when the store lacks it."""
    return train_and_save(MODEL_VERSION, force=False, say=say)
