"""Train the default model on rendered digits, every tensor made by the service's `preprocess`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from image_classifier.core.preprocessing import preprocess

from .cnn import digits_cnn
from .digits import DigitsSplit, load_split, render_heldout, render_training_view
from .recipe import BATCH_SIZE, DIGITS_SPEC, EPOCHS, LEARNING_RATE, SEED, VIEWS_PER_SAMPLE


@dataclass
class TrainedModel:
    module: nn.Module
    split: DigitsSplit
    heldout_inputs: np.ndarray
    accuracy: float
    mean_top1_confidence: float
    seconds: float


def training_tensors(split: DigitsSplit, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = [], []
    for pixels, label in zip(split.train_pixels, split.train_labels, strict=True):
        for _ in range(VIEWS_PER_SAMPLE):
            inputs.append(preprocess(render_training_view(pixels, rng), DIGITS_SPEC))
            labels.append(label)
    return np.stack(inputs), np.asarray(labels, dtype=np.int64)


def heldout_tensors(split: DigitsSplit) -> np.ndarray:
    return np.stack([preprocess(image, DIGITS_SPEC) for image, _ in render_heldout(split)])


def evaluate(module: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Held-out accuracy and mean top-1 confidence (the drift baseline)."""
    module.eval()
    with torch.no_grad():
        probabilities = torch.softmax(module(torch.from_numpy(inputs)), dim=1).numpy()
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    return accuracy, float(probabilities.max(axis=1).mean())


def train_default(
    seed: int = SEED, epochs: int = EPOCHS, say: Callable[[str], None] = print
) -> TrainedModel:
    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(seed)
    split = load_split()
    inputs, labels = training_tensors(split, rng)
    heldout = heldout_tensors(split)
    say(f"rendered {len(inputs)} training views and {len(heldout)} held-out pictures "
        f"in {time.perf_counter() - started:.1f}s")  # fmt: skip

    module = digits_cnn(len(np.unique(labels)))
    optimiser = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps = epochs * -(-len(inputs) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, LEARNING_RATE, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(labels)
    for epoch in range(epochs):
        module.train()
        order = torch.randperm(len(x_all))
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimiser.zero_grad()
            loss = loss_fn(module(x_all[batch]), y_all[batch])
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        accuracy, _ = evaluate(module, heldout, split.heldout_labels)
        say(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f}, "
            f"held-out accuracy {accuracy:.4f} ({time.perf_counter() - started:.1f}s)")  # fmt: skip

    accuracy, confidence = evaluate(module, heldout, split.heldout_labels)
    return TrainedModel(
        module=module,
        split=split,
        heldout_inputs=heldout,
        accuracy=accuracy,
        mean_top1_confidence=confidence,
        seconds=time.perf_counter() - started,
    )
