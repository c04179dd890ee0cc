"""A user's own model, as docs/your-model.md describes it: the module file taken from the doc,
weights trained here in seconds, labelled and unlabelled picture folders with the awkward things
real folders hold (label names with spaces, odd sizes, RGBA and grey pictures, nested files that
are not pictures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loadtest.servers import REPO

DOC = REPO / "docs" / "your-model.md"
LABELS = ["red things", "green things", "blue things"]
COLOURS = [(200, 40, 40), (40, 170, 60), (40, 70, 200)]
TRAIN_SEEDS = range(0, 60)
LABELLED_SEEDS = range(1000, 1060)
UNLABELLED_SEEDS = range(2000, 2048)


def doc_block(marker: str) -> str:
    """The fenced block right after `<!-- your-model: MARKER -->` in the doc."""
    text = DOC.read_text()
    after = text.split(f"<!-- your-model: {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def colour_picture(label: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A blob of the label's colour on a noisy grey background, at an odd size."""
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(23, 141)), int(rng.integers(23, 141))
    noise = rng.integers(90, 170, size=(height, width, 1)) + rng.integers(
        -20, 20, (height, width, 3)
    )
    picture = Image.fromarray(np.uint8(np.clip(noise, 0, 255)))
    colour = tuple(int(v + rng.integers(-30, 30)) for v in COLOURS[label])
    ImageDraw.Draw(picture).ellipse([width * 0.1, height * 0.1, width * 0.9, height * 0.9], colour)
    if mode == "RGBA":  # a transparent margin: served pictures are composited over white
        alpha = Image.new("L", picture.size, 0)
        ImageDraw.Draw(alpha).rectangle([2, 2, width - 3, height - 3], fill=255)
        picture.putalpha(alpha)
    return picture.convert(mode) if mode != picture.mode else picture


def write_pictures(root: Path) -> None:
    """root/labelled/<label>/ and root/unlabelled/, with the odd cases of real folders."""
    for seed in LABELLED_SEEDS:
        label = seed % len(LABELS)
        folder = root / "labelled" / LABELS[label] / ("more" if seed % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        mode, kind = ("RGBA", "png") if seed % 7 == 0 else ("RGB", "jpg" if seed % 2 else "png")
        picture = colour_picture(label, seed, mode)
        picture.save(folder / f"{LABELS[label].split()[0]}-{seed - 1000}.{kind}", quality=92)
    (root / "labelled" / LABELS[2] / "more" / "notes.txt").write_text("not a picture")
    unlabelled = root / "unlabelled"
    unlabelled.mkdir(parents=True, exist_ok=True)
    for seed in UNLABELLED_SEEDS:
        mode = "L" if seed % 6 == 0 else "RGB"
        colour_picture(seed % len(LABELS), seed, mode).save(unlabelled / f"{seed}.jpg")


def train_weights(module_file: Path, target: Path, steps: int = 150, seed: int = 0) -> Path:
    """Train the doc's module on pictures through the service's preprocess; save a state dict.

    Label smoothing keeps top-1 confidence below 1, as in real models, so the drift baseline
    means something."""
    import importlib.util

    import torch

    from image_classifier.core.preprocessing import PreprocessSpec, preprocess

    spec = PreprocessSpec(input_size=(32, 32), color_mode="RGB", mean=(0.5,), std=(0.5,))
    loaded = importlib.util.spec_from_file_location("doc_module", module_file)
    code = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(code)
    torch.manual_seed(seed)
    module = code.build()
    inputs = torch.from_numpy(
        np.stack([preprocess(colour_picture(s % 3, s), spec) for s in TRAIN_SEEDS])
    )
    truth = torch.tensor([s % 3 for s in TRAIN_SEEDS])
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(inputs), truth, label_smoothing=0.1)
        loss.backward()
        optimiser.step()
    torch.save(module.state_dict(), target)
    return target


def make_model_folder(root: Path, steps: int = 150) -> Path:
    """root/my-model/ laid out as the doc says: module, weights, labels, pictures."""
    folder = root / "my-model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_model.py").write_text(doc_block("my_model.py"))
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    write_pictures(folder / "pictures")
    train_weights(folder / "my_model.py", folder / "weights.pt", steps=steps)
    return folder
