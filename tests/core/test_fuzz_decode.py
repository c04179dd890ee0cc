"""Property tests of the decode path: bytes -> `Classifier.prepare` -> tensor, or a 4xx error.

Whatever the bytes (random, or valid pictures of every allowed format with bytes flipped, cut,
inserted, deleted or overwritten), `prepare` either returns a finite float32 tensor of the
model's input shape, or raises `ClassifierError` with a 4xx status. Nothing else may escape: an
escaping exception is a 500 for the client.

Derandomized (a fixed seed, no example database), so CI runs the same 2,100 examples every time;
each test counts the examples that ran and asserts that all of them did.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms

from image_classifier.core.classifier import Classifier
from image_classifier.core.errors import ClassifierError
from image_classifier.http.envelope import HTTP_STATUS
from tests.figures import measured
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode

MUTATION_EXAMPLES = 1500
RANDOM_EXAMPLES = 600
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Preprocessing specs that exercise every branch: the digits recipe (grey, crop to the ink),
# an RGB centre crop, an RGB letterbox in NHWC.
SPECS = [
    {"input_size": (28, 28), "color_mode": "L", "content_crop": True,
     "mean": (0.5,), "std": (0.5,)},
    {"input_size": (32, 32), "color_mode": "RGB", "resize_mode": "center_crop",
     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    {"input_size": (16, 24), "color_mode": "RGB", "resize_mode": "letterbox", "layout": "NHWC"},
]  # fmt: skip

# Mostly no declared type (two times in three), so that most mutants reach the decoder.
DECLARED = [None, "", "application/octet-stream", "image/png", "image/jpeg", "image/gif",
            "image/webp", "image/bmp", "image/tiff", "image/jpg", "text/html"]  # fmt: skip
declared_types = st.one_of(st.none(), st.none(), st.sampled_from(DECLARED))

MAGICS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"GIF89a",
          b"GIF87a", b"RIFF\x00\x01\x00\x00WEBPVP8 ", b"RIFF\x00\x01\x00\x00WEBPVP8L", b"BM",
          b"II*\x00", b"MM\x00*"]  # fmt: skip


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> list[Classifier]:
    return [
        Classifier(build_onnx_classifier(tmp_path_factory.mktemp(f"spec{i}"), **spec))
        for i, spec in enumerate(SPECS)
    ]


def _picture(size=(24, 18)) -> Image.Image:
    """A small picture with structure (a dark block on noise), so decoders have work to do."""
    image = Image.effect_noise(size, 60).convert("RGB")
    image.paste((10, 20, 200), (4, 3, 14, 12))
    return image


def _lab(image: Image.Image) -> Image.Image:
    to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    return ImageCms.applyTransform(image, to_lab)


def _seeds() -> dict[str, bytes]:
    rgb = _picture()
    grey = rgb.convert("L")
    sixteen = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)
    floats = Image.fromarray(np.asarray(grey, dtype=np.float32) / 255.0, mode="F")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [rgb, rgb.rotate(90), grey.convert("RGB")]
    return {
        "png-rgb": encode(rgb, "PNG"),
        "png-l": encode(grey, "PNG"),
        "png-rgba": encode(rgb.convert("RGBA"), "PNG"),
        "png-la": encode(grey.convert("LA"), "PNG"),
        "png-p-trns": encode(rgb.quantize(8), "PNG", transparency=0),
        "png-1": encode(grey.convert("1"), "PNG"),
        "png-i16": encode(sixteen, "PNG"),
        "jpeg-rgb": encode(rgb, "JPEG", quality=80),
        "jpeg-l": encode(grey, "JPEG"),
        "jpeg-cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg-progressive-exif": encode(rgb, "JPEG", progressive=True, exif=exif),
        "gif": encode(rgb.convert("P"), "GIF"),
        "gif-animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp-lossy": encode(rgb, "WEBP", quality=60),
        "webp-lossless-rgba": encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "bmp-rgb": encode(rgb, "BMP"),
        "bmp-p": encode(rgb.convert("P"), "BMP"),
        "bmp-1": encode(grey.convert("1"), "BMP"),
        "tiff-rgb": encode(rgb, "TIFF"),
        "tiff-deflate": encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-lzw-cmyk": encode(rgb.convert("CMYK"), "TIFF", compression="tiff_lzw"),
        "tiff-packbits-l": encode(grey, "TIFF", compression="packbits"),
        "tiff-i16": encode(sixteen, "TIFF"),
        "tiff-f": encode(floats, "TIFF"),
        "tiff-lab": encode(_lab(rgb), "TIFF"),
        "tiff-ycbcr": encode(rgb.convert("YCbCr"), "TIFF"),
    }


SEEDS = _seeds()


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC, so mutations reach the decoder instead of the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, offset = bytearray(data[:8]), 8
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        end = offset + 8 + length
        if end + 4 > len(data):
            out += data[offset:]
            break
        kind_and_body = data[offset + 4 : end]
        out += data[offset:end] + struct.pack(">I", zlib.crc32(kind_and_body))
        offset = end + 4
    return bytes(out)


position = st.one_of(st.integers(0, 64), st.integers(0, 1 << 16))
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), position, st.integers(1, 64)),
    st.tuples(
        st.just("overwrite"),
        position,
        st.sampled_from(
            [
                b"\x00",
                b"\xff",
                b"\x7f\xff",
                b"\xff\xff\xff\xff",
                b"\x00\x00\x00\x00",
                b"\x00\x01",
                b"\x80\x00\x00\x00",
            ]
        ),  # fmt: skip
    ),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buffer = bytearray(data)
    for kind, where, *arg in mutations:
        at = where % (len(buffer) + 1)
        if kind == "flip" and at < len(buffer):
            buffer[at] ^= arg[0]
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = arg[0]
        elif kind == "delete":
            del buffer[at : at + arg[0]]
        elif kind == "overwrite":
            buffer[at : at + len(arg[0])] = arg[0]
    return bytes(buffer)


def check_prepare(classifier: Classifier, data: bytes, declared: str | None) -> str:
    """The property. Returns the outcome (a code, or "ok") for the statistics."""
    try:
        tensor = classifier.prepare(data, declared)
    except ClassifierError as exc:
        assert 400 <= HTTP_STATUS[exc.code] < 500, (exc.code, exc.message)
        return exc.code.value
    assert isinstance(tensor, np.ndarray)
    assert tensor.dtype == np.float32
    assert tensor.shape == classifier.card.preprocessing.tensor_shape
    assert np.isfinite(tensor).all()
    return "ok"


def test_every_seed_is_a_valid_picture(classifiers):
    """The seeds decode untouched (so the fuzzing below starts from real pictures)."""
    for name, data in SEEDS.items():
        for classifier in classifiers:
            assert check_prepare(classifier, data, None) == "ok", name
    assert fix_png_crcs(SEEDS["png-rgb"]) == SEEDS["png-rgb"]


def fuzz(prop: Callable[..., str], max_examples: int, **strategies) -> list[str]:
    """Runs `prop` over `max_examples` generated examples and returns what each one gave. The
    inputs are unbounded and nothing filters them out, so Hypothesis runs every one: the tests
    assert so, since fewer would mean the fuzzing silently shrank."""
    outcomes: list[str] = []

    @settings(FUZZ, max_examples=max_examples)
    @given(**strategies)
    def each(**example):
        outcome = prop(**example)
        event(outcome)
        outcomes.append(outcome)

    each()
    return outcomes


def assert_all_ran(name: str, outcomes: list[str], minimum: int) -> None:
    counts = {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}
    measured(f"decode fuzzing, {name}: {len(outcomes)} examples ran, outcomes {counts}")
    assert len(outcomes) >= minimum, (name, len(outcomes))


def test_mutated_pictures_decode_or_fail_with_4xx(classifiers):
    def prop(seed, mutations, recrc, declared, which):
        data = mutate(SEEDS[seed], mutations)
        if recrc:
            data = fix_png_crcs(data)
        return check_prepare(classifiers[which], data, declared)

    outcomes = fuzz(
        prop,
        MUTATION_EXAMPLES,
        seed=st.sampled_from(sorted(SEEDS)),
        mutations=st.lists(mutation, min_size=1, max_size=4),
        recrc=st.booleans(),
        declared=declared_types,
        which=st.integers(0, len(SPECS) - 1),
    )
    assert_all_ran("mutated pictures", outcomes, MUTATION_EXAMPLES)


def test_random_bytes_decode_or_fail_with_4xx(classifiers):
    def prop(magic, body, declared, which):
        return check_prepare(classifiers[which], magic + body, declared)

    outcomes = fuzz(
        prop,
        RANDOM_EXAMPLES,
        magic=st.sampled_from(MAGICS),
        body=st.binary(max_size=4096),
        declared=declared_types,
        which=st.integers(0, len(SPECS) - 1),
    )
    assert_all_ran("random bytes", outcomes, RANDOM_EXAMPLES)
