"""Pixels to probabilities: one model's folder (model.onnx + card.json) behind one object.

Decode, validate, preprocess, run ONNX Runtime, read the answer: the service, the training tools and
the benchmark all use this object, so they cannot drift apart. Plain options in, plain values out;
the caller times and counts what it wants (`on_run` hears of every model run).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from .decoding import DecodeLimits, PixelBudget, check_declared_type, load_image, open_image
from .errors import ClassifierError, ErrorCode, model_failure
from .model_card import ModelCard
from .postprocessing import Prediction, softmax, to_prediction
from .preprocessing import preprocess

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
OnRun = Callable[[int, float], None]  # (images in the run, seconds it took)


class ModelLoadError(RuntimeError):
    """The model files are missing or do not match their card: never serve from them."""


class NonFiniteOutput(ArithmeticError):
    """The model answered NaN or infinity (an input far outside what it knows, or a broken
    model): there is no prediction to give, and a NaN would poison the metrics and the JSON."""


@dataclass(frozen=True)
class ClassifierOptions:
    allowed_formats: tuple[str, ...] = DecodeLimits.allowed_formats
    max_image_pixels: int = DecodeLimits.max_pixels
    max_batch: int = 8  # most images in one model run (ONNX Runtime keeps memory for the largest)
    intra_op_threads: int = 1
    solo_threads: int = 1  # > 1: a second session with these threads for an image run alone
    default_top_k: int = 3
    grade_high: float = 0.90
    grade_medium: float = 0.60


def _fingerprint(onnx_path: Path, card: ModelCard, options: ClassifierOptions) -> str:
    """What this classifier's answers depend on: the model file, its card, and the options that
    admit or grade a picture (not its thread counts). Replicas that share answers must agree on
    all of them, whatever their tags say."""
    with open(onnx_path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256")
    digest.update(card.model_dump_json().encode())
    admitted = (options.allowed_formats, options.max_image_pixels)
    graded = (options.grade_high, options.grade_medium)
    digest.update(repr((admitted, graded)).encode())
    return digest.hexdigest()[:16]


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        return ModelCard.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(f"no model card at {path}") from None
    except ValueError as exc:
        raise ModelLoadError(f"invalid model card at {path}: {exc}") from None


class Classifier:
    """One ONNX Runtime session (its `run` is thread-safe, so one serves every thread)."""

    def __init__(
        self,
        model_dir: Path,
        options: ClassifierOptions = ClassifierOptions(),
        on_run: OnRun | None = None,
        decoding: PixelBudget | None = None,
    ) -> None:
        self.card = read_card(model_dir)
        self.options = options
        self.on_run = on_run
        self.decoding = decoding or PixelBudget()  # the process's, shared with its other models
        self.limits = DecodeLimits(options.allowed_formats, options.max_image_pixels)
        onnx_path = self.onnx_path = Path(model_dir) / self.card.onnx_file
        self._loaded_card = self.card  # the files' card, before the service merges evaluations
        self.session = _open_session(onnx_path, options.intra_op_threads)
        # When nothing else is in work, one image may use every core, and answers sooner.
        self.solo_session = (
            _open_session(onnx_path, options.solo_threads, spinning=True)
            if options.solo_threads > 1
            else None
        )
        self.merging_gain = 1.0  # per-image time alone / in a full run: measured by warm_up
        self._check_signature()

    @cached_property
    def fingerprint(self) -> str:
        """Hashes the whole model file: computed when first asked (by the shared cache), not for
        every classifier the tools and the benchmark open."""
        return _fingerprint(self.onnx_path, self._loaded_card, self.options)

    @property
    def labels(self) -> list[str]:
        return self.card.labels

    def check_declared_type(self, data: bytes, declared_type: str | None) -> None:
        """UNSUPPORTED_MEDIA_TYPE for a declared type the bytes cannot be (cheap: no decoding)."""
        check_declared_type(declared_type, self.limits.allowed_formats, data)

    def prepare(self, data: bytes, declared_type: str | None = None) -> np.ndarray:
        """Bytes -> model input tensor, or ClassifierError (4xx) for anything wrong with them."""
        check_declared_type(declared_type, self.limits.allowed_formats)
        spec = self.card.preprocessing
        image, pixels = open_image(data, self.limits, declared_type, spec.decode_size_hint)
        with self.decoding.hold(pixels):  # the decoded picture lives until it is preprocessed
            return self._preprocess(load_image(image))

    def _preprocess(self, image: Image.Image) -> np.ndarray:
        spec = self.card.preprocessing
        try:
            return preprocess(image, spec)
        except MemoryError:
            raise
        except Exception as exc:  # Pillow refusing this picture's pixels: the data's doing
            log.warning("preprocessing refused a %s %s image: %r", image.format, image.mode, exc)
            raise ClassifierError(
                ErrorCode.INVALID_IMAGE,
                f"the {image.format or ''} image's pixels ({image.mode}) cannot be converted "
                f"to the model's input",
            ) from None

    def run(self, tensors: Sequence[np.ndarray], solo: bool = False) -> np.ndarray:
        """Tensors -> probabilities, in model runs of at most `max_batch` images. `solo`: nothing
        else runs meanwhile, so a single image may take the solo session's threads."""
        session = self.solo_session if solo and len(tensors) == 1 else None
        step = self.options.max_batch
        runs = []
        for start in range(0, len(tensors), step):
            chunk = tensors[start : start + step]
            started = time.perf_counter()
            runs.append(self._probabilities(np.stack(chunk), session or self.session))
            if self.on_run is not None:
                self.on_run(len(chunk), time.perf_counter() - started)
        return np.concatenate(runs) if runs else np.zeros((0, len(self.labels)), np.float32)

    def run_isolating_faults(
        self, tensors: Sequence[np.ndarray], solo: bool = False
    ) -> list[np.ndarray | Exception]:
        """Like run, but a run that fails is retried item by item: one poison input fails
        alone (its exception in its place, so the caller can tell a NaN answer from a model
        that raised) instead of taking every request merged with it down."""
        try:
            return list(self.run(tensors, solo))
        except Exception as exc:
            _log_failure(f"a run of {len(tensors)} items failed; retrying them one by one", exc)
        rows: list[np.ndarray | Exception] = []
        for tensor in tensors:
            try:
                rows.append(self.run([tensor])[0])
            except Exception as exc:
                _log_failure("a model run failed on a single item", exc)
                rows.append(exc)
        return rows

    def resolve_top_k(self, top_k: int | None) -> int:
        classes = len(self.labels)
        if top_k is None:
            return min(self.options.default_top_k, classes)
        if not 1 <= top_k <= classes:
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST, f"top_k must be between 1 and {classes}, got {top_k}"
            )
        return top_k

    def to_prediction(self, probabilities: np.ndarray, top_k: int) -> Prediction:
        options = self.options
        return to_prediction(
            probabilities, self.labels, top_k, high=options.grade_high, medium=options.grade_medium
        )

    def classify(self, data: bytes, top_k: int | None = None) -> Prediction:
        """One image end to end in this process (offline use, tests)."""
        k = self.resolve_top_k(top_k)
        (row,) = self.run_isolating_faults([self.prepare(data)])
        if isinstance(row, Exception):
            raise model_failure()
        return self.to_prediction(row, k)

    def warm_up(self) -> None:
        """First runs allocate and tune; do them before the service says it is ready, timed, to
        learn what merging images saves this model (`merging_gain`)."""
        sizes = sorted({1, self.options.max_batch})
        self.merging_gain = self._merging_gain(sizes)
        if self.solo_session is not None:
            self._probabilities(self._zeros(1), self.solo_session)
        # Give back the memory the large runs took: a service that does not merge never uses it
        # (for MobileNetV2, most of a worker's growth at warm-up); merged runs take it again.
        self._probabilities(self._zeros(1), self.session, _RELEASE_UNUSED_MEMORY)
        log.info(
            "model %s warmed up with batch sizes %s; a run of %d costs %.2fx less per image",
            self.card.name, sizes, sizes[-1], self.merging_gain,
        )  # fmt: skip

    def _merging_gain(self, sizes: list[int], rounds: int = 4) -> float:
        """Time per image of a run of one over that of a run of the largest size. One untimed run
        of each first (it allocates and tunes); then the sizes take turns, so that a busy moment
        (the other workers warm up at the same time) slows both alike, and the best run of each
        counts (a busy machine only makes runs slower). Timed one size after the other, two
        workers of one server measured 3.49 and 1.03 for the same INT8 model, and disagreed."""
        batches = {size: self._zeros(size) for size in sizes}
        best = dict.fromkeys(sizes, float("inf"))
        for timed in [False] + [True] * rounds:
            for size, batch in batches.items():
                started = time.perf_counter()
                try:
                    self._probabilities(batch, self.session)
                except NonFiniteOutput:
                    raise ModelLoadError("model produced non-finite outputs on warm-up") from None
                if timed:
                    best[size] = min(best[size], time.perf_counter() - started)
        return (best[sizes[0]] / sizes[0]) / (best[sizes[-1]] / sizes[-1])

    def _zeros(self, size: int) -> np.ndarray:
        return np.zeros((size, *self.card.preprocessing.tensor_shape), dtype=np.float32)

    def _probabilities(
        self,
        batch: np.ndarray,
        session: ort.InferenceSession,
        run_options: ort.RunOptions | None = None,
    ) -> np.ndarray:
        """(N, *tensor_shape) float32 -> (N, labels) probabilities, whatever the model outputs."""
        card = self.card
        (output,) = session.run([card.output_name], {card.input_name: batch}, run_options)
        output = np.asarray(output, dtype=np.float32).reshape(len(batch), -1)
        if output.shape[1] != len(self.labels):
            raise ModelLoadError(
                f"model returned {output.shape[1]} scores for {len(self.labels)} labels"
            )
        probabilities = softmax(output) if card.output_kind == "logits" else output
        finite = np.isfinite(probabilities).all(axis=1)
        if not finite.all():
            raise NonFiniteOutput(
                f"model {card.name} answered NaN or infinity for {np.count_nonzero(~finite)} of "
                f"{len(batch)} inputs"
            )
        return probabilities

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


