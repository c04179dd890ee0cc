"""Train -> gate -> export -> verify -> save: the default model's whole journey into the store."""

from __future__ import annotations

import time
from collections.abc import Callable

from image_classifier.core.model_card import HeldOutMetrics

from .digits import training_data_sha256
from .export import export_and_save
from .recipe import (
    DIGITS_SPEC,
    EPOCHS,
    LABELS,
    MIN_HELDOUT_ACCURACY,
    MODEL_NAME,
    MODEL_VERSION,
)
from .store import already_saved
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
    if already_saved(tag, force, say):
        return tag
    started = time.perf_counter()
    trained = train_default(epochs=epochs, say=say)
    if trained.accuracy < MIN_HELDOUT_ACCURACY:
        raise TrainingError(
            f"held-out accuracy {trained.accuracy:.4f} is below {MIN_HELDOUT_ACCURACY}: not saved"
        )
    saved, difference = export_and_save(
        trained.module,
        trained.heldout_inputs,
        tag,
        name=MODEL_NAME,
        labels=LABELS,
        preprocessing=DIGITS_SPEC,
        metrics=HeldOutMetrics(
            accuracy=trained.accuracy,
            mean_top1_confidence=trained.mean_top1_confidence,
            samples=len(trained.heldout_inputs),
        ),
        training_data_sha256=training_data_sha256(trained.split),
        description="Small CNN on scikit-learn's digits rendered as dark-on-light pictures.",
    )
    seconds = time.perf_counter() - started
    say(f"ONNX verified on {len(trained.heldout_inputs)} held-out pictures: same argmax, "
        f"max probability difference {difference:.1e}")  # fmt: skip
    say(f"saved {saved}: held-out accuracy {trained.accuracy:.4f}, mean confidence "
        f"{trained.mean_top1_confidence:.4f}, {seconds:.1f}s in all")  # fmt: skip
    return saved


def ensure_default_model(say: Callable[[str], None] = print) -> str:
    """The default model's tag, training it first only when the store lacks it."""
    return train_and_save(MODEL_VERSION, force=False, say=say)
