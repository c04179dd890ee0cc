"""Decoding client bytes: allowed formats, header-first size checks, orientation, hostile files."""

from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

from image_classifier.core.decoding import (
    DecodeLimits,
    PixelBudget,
    check_declared_type,
    decode_image,
    load_image,
    open_image,
)
from image_classifier.core.errors import ClassifierError, ErrorCode
from image_classifier.core.header_walk import BASE_STEPS, step_budget
from tests.pictures import EXIF_STORED_AS, chunk, encode, png_claiming, with_header_parts

LIMITS = DecodeLimits()


def picture(size=(64, 48), mode="RGB") -> Image.Image:
    """Asymmetric content: a white block in the top-left corner of a dark picture."""
    image = Image.new("RGB", size, (20, 20, 20))
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 3, size[1] // 3), fill=(250, 250, 250))
    return image.convert(mode)


def code_of(data: bytes, declared: str | None = None, limits: DecodeLimits = LIMITS) -> ErrorCode:
    with pytest.raises(ClassifierError) as caught:
        decode_image(data, limits, declared)
    return caught.value.code


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "L", {}),
        ("PNG", "LA", {}),
        ("PNG", "1", {}),
        ("PNG", "P", {"transparency": 0}),
        ("JPEG", "RGB", {"quality": 90}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("WEBP", "RGB", {"lossless": True}),
        ("WEBP", "RGBA", {}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("HEIF", "RGB", {"quality": 90}),
        ("AVIF", "RGB", {"quality": 90}),
        ("MPO", "RGB", {}),
    ],
)
def test_allowed_formats_and_modes_decode(fmt, mode, options):
    image = decode_image(encode(picture(mode=mode), fmt, **options), LIMITS)
    assert image.size == (64, 48)


def test_sixteen_bit_png_decodes():
    data = encode(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)), "PNG")
    assert decode_image(data, LIMITS).size == (30, 20)


@pytest.mark.parametrize(
    "data",
    [
        b"<svg xmlns='http://www.w3.org/2000/svg'></svg>",
        b"<!doctype html><html><body>hi</body></html>",
        b"just some text",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
        b"\x7fELF\x02\x01\x01" + b"\x00" * 60,
        b"MZ\x90\x00" + b"\x00" * 60,
        b"PK\x03\x04" + b"\x00" * 60,
    ],
)
def test_non_images_are_unsupported_media(data):
    assert code_of(data) is ErrorCode.UNSUPPORTED_MEDIA_TYPE


def test_formats_outside_the_allow_list_are_refused():
    only_png = DecodeLimits(allowed_formats=("PNG",))
    assert code_of(encode(picture(), "JPEG"), limits=only_png) is ErrorCode.UNSUPPORTED_MEDIA_TYPE


def test_empty_and_truncated_files_are_invalid_images():
    assert code_of(b"") is ErrorCode.INVALID_IMAGE
    for fmt in ("PNG", "JPEG"):
        data = encode(picture((400, 300)), fmt)
        assert code_of(data[: len(data) // 2]) is ErrorCode.INVALID_IMAGE


def test_decompression_bomb_refused_from_the_header_quickly():
    for width, height in [(50_000, 50_000), (8_000, 7_000)]:
        data = png_claiming(width, height)
        assert len(data) < 1024
        started = time.perf_counter()
        assert code_of(data) is ErrorCode.IMAGE_TOO_LARGE
        assert time.perf_counter() - started < 0.1


def test_declared_type_must_match_the_bytes():
    png = encode(picture(), "PNG")
    assert code_of(png, "image/jpeg") is ErrorCode.UNSUPPORTED_MEDIA_TYPE
    assert decode_image(png, LIMITS, "image/png").size == (64, 48)
    assert decode_image(png, LIMITS, "application/octet-stream").size == (64, 48)
    assert decode_image(encode(picture(), "JPEG"), LIMITS, "image/jpg").size == (64, 48)
    assert decode_image(png, LIMITS, "image/apng").size == (64, 48)  # a browser's .apng
    assert decode_image(png, LIMITS, "image/vnd.mozilla.apng").size == (64, 48)
    assert code_of(png, "image/x-citrix-jpeg") is ErrorCode.UNSUPPORTED_MEDIA_TYPE  # an alias
    assert (
        code_of(encode(picture(), "JPEG"), "image/x-whatever") is ErrorCode.UNSUPPORTED_MEDIA_TYPE
    )


def test_declared_non_image_types_are_refused_early():
    with pytest.raises(ClassifierError) as caught:
        check_declared_type("text/html", LIMITS.allowed_formats)
    assert caught.value.code is ErrorCode.UNSUPPORTED_MEDIA_TYPE
    check_declared_type("image/png; charset=binary", LIMITS.allowed_formats)
    check_declared_type(None, LIMITS.allowed_formats)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    upright = picture((120, 80))
    stored = upright
    for op in EXIF_STORED_AS[orientation]:
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(stored, "JPEG", quality=95, exif=exif), LIMITS)
    assert decoded.size == upright.size
    values = np.asarray(decoded.convert("L"), dtype=float)
    assert values[:20, :30].mean() > 200  # the white block is back in the top-left corner
    assert values[-20:, -30:].mean() < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_as_pillows_exif_transpose_does(orientation):
    stored = picture((120, 80))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decode_image(data, LIMITS).convert("RGB")), expected)


