"""Bytes from a client to an upright Pillow image, or a `ClassifierError` with a stable code.

Order matters for safety: the format is identified from the bytes against an allow-list, the pixel
count is checked from the header, and only then is pixel data decoded. Truncated data is refused,
never padded (Pillow's LOAD_TRUNCATED_IMAGES stays off).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pillow_heif
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from .errors import ClassifierError, ErrorCode
from .header_walk import BASE_STEPS, BYTES_PER_STEP, header_steps, step_budget

log = logging.getLogger(__name__)
# HEIC/HEIF is what phone cameras save by default; Pillow reads it through libheif's plugin.
pillow_heif.register_heif_opener()
# A PNG's compressed colour profile or text (an XMP packet: Photoshop's grows with its history)
# may inflate to 16 MB, not Pillow's 1 MB, past which a valid file was called corrupt. What all of
# a file's text may take stays Pillow's 64 MB (MAX_TEXT_MEMORY): the worst case does not grow.
PngImagePlugin.MAX_TEXT_CHUNK = 16 * 1024 * 1024
# MPO is a JPEG with extra frames (phone portraits, stereo cameras): Pillow names it MPO, but it is
# sent, and decoded, as a JPEG.
_JPEG_FAMILY = {"JPEG", "MPO"}
# JPEG modes the decoder can scale down while decoding (CMYK too: print-ready photos, which
# otherwise cost 4 bytes a pixel at full size).
_DRAFT_MODES = ("L", "RGB", "CMYK")

# Shapes that cost far more to decode than their pixel count says (black-box review, measured on
# this service): every progressive JPEG scan is one more pass over every pixel, and 10-byte empty
# scans made a 202 KB file cost 3 CPU-seconds that no timeout could interrupt; a picture 1 pixel
# wide and 50,000,000 high took 6 CPU-seconds and 1.6 GB to resize; a TIFF whose one tile was
# 32768x32768 (1 MB of zeros) took 1 GB while it decoded into a 7000x7000 picture.
# Bytes a pixel these decoders take at their peak, against about 4 for PNG, JPEG, GIF, BMP and
# TIFF (measured in process on 7000x7000 pictures, decoding and preprocessing): a pixel cap means
# the same memory for every format only once it is divided by these. A 2 KB WebP of 49 MP took
# 750 MB.
_DECODER_BYTES_PER_PIXEL = {"WEBP": 16, "AVIF": 10, "HEIF": 8}  # HEIF: 7.4 RGB, 8.4 RGBA
_BASE_BYTES_PER_PIXEL = 4
MAX_JPEG_SCANS = 100  # encoders write about 10 (libjpeg's progressive script)
_JPEG_PIXELS_PER_BYTE = 1024  # twice what a JPEG can hold at best: 512, a bit per 8x8 block
MAX_ASPECT_RATIO = 10_000  # one side over this many times the other: no picture to classify
_TIFF_TILE_TAGS = (322, 323)  # TileWidth, TileLength
_SMALL_TILE_PIXELS = 1 << 20  # a tile may pad a small picture up to this

# Declared types that say nothing about the format (`image/*`: "an image"): the bytes decide.
_GENERIC_TYPES = {
    "",
    "application/octet-stream",
    "binary/octet-stream",
    "application/unknown",
    "image/*",
}
_TYPE_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/apng": "image/png",  # what browsers declare for .apng files: PNG bytes
    "image/vnd.mozilla.apng": "image/png",
    "image/x-citrix-jpeg": "image/jpeg",  # Citrix clients' names for what they pass on
    "image/x-citrix-png": "image/png",
    "image/x-ms-bmp": "image/bmp",
    "image/x-bmp": "image/bmp",
    "image/tif": "image/tiff",
    "image/x-tiff": "image/tiff",
    "image/heic": "image/heif",
    "image/heic-sequence": "image/heif",
    "image/heif-sequence": "image/heif",
    "image/avif-sequence": "image/avif",
}


@dataclass(frozen=True)
class DecodeLimits:
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
    max_pixels: int = 50_000_000


def decodable_formats() -> set[str]:
    """Every format name Pillow can open here (its own plugins and HEIF's)."""
    Image.init()
    return set(Image.OPEN)


def normalise_content_type(declared: str | None) -> str:
    """`Image/JPG; charset=x` -> `image/jpeg`; missing -> ``."""
    if not declared:
        return ""
    media = declared.split(";", 1)[0].strip().lower()
    return _TYPE_ALIASES.get(media, media)


def check_declared_type(
    declared: str | None, allowed_formats: tuple[str, ...], data: bytes = b""
) -> None:
    """Refuse early a declared type that can never be served (text/html, application/pdf...) or,
    given the bytes, one their signature contradicts: before any decoding (or cached answer)."""
    media = normalise_content_type(declared)
    if media in _GENERIC_TYPES:
        return
    allowed = {_mime_of(fmt) for fmt in allowed_formats}
    if media not in allowed:
        raise ClassifierError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"content type {media!r} is not accepted; send one of: {_format_list(allowed_formats)}",
        )
    if data and (signature := _sniff_format(data, allowed_formats)):
        _check_declared_matches(declared, signature)


