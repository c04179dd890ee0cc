"""Benchmark-only models, INT8 quantization and its gate, and the one-command benchmark (smoke)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from image_classifier.core.classifier import read_card
from image_classifier.serving.machine import int8_saturates
from loadtest.benchmark import BESIDE_OIP, ONE_PER_RUN, STAGES
from loadtest.servers import REPO, serve
from tests.model_store import store_model_dir
from tests.pictures import encode


@pytest.fixture(scope="session")
def mobilenet_tag(bentoml_home: Path) -> str:
    """The real MobileNetV2-class model, built and saved by the project's command."""
    result = subprocess.run(
        [sys.executable, "-c", "from training_export.benchmark_models import MOBILENET, "
         "build_and_save; build_and_save(MOBILENET)"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return "mobilenetv2-bench:v1"


@pytest.fixture(scope="session")
def digits_int8_tag(trained_store: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "training_export", "quantize", "digits-cnn:v1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return "digits-cnn-int8:v1"


def test_benchmark_model_is_exported_faithfully_and_marked(mobilenet_tag, bentoml_home):
    """The export check (ORT vs torch) ran in build_and_save; here: the card and real outputs."""
    import onnxruntime as ort

    from training_export.benchmark_models import photo_tensors

    folder = store_model_dir(bentoml_home, mobilenet_tag)
    card = read_card(folder)
    assert card.benchmark_only is True
    assert "random weights" in card.description.lower()
    assert len(card.labels) == 1000 and card.preprocessing.input_size == (224, 224)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {card.input_name: photo_tensors(range(50_000, 50_016))})[0]
    assert logits.shape == (16, 1000) and np.isfinite(logits).all()
    assert len(set(logits.argmax(axis=1))) > 1  # decisive, but not one constant answer


def test_quantize_saves_digits_int8_with_its_gate_figures(digits_int8_tag, bentoml_home):
    card = read_card(store_model_dir(bentoml_home, digits_int8_tag))
    figures = card.metrics.model_extra["int8_gate"]
    assert figures["source_tag"] == "digits-cnn:v1"
    assert figures["weight_bits"] == (7 if int8_saturates() else 8)  # what ran the gate
    assert figures["accuracy_drop"] <= 0.01
    assert figures["int8_accuracy"] >= 0.95 and figures["evaluation_samples"] > 200
    print(f"digits INT8 gate: {figures}")


def test_quantize_refuses_a_broken_calibration(trained_store):
    """Calibrated on washed-out pictures, the activation ranges are far too narrow: refused."""
    from image_classifier.model_store import find
    from training_export.quantize import QuantizationError, quantization_data, quantize_and_save
    from training_export.store import load_card

    data = quantization_data(load_card("digits-cnn:v1"))
    data.calibration = data.calibration * 0.05  # measured: INT8 accuracy 11% (fp32 99.7%)
    with pytest.raises(QuantizationError, match="below fp32"):
        quantize_and_save("digits-cnn:v1", "digits-cnn-int8-broken:v1", data=data)
    assert find("digits-cnn-int8-broken:v1") is None


def test_quantize_cli_refuses_an_impossible_gate_with_exit_1(trained_store):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from training_export.__main__ import main; "
         "import training_export.quantize as q; q.MAX_ACCURACY_DROP = -1.0; "
         "sys.exit(main(['quantize', 'digits-cnn:v1', '--out', 'digits-cnn-int8-strict:v1']))"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not saved" in result.stderr


def test_int8_digits_model_served_answers_heldout_digits(digits_int8_tag, trained_store, heldout,
                                                         artifacts):  # fmt: skip
    sample = heldout[:40]
    with serve(
        trained_store, artifacts / "server-int8.log", env={"MODEL_TAG": digits_int8_tag}
    ) as s:
        info = httpx.get(f"{s.url}/info", timeout=10).json()
        assert info["model"] == {"name": "digits-cnn-int8", "version": "v1"}
        correct = 0
        for image, label in sample:
            response = httpx.post(
                f"{s.url}/analyze",
                files={"image": ("d.png", encode(image, "PNG"), "image/png")},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            correct += response.json()["prediction"]["label"] == str(label)
    assert correct >= 0.95 * len(sample), f"{correct}/{len(sample)}"


def test_benchmark_quick_writes_every_figure(digits_int8_tag, tmp_path):
    """A smoke run on the digits model (its speed is not the point): the JSON has every key."""
    out = tmp_path / "benchmarks.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.benchmark", "--quick", "--seconds", "1",
         "--model", "digits-cnn:v1", "--int8", digits_int8_tag, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in figures["targets"]:  # every target got a measured value
        assert isinstance(figures[key], float) and figures[key] > 0, (key, figures[key])
    assert set(figures["targets"]) >= {
        "service_over_expert_baseline", "service_over_litserve", "p99_over_litserve",
        "p50_c1_over_baseline", "int8_served_over_fp32_served", "int8_service_over_int8_limit",
    }  # fmt: skip
    for key in ("model", "settings", "machine", "command", "date", "sizing"):
        assert figures[key], key
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", figures["commit"]), figures["commit"]
    assert set(figures["stages_c16_ms"]) == set(STAGES), figures["stages_c16_ms"]
    assert all(p["img_s"] > 0 and p["errors"] == 0 for p in figures["points"]), figures["points"]
    shares = figures["worker_cpu_shares_c16"]
    assert len(shares) >= figures["sizing"]["workers"] and sum(shares) <= 1.01, shares
    assert figures["cache"]["hit_over_miss_c16"] > 0 and figures["cache"]["key_ms"]["640"] > 0
    markdown = out.with_suffix(".md").read_text()
    for system in ("service", "tutorial", "expert", "litserve", "service WORKERS=1",
                   "service, beside litserve", "service, beside INT8"):  # fmt: skip
        assert f"| {system} | 640 | 16 |" in markdown, system
    # the limits the ratios use were measured again, in two halves, beside their points
    assert set(figures["limit_beside"]) == {
        "640", "phone", "640 INT8", f"640 {ONE_PER_RUN}", f"640 INT8 {ONE_PER_RUN}"
    }, figures["limit_beside"]  # fmt: skip
    for limit in figures["limit_beside"].values():
        assert len(limit["halves"]) == 2 and min(limit["halves"]) > 0, limit
    # what bounds the service: its workers' CPU per image by role, beside the limit's runs
    for served in (BESIDE_OIP, "service INT8"):
        at_16 = [p for p in figures["points"] if p["system"] == served and p["concurrency"] == 16]
        spent = at_16[0]["cpu_ms_per_image"]
        assert spent["event_loops"] > 0 and spent["threads"] > 0, spent
        assert spent["total"] == pytest.approx(spent["event_loops"] + spent["threads"], abs=0.02)
        assert f"What bounds `{served}` at c=16" in markdown
    assert all("cpu_ms_per_image" not in p for p in figures["points"] if p["system"] == "tutorial")
    assert figures["batching"]["measured_gain"] > 0 and "merges" in figures["batching_int8"]
    for key in ("images_per_run_c16", "images_per_run_int8_c16"):  # one image or more per run
        assert 1.0 <= figures[key] <= 8.0, (key, figures[key])
