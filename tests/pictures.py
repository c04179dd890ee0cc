"""Pictures as bytes: encoding with Pillow, EXIF orientations, a PNG header claiming any size."""

from __future__ import annotations

import io
import struct
import zlib

import pillow_heif
from PIL import Image

# Writing HEIF needs pillow-heif's plugin; the service's decoder registers the same one when it is
# imported, but a test module that encodes HEIC must not depend on having imported it first.
pillow_heif.register_heif_opener()

# The operation that, applied to the upright picture, gives what a camera stores with each
# EXIF orientation tag (so decoding must undo it).
EXIF_STORED_AS = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims any size: the decompression-bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