def decode_image(
    data: bytes,
    limits: DecodeLimits,
    declared_type: str | None = None,
    size_hint: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode the first frame, upright (EXIF orientation applied), in its own colour mode.

    `size_hint` (width, height) lets the JPEG decoder scale down by 2/4/8 while it decodes
    (`Image.draft`), never below the hint: a phone photo then costs a fraction of a full decode.
    """
    image, _ = open_image(data, limits, declared_type, size_hint)
    return load_image(image)


def open_image(
    data: bytes,
    limits: DecodeLimits,
    declared_type: str | None = None,
    size_hint: tuple[int, int] | None = None,
) -> tuple[Image.Image, int]:
    """`decode_image` up to the pixels: the header read and checked, the scale-down chosen. With
    it, what decoding will take, in pixels of 4 bytes (for a `PixelBudget`)."""
    if not data:
        raise ClassifierError(ErrorCode.INVALID_IMAGE, "the file is empty")
    _check_parsing_cost(data)
    image = _open(data, limits)
    _check_declared_matches(declared_type, image.format)
    width, height = image.size
    if width < 1 or height < 1:
        raise ClassifierError(ErrorCode.INVALID_IMAGE, "the image has no pixels")
    if width * height > limits.max_pixels:
        raise ClassifierError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the image is {width}x{height} pixels; at most {limits.max_pixels:,} are accepted",
        )
    cost = _decoder_bytes_per_pixel(image)
    if cost > _BASE_BYTES_PER_PIXEL:
        most = limits.max_pixels * _BASE_BYTES_PER_PIXEL // cost
        if width * height > most:
            raise ClassifierError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"the {_kind(image)} image is {width}x{height} pixels; at most {most:,} are "
                f"accepted in {image.format}, whose decoder takes about {cost} bytes a pixel",
            )
    _check_decoding_cost(data, image)
    if size_hint is not None and image.format in _JPEG_FAMILY and image.mode in _DRAFT_MODES:
        image.draft(image.mode, size_hint)
        if not _progressive_jpeg(image):  # decoded at the scaled-down size
            width, height = image.size
    return image, width * height * max(cost, _BASE_BYTES_PER_PIXEL) // _BASE_BYTES_PER_PIXEL


def load_image(image: Image.Image) -> Image.Image:
    """An image from `open_image`, decoded and upright."""
    try:
        image.load()
    except Exception as exc:  # any failure while decoding hostile bytes is the data's fault
        log.debug("decode failed: %r", exc)
        raise _unreadable(exc, "the image data is truncated or corrupt") from None
    return _upright(image)


class PixelBudget:
    """At most `pixels` (of 4 bytes) decoded at once in one process, however many threads decode.

    A worker's memory at its peak follows the pictures it decodes, not its thread count: a 49 MP
    PNG takes about 190 MB while it is decoded and preprocessed, so threads enough to keep the
    cores busy on everyday photos could, given such pictures at once, outgrow a pod's memory.
    A picture waits here until its pixels fit; one larger than the whole budget waits to be
    alone. Everyday photos (a 640x480 JPEG: 0.3 MP) never wait. 0: no bound."""

    def __init__(self, pixels: int = 0) -> None:
        self.pixels = pixels
        self._held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if not self.pixels:
            yield
            return
        pixels = min(pixels, self.pixels)
        with self._changed:
            self._changed.wait_for(lambda: self._held + pixels <= self.pixels)
            self._held += pixels
        try:
            yield
        finally:
            with self._changed:
                self._held -= pixels
                self._changed.notify_all()


def _unreadable(exc: Exception, otherwise: str) -> ClassifierError:
    """Why Pillow could not read a file of a format it knows, in the client's terms."""
    if "Decompressed data too large" in str(exc):  # Pillow's cap on a PNG's metadata
        return ClassifierError(
            ErrorCode.INVALID_IMAGE,
            "a compressed metadata chunk of the PNG (text or colour profile) inflates past the "
            "decoder's limit; save the picture without it",
        )
    return ClassifierError(ErrorCode.INVALID_IMAGE, otherwise)


def _progressive_jpeg(image: Image.Image) -> bool:
    return image.format in _JPEG_FAMILY and bool(image.info.get("progressive"))


def _decoder_bytes_per_pixel(image: Image.Image) -> int:
    """A progressive JPEG is decoded through a full-size buffer of 2 bytes a pixel per colour
    component, whatever the scale-down (a 7000x7000 CMYK one took 380 MB)."""
    if _progressive_jpeg(image):
        return 2 * len(image.getbands())
    return _DECODER_BYTES_PER_PIXEL.get(image.format, _BASE_BYTES_PER_PIXEL)


def _kind(image: Image.Image) -> str:
    return f"progressive {image.format}" if _progressive_jpeg(image) else str(image.format)


def _check_parsing_cost(data: bytes) -> None:
    """Refuse, before Pillow opens it, a header whose parsing costs far more than its bytes."""
    budget = step_budget(len(data))
    if header_steps(data, budget) > budget:
        raise ClassifierError(
            ErrorCode.INVALID_IMAGE,
            f"the file has more than {budget:,} markers, chunks, blocks or stray bytes around its "
            f"picture ({len(data):,} bytes carry at most one per {BYTES_PER_STEP:,} beyond the "
            f"first {BASE_STEPS:,})",
        )


def _check_decoding_cost(data: bytes, image: Image.Image) -> None:
    """Refuse, from the header, the shapes whose decoding costs far more than their pixels."""
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ClassifierError(
            ErrorCode.INVALID_IMAGE,
            f"the image is {width}x{height} pixels; sides more than {MAX_ASPECT_RATIO:,} times "
            "apart are not classified",
        )
    if image.format in _JPEG_FAMILY and len(data) * _JPEG_PIXELS_PER_BYTE < width * height:
        # Every 8x8 block costs at least a bit (its DC difference), so a JPEG this small for its
        # size has lost its data: the decoder would fill the picture with grey, and classify it.
        raise ClassifierError(
            ErrorCode.INVALID_IMAGE,
            f"the JPEG holds {len(data):,} bytes for {width}x{height} pixels: it is truncated or "
            "corrupt",
        )
    if _progressive_jpeg(image) and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        # 0xFF 0xDA starts a scan (inside scan data every 0xFF is followed by 0x00). Only a
        # progressive JPEG decodes scan after scan: a baseline one fails at a second scan, and
        # counting every upload's bytes took 0.5 % of the server's CPU at 16 clients (py-spy).
        raise ClassifierError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are decoded (each one is a "
            "pass over every pixel)",
        )
    if image.format == "TIFF":
        tile_width, tile_length = (_tag_number(image, tag) for tag in _TIFF_TILE_TAGS)
        if tile_width * tile_length > max(width * height, _SMALL_TILE_PIXELS):
            raise ClassifierError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"the TIFF's tiles are {tile_width}x{tile_length} pixels, larger than the "
                f"{width}x{height} picture",
            )


