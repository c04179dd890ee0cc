"""Helpers shared by the tests: encoding pictures, small ONNX models, a real `bentoml serve`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# The operation that, applied to the upright picture, gives what a camera stores with each
# EXIF orientation tag (so decoding must undo it).
EXIF_STORED_AS = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


FIGURES: list[str] = []


def measured(line: str) -> None:
    """A figure for the end-of-run summary, so CI's log shows it (speed is reported, not
    asserted: these machines are shared and noisy)."""
    FIGURES.append(line.strip())
    print(line)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_onnx_classifier(
    model_dir: Path,
    *,
    labels: int = 10,
    input_size: tuple[int, int] = (28, 28),
    color_mode: str = "L",
    output_kind: str = "logits",
    fail_when_mean_below: float | None = None,
    seed: int = 0,
    **spec_options,
) -> Path:
    """A linear ONNX classifier and its card.json in `model_dir` (a served-model folder).

    `fail_when_mean_below` makes the model fail at run time on inputs whose mean is below the
    threshold (a Reshape to a shape that cannot fit), and so does any batch holding one:
    a real model fault, for error-path tests.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from image_classifier.model_card import ModelCard
    from image_classifier.preprocessing import PreprocessSpec

    spec = PreprocessSpec(input_size=input_size, color_mode=color_mode, **spec_options)
    features = int(np.prod(spec.tensor_shape))
    rng = np.random.default_rng(seed)
    init = [
        numpy_helper.from_array(rng.normal(size=(features, labels)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
    ]
    final = "scores"
    if output_kind == "probabilities":
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
        final = "probs"
    if fail_when_mean_below is not None:
        # shape = [-1, labels] normally, [-1, labels + 1] (impossible) when the input is dark.
        init += [
            numpy_helper.from_array(np.array(fail_when_mean_below, np.float32), "threshold"),
            numpy_helper.from_array(np.array([-1, labels], np.int64), "good_shape"),
            numpy_helper.from_array(np.array([-1, labels + 1], np.int64), "bad_shape"),
        ]
        nodes += [
            helper.make_node("ReduceMean", ["input"], ["means"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("ReduceMin", ["means"], ["darkest"], keepdims=0),
            helper.make_node("Less", ["darkest", "threshold"], ["dark"]),
            helper.make_node("Where", ["dark", "bad_shape", "good_shape"], ["out_shape"]),
            helper.make_node("Reshape", [final, "out_shape"], ["checked"]),
        ]
        final = "checked"
    nodes.append(helper.make_node("Identity", [final], ["output"]))
    graph = helper.make_graph(
        nodes,
        "test-classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *spec.tensor_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", labels])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "model.onnx")
    card = ModelCard(
        name="test-classifier",
        labels=[f"class_{i}" for i in range(labels)],
        preprocessing=spec,
        output_kind=output_kind,
        input_name="input",
        output_name="output",
        opset=17,
        source="imported",
    )
    (model_dir / "card.json").write_text(card.model_dump_json())
    return model_dir


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not ready in {timeout}s:\n{log_path.read_text()[-3000:]}")


@contextlib.contextmanager
def serve(
    bentoml_home: Path, log_path: Path, env: dict[str, str] | None = None, ready: bool = True
) -> Iterator[Server]:
    """A real `bentoml serve service:ImageClassifier` on a free loopback port.

    Each server gets its own BENTOML_HOME sharing the model store through a symlink: BentoML
    clears $BENTOML_HOME/prometheus_multiproc_dir when a server starts or stops, which would zero
    the metrics of any other server on the same home.
    """
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="bentoml-server-home-"))
    (home / "models").symlink_to(Path(bentoml_home) / "models", target_is_directory=True)
    full_env = {**os.environ, "BENTOML_HOME": str(home), **(env or {})}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", "service:ImageClassifier",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        if ready:
            wait_until_ready(url, process, log_path, timeout=90)
        yield Server(url, process, log_path)
    finally:
        stop(process)
        shutil.rmtree(home, ignore_errors=True)


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def envelope_code(response: httpx.Response) -> str:
    body = response.json()
    assert body["success"] is False, body
    assert body["request_id"] == response.headers["x-request-id"], body
    return body["error"]["code"]


def store_model_dir(bentoml_home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    path = Path(bentoml_home) / "models" / name / version
    assert (path / "card.json").exists(), f"no model at {path}"
    return path


def dumps(obj) -> str:
    return json.dumps(obj, indent=1)[:2000]