def test_an_orientation_tag_of_a_million_values_costs_its_bytes_not_hundreds_of_mib():
    """A 32x32 PNG whose eXIf orientation held 4 million values (and an EXIF IFD pointing back
    at the first): Pillow's exif_transpose rewrote it all in Python, 3 s and 600 MiB an image
    (a review). Not one value of 1..8: the picture as stored."""
    entries = 1_000_000
    exif = (
        b"MM\0*\0\0\0\x08" + struct.pack(">H", 2)
        + struct.pack(">HHII", 0x112, 3, entries, 8) + struct.pack(">HHII", 0x8769, 4, 1, 8)
        + b"\0" * (2 * entries)
    )  # fmt: skip
    data = encode(picture((32, 32)), "PNG")
    data = data[:-12] + chunk(b"eXIf", exif) + data[-12:]  # before IEND
    tracemalloc.start()
    try:
        decoded = decode_image(data, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.size == (32, 32)
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB for a 2 MB EXIF block"


def test_broken_exif_is_ignored():
    data = encode(picture(), "JPEG")
    broken_app1 = (
        b"\xff\xe1" + struct.pack(">H", 20) + b"Exif\x00\x00II*\x00\xff\xff\xff\xff\x00\x00"
    )
    data = data[:2] + broken_app1 + data[2:]
    assert decode_image(data, LIMITS).size == (64, 48)


def test_huge_icc_profile_and_appended_zip_are_harmless():
    with_icc = encode(picture(), "JPEG", icc_profile=b"\x00" * 2_000_000)
    assert decode_image(with_icc, LIMITS).size == (64, 48)
    polyglot = encode(picture(), "JPEG") + b"PK\x03\x04" + b"\x00" * 500
    assert decode_image(polyglot, LIMITS).size == (64, 48)


def test_a_png_with_metadata_that_inflates_past_a_megabyte_decodes():
    """A colour profile or an XMP packet (Photoshop's grows with its history) is compressed in a
    PNG; Pillow refused any that inflates past 1 MB, and the service called the file corrupt."""
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", "x" * 3_000_000, zip=True)
    for options in ({"icc_profile": b"\x00" * 3_000_000}, {"pnginfo": xmp}):
        assert decode_image(encode(picture(), "PNG", **options), LIMITS).size == (64, 48)


def test_a_png_whose_metadata_inflates_past_the_cap_is_told_so_not_called_corrupt():
    """Past PngImagePlugin.MAX_TEXT_CHUNK (16 MiB here) Pillow stops: the file is refused, with
    what to change; "the image header is corrupt" sent users looking for a broken file."""
    png = encode(picture(), "PNG")
    text = chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (20 * 2**20)))
    for before in (b"IDAT", b"IEND"):  # read with the header, or after the pixels
        at = png.index(before) - 4  # the chunk's length field
        with pytest.raises(ClassifierError) as refused:
            decode_image(png[:at] + text + png[at:], LIMITS)
        assert refused.value.code == ErrorCode.INVALID_IMAGE
        assert "inflates past the decoder's limit" in refused.value.message, before


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("L", (20, 20), value) for value in (255, 0, 0)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert decode_image(data, LIMITS).convert("L").getpixel((10, 10)) == 255


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])  # CMYK: print-ready photos
def test_big_jpeg_is_draft_decoded_but_not_below_the_hint(mode):
    photo = Image.effect_noise((4000, 3000), 60).convert(mode)
    image = decode_image(encode(photo, "JPEG", quality=85), LIMITS, size_hint=(448, 448))
    assert 448 <= image.width < 4000 and image.mode == mode
    assert image.height >= 448


