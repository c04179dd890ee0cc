"""Pictures as bytes: encoding with Pillow, EXIF orientations, a PNG header claiming any size,
headers packed with parts that Pillow parses one by one."""

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


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims any size: the decompression-bomb shape."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024, 9))
        + chunk(b"IEND", b"")
    )


def with_header_parts(fmt: str, parts: int, picture: Image.Image | None = None) -> bytes:
    """A valid picture (grey 32x32 by default) carrying `parts` more of the structure that Pillow
    parses one Python loop turn at a time: empty JPEG comments, empty private PNG chunks or 1-byte
    GIF comment blocks in the header, or, for TIFF, uncompressed strips of one row (the picture is
    then 32 pixels wide and `parts` high)."""
    if fmt == "TIFF":
        return encode(Image.new("L", (32, parts), 128), "TIFF", tiffinfo={278: 1})
    data = encode(picture or Image.new("L", (32, 32), 128), fmt)
    if fmt == "JPEG":
        return data[:2] + b"\xff\xfe\x00\x02" * parts + data[2:]
    if fmt == "PNG":
        after_header = 8 + 25  # the signature and IHDR
        return data[:after_header] + chunk(b"teSt", b"") * parts + data[after_header:]
    if fmt == "GIF":
        flags = data[10]
        after_palette = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        comment = b"\x21\xfe" + b"\x01c" * parts + b"\x00"
        return data[:after_palette] + comment + data[after_palette:]
    raise ValueError(f"no header parts for {fmt}")
