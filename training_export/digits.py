"""The digits data set (inside scikit-learn), rendered as the pictures users actually send.

sklearn's digits are 8x8 ink intensities (0..16). Users send scans and photos: dark ink on light
paper, any size, any margin, sometimes rotated, blurred, noisy or JPEG-compressed. Training views
are drawn from that whole range; held-out pictures are rendered one fixed, plain way.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .recipe import HELDOUT_FRACTION, SEED


@dataclass(frozen=True)
class DigitsSplit:
    train_pixels: np.ndarray  # (n, 8, 8) ink 0..16
    train_labels: np.ndarray
    heldout_pixels: np.ndarray
    heldout_labels: np.ndarray


def load_split() -> DigitsSplit:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images,
        digits.target,
        test_size=HELDOUT_FRACTION,
        stratify=digits.target,
        random_state=SEED,
    )
    return DigitsSplit(x_train, y_train, x_test, y_test)


def training_data_sha256(split: DigitsSplit) -> str:
    """Identifies exactly the data a model learnt from (pixels and labels, in order)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.train_pixels, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(split.train_labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def render(
    pixels: np.ndarray,
    glyph_size: int = 64,
    canvas: tuple[int, int] = (96, 96),
    position: tuple[float, float] = (0.5, 0.5),
    ink: int = 0,
    paper: int = 255,
    angle: float = 0.0,
    thickness: int = 0,
) -> Image.Image:
    """One 8x8 digit as a grey picture: ink over paper, smoothly upscaled, placed on a canvas.

    `position` places the glyph in the free space: (0, 0) top-left, (0.5, 0.5) centred.
    """
    coverage = Image.fromarray(np.uint8(np.clip(pixels, 0, 16) / 16 * 255), mode="L")
    coverage = coverage.resize((glyph_size, glyph_size), Image.Resampling.BICUBIC)
    if thickness > 0:
        coverage = coverage.filter(ImageFilter.MaxFilter(2 * thickness + 1))
    elif thickness < 0:
        coverage = coverage.filter(ImageFilter.MinFilter(2 * -thickness + 1))
    if angle:
        coverage = coverage.rotate(angle, Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    width, height = canvas
    width, height = max(width, coverage.width), max(height, coverage.height)
    x = round((width - coverage.width) * position[0])
    y = round((height - coverage.height) * position[1])
    alpha = np.zeros((height, width), dtype=np.float32)
    alpha[y : y + coverage.height, x : x + coverage.width] = np.asarray(coverage) / 255.0
    picture = paper - (paper - ink) * alpha
    return Image.fromarray(np.uint8(np.clip(np.rint(picture), 0, 255)), mode="L")


def render_heldout(split: DigitsSplit | None = None) -> list[tuple[Image.Image, int]]:
    """The held-out digits, each as a plain 96x96 picture (64 px glyph, dark on white)."""
    split = split or load_split()
    return [
        (render(pixels), int(label))
        for pixels, label in zip(split.heldout_pixels, split.heldout_labels, strict=True)
    ]


def render_training_view(pixels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One random, realistic picture of a training digit."""
    glyph = int(rng.integers(20, 97))
    margin = rng.integers(0, glyph + 1, size=2)
    canvas = (glyph + int(margin[0]) + 8, glyph + int(margin[1]) + 8)
    paper = int(rng.integers(170, 256))
    ink = int(rng.integers(0, max(1, paper - 100)))
    picture = render(
        pixels,
        glyph_size=glyph,
        canvas=canvas,
        position=(float(rng.random()), float(rng.random())),
        ink=ink,
        paper=paper,
        angle=float(rng.uniform(-12, 12)),
        thickness=int(rng.choice([-1, 0, 1], p=[0.15, 0.7, 0.15])) if glyph > 40 else 0,
    )
    if rng.random() < 0.3:
        picture = picture.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    if rng.random() < 0.5:
        noise = rng.normal(0, rng.uniform(1, 10), size=(picture.height, picture.width))
        picture = Image.fromarray(np.uint8(np.clip(np.asarray(picture) + noise, 0, 255)), mode="L")
    if rng.random() < 0.15:
        picture = Image.fromarray(255 - np.asarray(picture), mode="L")
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=int(rng.integers(50, 96)))
        picture = Image.open(buffer)
        picture.load()
    return picture
