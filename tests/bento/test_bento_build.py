"""`bentoml build` gives a versioned bento: the pinned model, only the service code, no torch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from image_classifier.serving.settings import DEFAULT_MODEL_TAG
from loadtest.servers import BIN, REPO


def test_bento_pins_the_model_and_ships_only_serving_code(trained_store: Path):
    result = subprocess.run(
        [str(BIN / "bentoml"), "build", "--output", "tag"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    assert name == "image-classifier" and version
    bento_dir = trained_store / "bentos" / name / version

    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    (service,) = manifest["services"]
    assert [m["tag"] for m in service["models"]] == [DEFAULT_MODEL_TAG]  # pinned by version
    shipped = sorted(
        str(p.relative_to(bento_dir / "src")) for p in (bento_dir / "src").rglob("*.py")
    )
    assert {"service.py", "bentoml_compat.py", "image_classifier/core/decoding.py"} <= set(shipped)
    assert not [p for p in shipped if p.startswith(("tests", "training_export", "loadtest"))]
    lines = (bento_dir / "env" / "python" / "requirements.txt").read_text().lower().splitlines()
    packages = {line.split("==")[0].strip() for line in lines if line and not line.startswith("#")}
    assert {"bentoml", "onnxruntime", "pillow"} <= packages
    assert not packages & {"torch", "scikit-learn", "onnx", "pytest"}