@pytest.mark.parametrize(
    ("fmt", "declared", "options"),
    [
        ("HEIF", "image/heic", {}),  # what an iPhone sends
        ("HEIF", "image/heif", {}),
        ("AVIF", "image/avif", {}),
        # A phone JPEG with a second (depth or preview) picture is MPO to Pillow: still a JPEG.
        ("MPO", "image/jpeg", {"save_all": True, "append_images": [Image.new("RGB", (8, 8))]}),
    ],
)
def test_phone_formats_keep_their_usual_declared_types(fmt, declared, options):
    image = decode_image(encode(picture(), fmt, **options), LIMITS, declared)
    assert image.size == (64, 48)


def test_a_big_mpo_photo_is_draft_decoded_like_a_jpeg():
    photo = Image.effect_noise((4000, 3000), 60).convert("RGB")
    data = encode(photo, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    image = decode_image(data, LIMITS, "image/jpeg", size_hint=(448, 448))
    assert 448 <= image.width < 4000


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("WEBP", {"lossless": True}), ("AVIF", {}), ("JPEG", {"progressive": True})],
)
def test_formats_whose_decoder_takes_more_memory_get_a_lower_pixel_cap(fmt, options):
    # A 2 KB lossless WebP of 7000x7000 took 750 MB to decode, 4 times a PNG of the same size.
    limits = DecodeLimits(max_pixels=1_000_000)
    small = encode(Image.new("RGB", (400, 400), (200, 100, 50)), fmt, **options)
    assert decode_image(small, limits).size == (400, 400)  # 160,000 pixels: within any cap
    big = encode(Image.new("RGB", (900, 900), (200, 100, 50)), fmt, **options)
    with pytest.raises(ClassifierError, match=f"in {fmt}|progressive") as caught:
        decode_image(big, limits)  # 810,000 pixels: within the cap, over the format's
    assert caught.value.code is ErrorCode.IMAGE_TOO_LARGE
    assert decode_image(encode(Image.new("RGB", (900, 900)), "PNG"), limits).size == (900, 900)


def refused_before_pillow_opens(data: bytes, monkeypatch) -> ClassifierError:
    opened, pillow_open = [], Image.open

    def counted_open(*args, **kwargs):
        opened.append(True)
        return pillow_open(*args, **kwargs)

    with monkeypatch.context() as patched, pytest.raises(ClassifierError) as caught:
        patched.setattr(Image, "open", counted_open)
        decode_image(data, LIMITS)
    assert not opened, "Pillow was asked to parse the file"
    return caught.value


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF"])
def test_headers_packed_with_parts_are_refused_before_pillow_parses_them(fmt, monkeypatch):
    """Pillow parses these parts one Python loop turn at a time (10 MB of them took up to 6.5
    CPU-seconds); one part per KiB beyond the first thousand is plenty for real files."""
    assert decode_image(with_header_parts(fmt, BASE_STEPS - 50), LIMITS).size[0] == 32
    flood = with_header_parts(fmt, 200_000)
    assert len(flood) // 1024 + BASE_STEPS < 200_000  # over budget whatever the part's size
    error = refused_before_pillow_opens(flood, monkeypatch)
    assert error.code is ErrorCode.INVALID_IMAGE
    assert f"more than {step_budget(len(flood)):,}" in str(error)


@pytest.mark.parametrize(
    ("filler", "described"), [(b"\xff", "fill bytes"), (b"\x00", "stray bytes")]
)
def test_jpeg_fill_and_stray_bytes_count_one_step_each(filler, described, monkeypatch):
    """Pillow skips both one byte per loop turn; a few of them are allowed."""
    data = encode(picture(), "JPEG")
    after_first_segment = 4 + int.from_bytes(data[4:6], "big")
    head, tail = data[:after_first_segment], data[after_first_segment:]
    assert decode_image(head + filler * 100 + tail, LIMITS).size == (64, 48)
    flood = head + filler * 300_000 + tail
    assert refused_before_pillow_opens(flood, monkeypatch).code is ErrorCode.INVALID_IMAGE


