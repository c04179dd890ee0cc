"""`export-torch`: your module and weights to a verified store entry; what cannot be exported
faithfully is refused with one clear line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from image_classifier.core.classifier import Classifier
from image_classifier.core.decoding import DecodeLimits, decode_image
from image_classifier.core.preprocessing import IMAGENET_SPEC, preprocess
from tests.model_store import store_model_dir, training_cli
from tests.training.conftest import export_own

ODD_MODULES = """
import torch
from torch import nn


class Flat(nn.Module):
    def __init__(self, fixed_batch=False, noisy=False, softmax=False, nhwc=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.fixed_batch, self.noisy, self.softmax, self.nhwc = fixed_batch, noisy, softmax, nhwc

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        x = self.conv(x).mean(dim=(2, 3))
        x = x.view(1, -1) if self.fixed_batch else x
        if self.noisy:
            x = x + torch.rand_like(x)
        x = self.head(x)
        return torch.softmax(x, dim=1) if self.softmax else x


def fixed_batch():
    return Flat(fixed_batch=True)


def noisy():
    return Flat(noisy=True)


def nhwc_softmax():
    torch.manual_seed(0)
    return Flat(softmax=True, nhwc=True)


def not_a_module():
    return "a string"
"""


@pytest.fixture(scope="module")
def odd_modules(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("odd") / "odd_modules.py"
    path.write_text(ODD_MODULES)
    return path


def export(home: Path, own_model: Path, module: Path, factory: str, tag: str, *flags: str):
    name, version = tag.split(":")
    return training_cli(
        "export-torch", "--module", str(module), "--factory", factory, "--name", name,
        "--version", version, "--labels", str(own_model / "labels.txt"), *flags, home=home,
    )  # fmt: skip


def test_exported_model_answers_as_torch_does(own_tag, own_model, bentoml_home):
    folder = store_model_dir(bentoml_home, own_tag)
    card = Classifier(folder).card
    parity = card.metrics.model_extra["export_parity"]
    assert card.source == "exported" and card.output_kind == "logits"
    assert 0 <= parity["max_abs_difference"] <= parity["tolerance"] == 1e-3
    batch_axis = onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # dynamic: merged runs work
    loaded = importlib.util.spec_from_file_location("own", own_model / "my_model.py")
    code = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(code)
    module = code.build()
    module.load_state_dict(torch.load(own_model / "weights.pt", weights_only=True))
    pictures = sorted((own_model / "pictures" / "labelled").rglob("*.jpg"))[:6]
    data = [path.read_bytes() for path in pictures]
    images = [decode_image(d, DecodeLimits(), None, card.preprocessing.decode_size_hint)
              for d in data]  # fmt: skip
    tensors = np.stack([preprocess(image, card.preprocessing) for image in images])
    with torch.no_grad():
        expected = torch.softmax(module.eval()(torch.from_numpy(tensors)), dim=1).numpy()
    served = Classifier(folder).run([Classifier(folder).prepare(d) for d in data])
    assert np.abs(served - expected).max() < 1e-4


def test_nhwc_softmax_module_with_the_imagenet_preset(odd_modules, own_model, bentoml_home):
    result = export(bentoml_home, own_model, odd_modules, "nhwc_softmax", "odd-nhwc:v1",
                    "--preset", "imagenet", "--input-size", "48", "48", "--layout", "NHWC",
                    "--images", str(own_model / "pictures" / "unlabelled"))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity with torch on 48 pictures: max abs difference" in result.stdout
    card = Classifier(store_model_dir(bentoml_home, "odd-nhwc:v1")).card
    assert card.output_kind == "probabilities"
    spec = card.preprocessing
    assert (spec.layout, spec.input_size, spec.mean) == ("NHWC", (48, 48), IMAGENET_SPEC.mean)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("fixed_batch", "the module itself fails on a batch of 8"),
        ("noisy", "ONNX Runtime differs from torch by"),
        ("not_a_module", "not_a_module() returned str, not a torch.nn.Module"),
        ("no_such_factory", "has no function or class 'no_such_factory'"),
    ],
)
def test_unfaithful_or_broken_exports_are_refused(
    odd_modules, own_model, bentoml_home, factory, message
):
    tag = f"odd-{factory.replace('_', '-')}:v1"
    result = export(bentoml_home, own_model, odd_modules, factory, tag,
                    "--input-size", "16", "16", "--color-mode", "RGB")  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (bentoml_home / "models" / tag.split(":")[0]).exists()


def test_weights_that_do_not_fit_are_refused_checkpoints_are_understood(
    own_model, bentoml_home, tmp_path
):
    wrong = tmp_path / "wrong.pt"
    torch.save({"head.weight": torch.zeros(2, 2)}, wrong)
    refused = export_own(own_model, bentoml_home, "colours-wrong:v1", weights=wrong)
    assert refused.returncode == 1 and "does not fit the module" in refused.stderr
    state = torch.load(own_model / "weights.pt", weights_only=True)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               checkpoint)  # fmt: skip
    accepted = export_own(own_model, bentoml_home, "colours-checkpoint:v1", weights=checkpoint)
    assert accepted.returncode == 0, accepted.stderr
    ours = store_model_dir(bentoml_home, "colours-checkpoint:v1") / "model.onnx"
    theirs = store_model_dir(bentoml_home, "colours-own:v1") / "model.onnx"
    probe = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    runs = [Classifier(path.parent).run(list(probe)) for path in (ours, theirs)]
    assert np.allclose(*runs, atol=1e-6)