_SOLO_SPIN_US = 5000  # how long the solo session's idle threads spin before they sleep
_RELEASE_UNUSED_MEMORY = ort.RunOptions()
_RELEASE_UNUSED_MEMORY.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def _open_session(onnx_path: Path, threads: int, spinning: bool = False) -> ort.InferenceSession:
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = 1
    # Spin-waiting threads burn CPU that decoding and the event loop need (measured: +4 CPU-ms
    # per image). Only the solo session spins: the caller runs it when nothing else is in work,
    # where spinning saves the wake-ups between operators. Its idle threads spin for
    # _SOLO_SPIN_US at most, then sleep: stopping them when each run ended
    # (`session.force_spinning_stop`) answered 1 client 9.8% slower (p50 13.3 against 11.6 ms,
    # MobileNetV2, two servers loaded in turn), and spinning unbounded cost 2 clients 16%.
    session_options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if spinning else "0"
    )
    if spinning:
        session_options.add_session_config_entry(
            "session.intra_op.spin_duration_us", str(_SOLO_SPIN_US)
        )
    try:
        return ort.InferenceSession(
            str(onnx_path), sess_options=session_options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from None


def _log_failure(what: str, exc: Exception) -> None:
    """A known model answer (NaN) in one line; anything else with its traceback."""
    if isinstance(exc, NonFiniteOutput):
        log.warning("%s: %s", what, exc)
    else:
        log.error(what, exc_info=exc)