def split_idat(data: bytes, size: int) -> bytes:
    """The same PNG with its compressed pixels re-cut into IDAT chunks of `size` bytes."""
    pos, before, pixels = 8, b"", b""
    while True:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            pixels += body
        elif kind != b"IEND":
            before += data[pos : pos + 12 + length]
        else:
            break
        pos += 12 + length
    cut = b"".join(chunk(b"IDAT", pixels[i : i + size]) for i in range(0, len(pixels), size))
    return data[:8] + before + cut + chunk(b"IEND", b"")


def test_png_pixels_in_many_small_chunks_count_each_chunk(monkeypatch):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600), np.uint8))
    png = encode(noise, "PNG")
    assert decode_image(split_idat(png, 8192), LIMITS).size == (600, 600)  # libpng's usual cut
    assert decode_image(split_idat(png, 1024), LIMITS).size == (600, 600)
    error = refused_before_pillow_opens(split_idat(png, 64), monkeypatch)
    assert error.code is ErrorCode.INVALID_IMAGE


def test_a_long_animated_png_counts_its_first_frame_only():
    """Pillow reads an animated PNG's chunks up to the second frame (a sticker of many small
    frames is a real file, not a flood)."""
    frames = [Image.new("RGB", (8, 8), (i % 256, i // 256, 0)) for i in range(1_500)]
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert apng.count(b"fdAT") >= 1_400 and len(apng) // 1024 + BASE_STEPS < 1_400
    assert decode_image(apng, LIMITS).getpixel((0, 0)) == (0, 0, 0)


def test_compressed_and_big_tiffs_count_their_strips_only_when_uncompressed(monkeypatch):
    """libtiff reads compressed strips in C; Pillow makes a Python tile of each raw one."""
    tall = Image.new("L", (32, 40_000), 128)
    for options in ({"compression": "tiff_deflate"}, {"compression": "packbits"}):
        assert decode_image(encode(tall, "TIFF", tiffinfo={278: 1}, **options), LIMITS)
    raw_big_tiff = encode(tall, "TIFF", tiffinfo={278: 1}, big_tiff=True)
    assert refused_before_pillow_opens(raw_big_tiff, monkeypatch).code is ErrorCode.INVALID_IMAGE
    assert decode_image(encode(tall, "TIFF", tiffinfo={278: 64}, big_tiff=True), LIMITS)


@pytest.mark.parametrize(
    ("photo", "options", "hint", "expected"),
    [
        # Baseline JPEG: counted at the size the decoder scales it down to (4000x3000 -> 1/4).
        (Image.new("RGB", (4000, 3000)), {}, (448, 448), 1000 * 750),
        # Progressive JPEG: a full-size buffer of 2 bytes a component, whatever the scale-down.
        (Image.new("RGB", (4000, 3000)), {"progressive": True}, (448, 448), 4000 * 3000 * 6 // 4),
        (Image.new("RGB", (700, 500)), {}, None, 700 * 500),
    ],
    ids=["baseline-jpeg", "progressive-jpeg", "png"],
)
def test_open_image_says_what_decoding_will_take(photo, options, hint, expected):
    fmt = "PNG" if hint is None else "JPEG"
    image, pixels = open_image(encode(photo, fmt, **options), LIMITS, size_hint=hint)
    assert pixels == expected
    assert load_image(image).size == image.size  # and decodes as decode_image does


def test_webp_counts_its_decoders_bytes():
    _, pixels = open_image(encode(Image.new("RGB", (300, 200)), "WEBP"), LIMITS)
    assert pixels == 300 * 200 * 16 // 4


def holding(budget: PixelBudget, sizes: list[int]) -> int:
    """Hold `sizes` from as many threads at once, each for a moment; the most held together."""
    most, lock = [0], threading.Lock()
    held: list[int] = []

    def work(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                held.append(min(pixels, budget.pixels or pixels))
                most[0] = max(most[0], sum(held))
            time.sleep(0.05)
            with lock:
                held.remove(min(pixels, budget.pixels or pixels))

    threads = [threading.Thread(target=work, args=(size,)) for size in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)  # every picture got its turn
    return most[0]


def test_pixel_budget_lets_big_pictures_in_one_at_a_time_and_small_ones_together():
    assert holding(PixelBudget(100), [60, 60, 60]) == 60  # two would be 120: one at a time
    assert holding(PixelBudget(100), [10] * 8) == 80  # everyday pictures do not wait
    assert holding(PixelBudget(100), [500, 500]) == 100  # over the budget: each goes alone
    assert holding(PixelBudget(0), [60, 60, 60]) == 180  # 0: no bound
