"""Shared fixtures. The whole run uses one throwaway model store, set before bentoml is imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from image_classifier.serving.settings import DEFAULT_MODEL_TAG
from loadtest.servers import REPO, serve
from tests.figures import FIGURES, write_artifact
from tests.model_store import import_model, store_model_dir

_HOME = Path(tempfile.mkdtemp(prefix="bentoml-test-home-"))
os.environ["BENTOML_HOME"] = str(_HOME)
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
ARTIFACTS = REPO / "test-artifacts"


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured figures")
        for _, line in FIGURES:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)
    if FIGURES:  # for `python -m tests.figures`, which writes them into the docs
        write_artifact()


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def trained_store(bentoml_home: Path) -> Path:
    """The default model, trained and saved by the project's own command (once per run)."""
    result = subprocess.run(
        [sys.executable, "-m", "training_export", "ensure-default"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    store_model_dir(bentoml_home, DEFAULT_MODEL_TAG)
    return bentoml_home


@pytest.fixture(scope="session")
def second_version(trained_store: Path, default_model_dir: Path) -> str:
    """digits-cnn:v2: the default model's files imported again with its own card (same weights),
    through the project's own import command: a second version for rollout tests."""
    tag = "digits-cnn:v2"
    import_model(trained_store, default_model_dir, tag)
    return tag


@pytest.fixture(scope="session")
def default_model_dir(trained_store: Path) -> Path:
    return store_model_dir(trained_store, DEFAULT_MODEL_TAG)


@pytest.fixture(scope="session")
def server(trained_store: Path, artifacts: Path):
    """A real `bentoml serve` of the default model, shared by the HTTP tests."""
    with serve(trained_store, artifacts / "server.log") as running:
        yield running


@pytest.fixture(scope="session")
def heldout():
    from training_export import render_heldout

    return render_heldout()
