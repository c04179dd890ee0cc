"""A user's own model for the training tests: its folder (module, weights, labels, pictures)
made once, and exported into the test store by the project's own command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_store import training_cli
from tests.training.own_model import make_model_folder

OWN_MODEL_TAG = "colours-own:v1"


@pytest.fixture(scope="session")
def own_model(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("own-model"))


def export_own(folder: Path, home: Path, tag: str, weights: Path | None = None):  # noqa: ANN201
    name, version = tag.split(":")
    return training_cli(
        "export-torch", "--module", str(folder / "my_model.py"), "--factory", "build",
        "--weights", str(weights or folder / "weights.pt"), "--labels", str(folder / "labels.txt"),
        "--name", name, "--version", version, "--input-size", "32", "32", "--color-mode", "RGB",
        "--mean", "0.5", "--std", "0.5", home=home,
    )  # fmt: skip


@pytest.fixture(scope="session")
def own_tag(own_model: Path, bentoml_home: Path) -> str:
    """The doc's model exported by `export-torch` (no saved evaluation: its card has no
    baseline of its own)."""
    result = export_own(own_model, bentoml_home, OWN_MODEL_TAG)
    assert result.returncode == 0, result.stdout + result.stderr
    return OWN_MODEL_TAG