def _tag_number(image: Image.Image, tag: int) -> int:
    """A TIFF tag's one number, 0 when absent or not a number (hostile files say anything)."""
    value = image.tag_v2.get(tag, 0)
    if isinstance(value, tuple):
        value = value[0] if value else 0
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=list(limits.allowed_formats))
    except Image.DecompressionBombError:
        raise ClassifierError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"the image declares too many pixels; at most {limits.max_pixels:,} are accepted",
        ) from None
    except UnidentifiedImageError:
        if _sniff_format(data, limits.allowed_formats):  # e.g. a PNG cut off inside its header
            raise ClassifierError(
                ErrorCode.INVALID_IMAGE, "the image header is truncated or corrupt"
            ) from None
        raise ClassifierError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"not a supported image; send one of: {_format_list(limits.allowed_formats)}",
        ) from None
    except Exception as exc:  # a recognised format whose header is broken
        log.debug("header parse failed: %r", exc)
        raise _unreadable(exc, "the image header is corrupt") from None


def _sniff_format(data: bytes, allowed_formats: tuple[str, ...]) -> str | None:
    """The allowed format whose signature the bytes start with (Pillow's own signature checks)."""
    Image.init()
    for fmt in allowed_formats:
        _, accept = Image.OPEN.get(fmt, (None, None))
        if accept is not None and accept(data[:16]):
            return fmt
    return None


def _check_declared_matches(declared: str | None, actual_format: str | None) -> None:
    media = normalise_content_type(declared)
    if media in _GENERIC_TYPES:
        return
    actual = _mime_of(actual_format or "")
    if media != actual:
        raise ClassifierError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"the upload was declared {media!r} but its bytes are {actual_format}",
        )


def _upright(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block, or an orientation that is not one value of
    1..8, leaves the picture as stored.

    Turned here, not by Pillow's `exif_transpose`: that also rewrites the whole EXIF block in
    Python, and a 32x32 PNG whose orientation tag held 4 million values cost 3 s and 600 MiB (a
    review); reading the tag costs what its bytes do."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:
        log.debug("EXIF orientation ignored: %r", exc)
        return image
    turn = _TURNS.get(orientation) if type(orientation) is int else None
    return image if turn is None else image.transpose(turn)


# What each EXIF orientation asks, as Pillow's `exif_transpose` does it.
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _mime_of(fmt: str) -> str:
    Image.init()
    fmt = "JPEG" if fmt.upper() in _JPEG_FAMILY else fmt.upper()
    return Image.MIME.get(fmt, f"image/{fmt.lower()}")


def _format_list(formats: tuple[str, ...]) -> str:
    return ", ".join(formats)
