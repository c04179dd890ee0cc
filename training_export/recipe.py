"""The default model's recipe in one place: change anything here, bump the version."""

from __future__ import annotations

from image_classifier.core.preprocessing import PreprocessSpec
from image_classifier.serving.release_record import DEFAULT_MODEL_NAME, DEFAULT_MODEL_TAG

MODEL_NAME = DEFAULT_MODEL_NAME
MODEL_VERSION = DEFAULT_MODEL_TAG.split(":", 1)[1]
LABELS = [str(digit) for digit in range(10)]
SEED = 0
HELDOUT_FRACTION = 0.25
VIEWS_PER_SAMPLE = 8
EPOCHS = 8
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
MIN_HELDOUT_ACCURACY = 0.97
OPSET = 17

# What the served model sees: dark ink on light paper, cropped to the ink, 28x28 grey in [-1, 1].
DIGITS_SPEC = PreprocessSpec(
    input_size=(28, 28),
    color_mode="L",
    resize_filter="bilinear",
    resize_mode="stretch",
    content_crop=True,
    content_padding=0.15,
    scale=1 / 255,
    mean=(0.5,),
    std=(0.5,),
    layout="NCHW",
)
