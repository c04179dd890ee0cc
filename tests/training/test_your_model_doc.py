"""docs/your-model.md, run as written: from a PyTorch module to a served INT8 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from image_classifier.serving.evaluation_record import read_evaluations
from loadtest.servers import REPO, serve
from tests.figures import measured
from tests.training.own_model import doc_block, make_model_folder


def test_the_walk_through_runs_as_written_and_serves_the_int8_model(
    bentoml_home, artifacts, tmp_path
):
    make_model_folder(tmp_path)
    record = tmp_path / "served_model.json"
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "PYTHONPATH": str(REPO),
           "SERVED_MODEL_FILE": str(record),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    commands = doc_block("commands")
    result = subprocess.run(["bash", "-ec", commands], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "parity with torch on 8 random tensors" in out and "on 48 pictures" in out, out
    assert "saved colours-int8:v1: gate passed" in out, out
    assert "served version: colours:v1 -> colours-int8:v1" in out, out
    for name in ("confusion_matrix.png", "reliability_diagram.png", "evaluation.json"):
        assert (tmp_path / "reports" / "colours-int8-v1" / name).stat().st_size > 1000, name
    saved = read_evaluations(tmp_path / "model_evaluations.json")
    int8 = saved.evaluations["colours-int8:v1"][-1]
    assert int8.samples == 60 and int8.accuracy >= 0.95, int8
    for line in out.splitlines():
        words = " ".join(line.split())
        if line.startswith("parity with torch"):
            measured(f"export-torch: {words}", doc="your-model")
        elif line.startswith("accuracy") and "mean top-1" in line:
            measured(f"evaluate: {words}", doc="your-model")
        elif line.startswith(("accuracy ", "ms_per_picture_median", "top-1 agreement")):
            measured(f"compare colours:v1 | colours-int8:v1: {words}", doc="your-model")

    serve_block = doc_block("serve")
    curl = next(line for line in serve_block.splitlines() if line.startswith("curl"))
    served_env = {"SERVED_MODEL_FILE": str(record)}
    with serve(bentoml_home, artifacts / "your-model.log", env=served_env) as server:
        answer = subprocess.run(
            ["bash", "-c", curl.replace("http://127.0.0.1:3000", server.url)],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert answer.returncode == 0, answer.stderr
    body = json.loads(answer.stdout)
    assert body["model"] == {"name": "colours-int8", "version": "v1"}, body
    assert body["prediction"]["label"] == "red things", body
    assert info["metrics"]["mean_top1_confidence"] == int8.mean_top1_confidence
