"""Generated photo-like pictures: the stand-in for real photos in benchmarks and INT8 calibration.

Flat colours would flatter both: a JPEG of a flat picture decodes faster than a photo, and a
network's activations on it span a narrow range. These have what photos have to a codec and a
CNN: smooth lighting gradients, objects with edges, and sensor noise.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO_640 = (640, 480)
PHOTO_PHONE = (4032, 3024)  # a 12 MP phone camera
# Shapes are drawn at this many pixels wide and scaled up: a phone photo costs ~1 s to make,
# not 10, and its edges stay soft like a lens's.
_DRAW_WIDTH = 1008


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """One RGB picture of `size` (width, height): a lit background, 6-14 shapes, noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    draw_w = min(width, _DRAW_WIDTH)
    draw_h = max(1, round(height * draw_w / width))
    y, x = np.mgrid[0:draw_h, 0:draw_w].astype(np.float32)
    corners = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    u, v = (x / max(1, draw_w - 1))[..., None], (y / max(1, draw_h - 1))[..., None]
    background = (corners[0] * (1 - u) * (1 - v) + corners[1] * u * (1 - v)
                  + corners[2] * (1 - u) * v + corners[3] * u * v)  # fmt: skip
    picture = Image.fromarray(np.uint8(background))
    draw = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(6, 15))):
        x0, y0 = rng.uniform(-0.1, 0.9) * draw_w, rng.uniform(-0.1, 0.9) * draw_h
        box = [x0, y0, x0 + rng.uniform(0.05, 0.5) * draw_w, y0 + rng.uniform(0.05, 0.5) * draw_h]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            points = rng.uniform(0, 1, size=(int(rng.integers(3, 7)), 2)) * [draw_w, draw_h]
            draw.polygon([tuple(p) for p in points], fill=colour)
    picture = picture.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    noise = rng.normal(0, rng.uniform(3, 9), size=(height, width, 1)).astype(np.float32)
    pixels = np.asarray(picture, dtype=np.float32) + noise
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))


def photo_jpeg(size: tuple[int, int], seed: int, quality: int = 90) -> bytes:
    """`photo(size, seed)` as the JPEG a camera or a browser upload would send."""
    buffer = io.BytesIO()
    photo(size, seed).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
