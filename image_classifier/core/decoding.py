"""Bytes from a client to an upright Pillow image, or a `ClassifierError` with a stable code.

Order matters for safety: the format is identified from the bytes against an allow-list, the pixel
count is checked from the header, and only then is pixel data decoded. Truncated data is refused,
never padded (Pillow's LOAD_TRUNCATED_IMAGES stays off).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pillow_heif
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import ClassifierError, ErrorCode

log = logging.getLogger(__name__)
# HEIC/HEIF is what phone cameras save by default; Pillow reads it through libheif's plugin.
pillow_heif.register_heif_opener()
# MPO is a JPEG with extra frames (phone portraits, stereo cameras): Pillow names it MPO, but it is
# sent, and decoded, as a JPEG.
_JPEG_FAMILY = {"JPEG", "MPO"}
# JPEG modes the decoder can scale down while decoding (CMYK too: print-ready photos, which
# otherwise cost 4 bytes a pixel at full size).
_DRAFT_MODES = ("L", "RGB", "CMYK")

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
    if not data:
        raise ClassifierError(ErrorCode.INVALID_IMAGE, "the file is empty")
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
    if size_hint is not None and image.format in _JPEG_FAMILY and image.mode in _DRAFT_MODES:
        image.draft(image.mode, size_hint)
    try:
        image.load()
    except Exception as exc:  # any failure while decoding hostile bytes is the data's fault
        log.debug("decode failed: %r", exc)
        raise ClassifierError(
            ErrorCode.INVALID_IMAGE, "the image data is truncated or corrupt"
        ) from None
    return _upright(image)


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
        raise ClassifierError(ErrorCode.INVALID_IMAGE, "the image header is corrupt") from None


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
    """Apply EXIF orientation; a broken EXIF block leaves the picture as stored.

    Pillow's `exif_transpose` copies an upright picture whole (30 ms for a 12-megapixel photo),
    so it is only called for a picture that needs turning."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except Exception as exc:
        log.debug("EXIF orientation ignored: %r", exc)
        return image


def _mime_of(fmt: str) -> str:
    Image.init()
    fmt = "JPEG" if fmt.upper() in _JPEG_FAMILY else fmt.upper()
    return Image.MIME.get(fmt, f"image/{fmt.lower()}")


def _format_list(formats: tuple[str, ...]) -> str:
    return ", ".join(formats)
