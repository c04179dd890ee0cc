"""The BentoML model store the tests use: the project's `training_export` CLI and stored models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from loadtest.servers import REPO


def training_cli(
    *args: str, home: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m training_export ARGS` against the model store at `home`."""
    env = {**os.environ, "BENTOML_HOME": str(home), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "training_export", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def import_model(home: Path, model_dir: Path, tag: str) -> Path:
    """A model's files (model.onnx + card.json) saved as `tag`, by the project's import command."""
    name, version = tag.split(":")
    result = training_cli(
        "import-onnx", str(model_dir / "model.onnx"), "--name", name, "--version", version,
        "--config", str(model_dir / "card.json"), home=home,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return store_model_dir(home, tag)


def store_model_dir(bentoml_home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    path = Path(bentoml_home) / "models" / name / version
    assert (path / "card.json").exists(), f"no model at {path}"
    return path
