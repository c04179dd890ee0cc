"""The one preprocessing function that training and serving share."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from image_classifier.core import preprocessing
from image_classifier.core.preprocessing import (
    IMAGENET_SPEC,
    PreprocessSpec,
    crop_to_content,
    preprocess,
    to_color_mode,
)
from tests.figures import measured

REPO = Path(__file__).resolve().parents[2]

DIGITS = PreprocessSpec(
    input_size=(28, 28), color_mode="L", content_crop=True, mean=(0.5,), std=(0.5,)
)


def stroke(canvas=(200, 200), box=(80, 40, 110, 160), ink=0, paper=255, mode="L") -> Image.Image:
    """A dark bar (a '1') on light paper, anywhere on a canvas of any size."""
    image = Image.new(mode, canvas, paper)
    ImageDraw.Draw(image).rectangle(box, fill=ink)
    return image


def test_output_shape_dtype_and_range():
    tensor = preprocess(stroke(), DIGITS)
    assert tensor.shape == (1, 28, 28)
    assert tensor.dtype == np.float32
    assert tensor.min() == pytest.approx(-1.0)  # ink: 0 -> (0 - 0.5) / 0.5
    assert tensor.max() == pytest.approx(1.0)  # paper: 255 -> 1


def test_margins_do_not_change_what_the_model_sees():
    small_margin = stroke(canvas=(60, 140), box=(15, 10, 45, 130))
    huge_margin = stroke(canvas=(900, 700), box=(415, 290, 445, 410))
    a, b = preprocess(small_margin, DIGITS), preprocess(huge_margin, DIGITS)
    assert np.abs(a - b).mean() < 0.05


def test_light_ink_on_dark_paper_is_flipped_to_dark_on_light():
    dark_on_light = preprocess(stroke(ink=0, paper=255), DIGITS)
    light_on_dark = preprocess(stroke(ink=255, paper=0), DIGITS)
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1e-6)


@pytest.mark.parametrize("paper", [130, 127, 110, 60])  # 3 grey levels apart at mid-grey
def test_dark_ink_on_dim_paper_is_read_as_dark_ink(paper):
    """A dim photo of pen on paper: the ink is darker than the page, whichever side of mid-grey
    the page is. A page darker than 128 had the picture inverted, and the digit read as no ink
    at all: the model saw the whole page, and a 7 on a 127 page was answered 1 (a review's)."""
    on_white = crop_to_content(stroke(ink=165, paper=255), 0.15)
    on_dim_paper = crop_to_content(stroke(ink=paper - 90, paper=paper), 0.15)
    assert on_dim_paper.size == on_white.size != (200, 200)
    width, height = on_dim_paper.size
    edge, middle = on_dim_paper.getpixel((0, 0)), on_dim_paper.getpixel((width // 2, height // 2))
    assert edge > middle, (edge, middle)  # dark ink on lighter paper, as the model learnt it


def test_blank_picture_is_kept_whole():
    blank = Image.new("L", (50, 80), 255)
    assert crop_to_content(blank, 0.15).size == (50, 80)
    assert np.allclose(preprocess(blank, DIGITS), 1.0)


def test_specks_do_not_stretch_the_crop():
    clean = stroke()
    specked = clean.copy()
    specked.putpixel((3, 3), 0)  # one dust pixel far from the digit
    a, b = preprocess(clean, DIGITS), preprocess(specked, DIGITS)
    assert np.abs(a - b).mean() < 0.05


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"]
)
def test_every_mode_becomes_the_model_mode(mode):
    source = stroke(mode="RGB", ink=(0, 0, 0), paper=(255, 255, 255))
    if mode in ("I", "I;16", "F"):
        image = Image.fromarray(
            (np.asarray(source.convert("L"), dtype=np.float32) * 257).astype(
                {"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode]
            ),
        )
        if mode == "I;16":
            assert image.mode == "I;16"
    else:
        image = source.convert(mode)
    for spec in (DIGITS, IMAGENET_SPEC):
        tensor = preprocess(image, spec)
        assert tensor.shape == spec.tensor_shape
        assert np.isfinite(tensor).all()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    mid_grey = Image.fromarray(np.full((10, 10), 32768, dtype=np.uint16))
    assert mid_grey.mode == "I;16"
    assert to_color_mode(mid_grey, "L").getpixel((0, 0)) == 128  # clipping would give 255


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [((0, 1000), np.float32, (0, 255)), ((0, 500, 1000), np.float32, (0, 128, 255)),
     ((0, 2_000_000_000), np.int32, (0, 255)), ((0, 65535), np.int32, (0, 255)),
     ((0, 200), np.float32, (0, 200))],
    ids=["float-to-1000", "float-mid", "int32-full", "int32-16-bit-data", "float-8-bit-range"],
)  # fmt: skip
def test_greys_past_a_type_range_are_scaled_by_their_peak_not_clipped_to_white(
    values, dtype, expected
):
    """A float TIFF of 0..1000 or an int32 one of 0..2e9 was clipped: nearly all white, and a
    confident wrong label (found by a black-box review)."""
    picture = Image.fromarray(np.array([values], dtype=dtype))
    assert picture.mode in ("I", "F")
    assert np.asarray(to_color_mode(picture, "L")).tolist() == [list(expected)]


def test_float_nan_and_infinity_become_the_ends_of_the_range():
    values = np.array([[np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32)
    grey = np.asarray(to_color_mode(Image.fromarray(values, mode="F"), "L"))
    assert grey.tolist() == [[0, 255, 0, 128]]  # the finite peak (0.5) is <= 1: scaled by 255


def test_sixteen_bit_conversion_memory_stays_near_the_picture_size():
    """A 16-bit PNG of ~100 KB can declare 50 MP: converting it must not cost float64 copies
    of the whole picture (over a gigabyte at that size)."""
    import tracemalloc

    big = Image.fromarray(np.full((2000, 3000), 40000, dtype=np.uint16))
    picture_bytes = 2000 * 3000 * 2
    tracemalloc.start()
    try:
        grey = to_color_mode(big, "L")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grey.getpixel((0, 0)) == round(40000 / 257)
    assert peak < 3 * picture_bytes, peak  # whole-picture float64 arrays: 8x and more


def test_lab_pictures_are_converted_by_colour_not_refused():
    from PIL import ImageCms

    red = Image.new("RGB", (40, 30), (200, 30, 40))
    to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    lab = ImageCms.applyTransform(red, to_lab)
    assert lab.mode == "LAB"
    back = to_color_mode(lab, "RGB").getpixel((5, 5))
    assert all(abs(a - b) <= 3 for a, b in zip(back, (200, 30, 40), strict=True)), back
    for spec in (DIGITS, IMAGENET_SPEC):
        tensor = preprocess(lab, spec)
        assert tensor.shape == spec.tensor_shape
        assert np.isfinite(tensor).all()


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    assert to_color_mode(rgba, "L").getpixel((5, 5)) == 255
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_color_mode(palette, "RGB").getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_a_grey_pngs_transparent_value_is_white_at_any_depth(mode, tmp_path):
    """tRNS names one grey as see-through; a 16-bit PNG's was dropped in rescaling to 8 bits,
    and its background classified as grey (a review's)."""
    grey = np.full((16, 16), 128, dtype=np.uint16)
    grey[4:12, 6:10] = 0  # ink
    scale = 257 if mode == "I;16" else 1
    picture = Image.fromarray((grey * scale).astype(np.uint16 if scale > 1 else np.uint8))
    assert picture.mode == mode
    path = tmp_path / "keyed.png"
    picture.save(path, transparency=128 * scale)
    with Image.open(path) as opened:
        assert opened.info["transparency"] == 128 * scale  # as a PNG decoder gives it
        converted = np.asarray(to_color_mode(opened, "L"))
    assert converted[0, 0] == 255 and converted[8, 8] == 0, converted


def gradient_picture(mode: str, size=(1200, 900)) -> Image.Image:
    """Noisy colours whose alpha rises from 0 at the left edge to 255 at the right, in `mode`."""
    width, height = size
    values = np.random.default_rng(7).integers(0, 256, (height, width, 4), dtype=np.uint8)
    values[..., 3] = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    rgba = Image.fromarray(values, "RGBA")
    if mode == "P+transparency":
        palette = rgba.convert("RGB").quantize(64)
        palette.info["transparency"] = 5
        return palette
    if mode == "I;16":
        return Image.fromarray(values[..., 0].astype(np.uint16) * 200)
    if mode == "F":
        return Image.fromarray(values[..., 0].astype(np.float32) / 300, mode="F")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("tile_pixels", [None, 1000])  # None: as served; 1000: many small tiles
@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P+transparency", "1", "CMYK", "I;16", "F"])
def test_big_pictures_shrink_before_converting_with_the_same_pixels(mode, tile_pixels, monkeypatch):
    """Transparency over white (and every other conversion) is done tile by tile on the way down,
    never on the whole full-resolution picture: the tensor is the one converting first gives."""
    if tile_pixels is not None:
        monkeypatch.setattr(preprocessing, "_TILE_PIXELS", tile_pixels)
    image = gradient_picture(mode)
    assert image.width * image.height > preprocessing._TILE_PIXELS  # the tiled path is taken
    for spec in (IMAGENET_SPEC, DIGITS, DIGITS.model_copy(update={"color_mode": "RGB"})):
        converted_first = preprocess(to_color_mode(image, spec.color_mode), spec)
        np.testing.assert_array_equal(preprocess(image, spec), converted_first)


# Decoding and preprocessing one 7000x7000 transparent PNG of a few hundred KB, in a fresh process.
# The peak resident size is Linux's VmHWM: ru_maxrss would start at the pytest process's own peak
# (Linux carries it over exec into the child), hiding any growth below it.
_MEASURE_RSS = """
import json, resource, sys
from pathlib import Path
from image_classifier.core.decoding import DecodeLimits, decode_image
from image_classifier.core.preprocessing import IMAGENET_SPEC, PreprocessSpec, preprocess

def peak():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit

spec = IMAGENET_SPEC if sys.argv[2] == "imagenet" else PreprocessSpec(
    input_size=(28, 28), color_mode="L", content_crop=True)
data = Path(sys.argv[1]).read_bytes()
before = peak()
image = decode_image(data, DecodeLimits(), None, spec.decode_size_hint)
decoded = peak()
tensor = preprocess(image, spec)
print(json.dumps({"decoded": decoded - before, "total": peak() - before,
                  "mode": image.mode, "shape": list(tensor.shape)}))
"""


@pytest.fixture(scope="session")
def huge_transparent_png(tmp_path_factory):
    """`(mode) -> path`: a 7000x7000 PNG with a half-transparent disc on a transparent ground
    (49 MP, within the 50 MP limit); a few hundred KB, so it passes every byte cap."""
    folder = tmp_path_factory.mktemp("huge-png")
    made: dict[str, Path] = {}

    def make(mode: str) -> Path:
        if mode not in made:
            side = 7000
            disc = (side // 4, side // 4, 3 * side // 4, 3 * side // 4)
            if mode == "P":
                image = Image.new("P", (side, side), 0)
                image.putpalette([255, 255, 255, 200, 30, 40])
                ImageDraw.Draw(image).ellipse(disc, fill=1)
                options = {"transparency": 0}
            else:
                image = Image.new("RGBA", (side, side), (255, 255, 255, 0))
                ImageDraw.Draw(image).ellipse(disc, fill=(200, 30, 40, 160))
                image, options = image.convert(mode), {}
            made[mode] = folder / f"{mode}.png"
            image.save(made[mode], "PNG", **options)
        return made[mode]

    return make


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
@pytest.mark.parametrize(
    ("mode", "spec"), [("RGBA", "imagenet"), ("LA", "digits"), ("P", "imagenet")]
)
def test_huge_transparent_png_is_not_composited_at_full_resolution(
    huge_transparent_png, mode, spec
):
    """Compositing the whole 49 MP picture over white took four more full-size copies: 936 MiB of
    peak RSS for one request. Decoding needs one full-size copy (188 MiB for RGBA); preprocessing
    must add little to it."""
    path = huge_transparent_png(mode)
    assert path.stat().st_size < 1_000_000
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.run(
        [sys.executable, "-c", _MEASURE_RSS, str(path), spec],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    grown = json.loads(child.stdout.splitlines()[-1])
    assert grown["mode"] == mode
    mib = 1 << 20
    decoded, total = grown["decoded"] / mib, grown["total"] / mib
    measured(
        f"7000x7000 {mode} PNG ({path.stat().st_size // 1024} KB) to a {spec} tensor: "
        f"peak RSS +{total:.0f} MiB, of which decoding +{decoded:.0f} MiB"
    )
    assert decoded > 40, (decoded, total)  # the measurement sees the decoded picture (47-188 MiB)
    assert total < 250, (decoded, total)
    assert total - decoded < 64, (decoded, total)  # the whole-picture composite: +748 MiB


@pytest.mark.parametrize("resize_mode", ["stretch", "center_crop", "letterbox"])
@pytest.mark.parametrize("size", [(1, 1), (10000, 1), (1, 3000), (640, 480)])
def test_resize_modes_handle_extreme_shapes(resize_mode, size):
    spec = IMAGENET_SPEC.model_copy(update={"resize_mode": resize_mode})
    tensor = preprocess(Image.new("RGB", size, (10, 200, 30)), spec)
    assert tensor.shape == (3, 224, 224)


@pytest.mark.parametrize("size", [(640, 480), (481, 640), (300, 300), (1000, 333)])
def test_center_crop_gives_the_pixels_of_resizing_then_cropping(size):
    """What torchvision's Resize(256) + CenterCrop(224) give a picture (its resized long side
    truncated, its crop offset rounded), without resizing the whole picture."""
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    short, long = sorted(size)
    resized_long = int(256 * long / short)
    resized = picture.resize(
        (256, resized_long) if size[0] == short else (resized_long, 256), Image.BILINEAR
    )
    left = round((resized.width - 224) / 2)
    top = round((resized.height - 224) / 2)
    expected = preprocess(resized.crop((left, top, left + 224, top + 224)),
                          IMAGENET_SPEC.model_copy(update={"resize_mode": "stretch"}))  # fmt: skip
    difference = np.abs(preprocess(picture, IMAGENET_SPEC) - expected)
    # Pillow rounds each resized pixel to 8 bits: now and then one level apart, never more. A
    # window centred between pixels differed on 98% of a 640x480 noise picture's values, by up
    # to 1.46.
    assert difference.max() <= 1.001 / 255 / min(IMAGENET_SPEC.std)
    assert np.count_nonzero(difference > 1e-5) < difference.size / 100


def test_imagenet_normalisation_and_layout():
    red = Image.new("RGB", (300, 300), (255, 0, 0))
    tensor = preprocess(red, IMAGENET_SPEC)
    assert tensor[0].mean() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    assert tensor[1].mean() == pytest.approx((0 - 0.456) / 0.224, rel=1e-5)
    nhwc = preprocess(red, IMAGENET_SPEC.model_copy(update={"layout": "NHWC"}))
    np.testing.assert_array_equal(nhwc, tensor.transpose(1, 2, 0))


@pytest.mark.parametrize(
    ("mode", "mean", "std", "layout"),
    [("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "NCHW"),
     ("RGB", (0.5,), (0.25, 0.5, 2.0), "NHWC"),
     ("L", (0.1307,), (0.3081,), "NCHW")],
)  # fmt: skip
def test_normalisation_equals_the_arithmetic_on_every_pixel_value(mode, mean, std, layout):
    """The lookup table must give bit for bit what `(pixels * scale - mean) / std` gives."""
    values = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    values.reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]  # every 8-bit value
    picture = Image.fromarray(values).convert(mode)
    spec = PreprocessSpec(input_size=(16, 16), color_mode=mode, resize_mode="stretch",
                          mean=mean, std=std, layout=layout)  # fmt: skip
    pixels = np.asarray(picture, dtype=np.float32).reshape(16, 16, -1)
    expected = (pixels * np.float32(spec.scale) - np.float32(mean)) / np.float32(std)
    if layout == "NCHW":
        expected = expected.transpose(2, 0, 1)
    tensor = preprocess(picture, spec)
    assert tensor.flags.c_contiguous and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, expected)


@pytest.mark.parametrize(
    ("mode", "field", "value", "message"),
    [
        ("RGB", "mean", (0.1, 0.2), "mean must have 1 or 3 values for RGB"),
        ("L", "mean", (0.1, 0.2), "mean must have 1 value for L"),
        ("L", "std", (0.0,), "std values must be non-zero"),
        # Each was accepted: a tensor of NaN, or of all-zero and inverted pixels, classified.
        ("L", "std", (float("nan"),), "finite number"),
        ("RGB", "mean", (0.5, float("inf"), 0.5), "finite number"),
        ("L", "scale", -1.0, "greater than 0"),
        ("L", "scale", 0.0, "greater than 0"),
    ],
)
def test_spec_rejects_inconsistent_values(mode, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PreprocessSpec(input_size=(8, 8), color_mode=mode, **{field: value})


def test_spec_round_trips_through_json():
    assert PreprocessSpec.model_validate_json(DIGITS.model_dump_json()) == DIGITS
