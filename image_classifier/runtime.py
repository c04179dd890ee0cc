"""One ONNX Runtime session per process, checked against its card and warmed up before use."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .model_card import ModelCard
from .postprocessing import softmax

log = logging.getLogger(__name__)

CARD_FILE = "card.json"


_M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's per-thread malloc arenas for this process (call before threads start).

    Every thread that decodes or runs the model otherwise gets an arena of its own, and each keeps
    the peak of what passed through it: a MobileNetV2 worker after 16 clients' 640x480 JPEGs held
    600 MB RSS with the default arenas and 270 MB with 2, at the same throughput (measured with
    BATCH_MAX_SIZE 4; docs/benchmarks.md).
    Returns False where the C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


class ModelLoadError(RuntimeError):
    """The model files are missing or do not match their card: never serve from them."""


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(f"no model card at {path}") from None
    except ValueError as exc:
        raise ModelLoadError(f"invalid model card at {path}: {exc}") from None


class OnnxModel:
    """Runs batches and returns probabilities, whatever the model outputs (logits or not).

    ONNX Runtime's `run` is thread-safe, so one session serves every thread of a worker.
    """

    def __init__(self, model_dir: Path, intra_op_threads: int = 1) -> None:
        self.card = read_card(model_dir)
        onnx_path = Path(model_dir) / self.card.onnx_file
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Spin-waiting threads burn CPU that decoding needs (measured: +4 CPU-ms per image).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from None
        self._check_signature()

    @property
    def labels(self) -> list[str]:
        return self.card.labels

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        card = self.card
        if card.input_name not in inputs:
            raise ModelLoadError(f"model has no input {card.input_name!r} (has {list(inputs)})")
        if card.output_name not in outputs:
            raise ModelLoadError(f"model has no output {card.output_name!r} (has {outputs})")
        declared = inputs[card.input_name].shape
        expected = card.preprocessing.tensor_shape
        if len(declared) != 4 or any(
            isinstance(d, int) and d != e for d, e in zip(declared[1:], expected, strict=True)
        ):
            raise ModelLoadError(
                f"model input {declared} does not fit the card's preprocessing {expected}"
            )

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, *tensor_shape) float32 -> (N, labels) probabilities."""
        (output,) = self.session.run([self.card.output_name], {self.card.input_name: batch})
        output = np.asarray(output, dtype=np.float32).reshape(len(batch), -1)
        if output.shape[1] != len(self.labels):
            raise ModelLoadError(
                f"model returned {output.shape[1]} scores for {len(self.labels)} labels"
            )
        return softmax(output) if self.card.output_kind == "logits" else output

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """First runs allocate and tune; do them before the service says it is ready."""
        for size in batch_sizes:
            batch = np.zeros((size, *self.card.preprocessing.tensor_shape), dtype=np.float32)
            result = self.probabilities(batch)
            if not np.all(np.isfinite(result)):
                raise ModelLoadError("model produced non-finite outputs on warm-up")
        log.info("model %s warmed up with batch sizes %s", self.card.name, batch_sizes)
