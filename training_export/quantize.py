"""INT8 variants of stored models: ONNX Runtime static QDQ quantization, gated, saved beside fp32.

Static, not dynamic: dynamic quantization of convolutions ran 8x slower than fp32 on this machine
kind, while static QDQ with uint8 activations ran 2-3x faster (docs/benchmarks.md). Calibration
tensors come from the service's own `preprocess`, so the ranges fit what the served model sees.
The gate compares the INT8 model with its fp32 source on pictures calibration never saw, and
nothing that fails it is saved.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from image_classifier import model_store
from image_classifier.core.model_card import HeldOutMetrics, ModelCard
from image_classifier.core.preprocessing import preprocess
from image_classifier.serving.machine import int8_saturates
from image_classifier.serving.release_record import read_record, record_path

from .digits import render_heldout
from .export import default_opset
from .pipeline import TrainingError
from .recipe import MODEL_NAME
from .store import git_commit, library_versions, load_card, new_tag, save_to_store

MAX_ACCURACY_DROP = 0.01  # digits: held-out accuracy may fall by at most 1 point
MIN_TOP1_AGREEMENT = 0.99  # benchmark models: INT8 top-1 equals fp32 top-1 on >= 99% of pictures
DIGITS_CALIBRATION = 120  # first held-out digits calibrate; the rest (~330) judge
# Photo seeds, disjoint from benchmark_models' own. 64 calibrated MobileNetV2-bench to 98.67%
# agreement on an AVX-512 VNNI EPYC (ONNX Runtime 1.32), just short of the gate; 128 to 100%.
PHOTO_CALIBRATION = range(30_000, 30_128)
PHOTO_EVALUATION = range(31_000, 31_300)
CALIBRATION_BATCH = 8


_SATURATION_HINT = (
    ". This CPU has no VNNI instructions: ONNX Runtime's INT8 kernels saturate on it, so the "
    "weights were kept to 7 bits, which costs accuracy; INT8 pays on a CPU with VNNI "
    "(avx512_vnni, avx_vnni): quantize and serve INT8 there"
)


class QuantizationError(TrainingError):
    """The INT8 model fails its gate (or cannot be judged): it is not saved."""


@dataclass
class QuantizationData:
    """Tensors made by the service's `preprocess`: some to calibrate, others to judge with."""

    calibration: np.ndarray
    evaluation: np.ndarray
    labels: np.ndarray | None  # evaluation labels; None: judge by agreement with fp32


def quantization_data(card: ModelCard) -> QuantizationData:
    spec = card.preprocessing
    if card.benchmark_only:
        from .benchmark_models import photo_tensors

        return QuantizationData(
            photo_tensors(PHOTO_CALIBRATION, spec), photo_tensors(PHOTO_EVALUATION, spec), None
        )
    if card.name == MODEL_NAME:
        heldout = render_heldout()
        tensors = np.stack([preprocess(image, spec) for image, _ in heldout])
        labels = np.array([label for _, label in heldout])
        return QuantizationData(
            tensors[:DIGITS_CALIBRATION], tensors[DIGITS_CALIBRATION:], labels[DIGITS_CALIBRATION:]
        )
    raise QuantizationError(
        f"no held-out data is known for {card.name!r}: give --calibration DIR (your own "
        "pictures; --images DIR, a labelled folder, to gate on accuracy)"
    )


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, tensors: np.ndarray) -> None:
        self._batches = iter(
            {input_name: tensors[i : i + CALIBRATION_BATCH]}
            for i in range(0, len(tensors), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_qdq(source: Path, target: Path, input_name: str, calibration: np.ndarray) -> None:
    """Static QDQ: uint8 activations, per-channel int8 weights; the classifier stays float.

    The last layer stays float32: its cost is a rounding error of the whole net's, and rounding
    its weights is what flipped near-tied top-1 answers (measured: 86% -> 99% agreement). So does
    what follows it (a softmax: quantized, its probabilities came in steps of 1/255, most of them
    0, and tied). Weights keep to 7 bits on a CPU whose INT8 kernels saturate (`int8_saturates`).
    QuantizationError when nothing else is left to quantize: the "INT8" model would be float32.
    """
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        tail = _classifier_tail(_with_every_node_named(prepared).graph)
        quantize_static(
            str(prepared),
            str(target),
            _Batches(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,  # VNNI's fast path: signed activations were ~1x
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=tail,
            reduce_range=int8_saturates(),
        )
    if not any(node.op_type == "QuantizeLinear" for node in onnx.load(str(target)).graph.node):
        raise QuantizationError(
            "nothing in this model is quantized: ONNX Runtime quantizes no layer of it but the "
            "classifier, which stays float32, so an INT8 variant would gain nothing"
        )


_SCORE_LAYERS = {"Gemm", "MatMul", "Conv"}  # a dense classifier, or SqueezeNet's 1x1 conv


def _with_every_node_named(path: Path) -> onnx.ModelProto:
    """Names are optional in ONNX (graphs built with `onnx.helper` often have none), but ONNX
    Runtime excludes nodes by name: `nodes_to_exclude=[""]` left every unnamed node, the convs
    too, in float32. Names the unnamed ones, uniquely, in the file at `path`."""
    model = onnx.load(str(path))
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(
                name
                for n in itertools.count()
                if (name := f"{node.op_type}_{index}" + (f"_{n}" if n else "")) not in taken
            )
            taken.add(node.name)
    onnx.save(model, str(path))
    return model


def _classifier_tail(graph: onnx.GraphProto) -> list[str]:
    """The layer that makes the class scores (the last Gemm, MatMul or Conv before an output) and
    everything after it: a scale, a softmax, pooling, a reshape, whatever they are.

    Walked back from each output along the data each node reads, its first input that is not a
    constant (weights, a Constant node's scale, a reshape's shape). A list of the ops allowed in
    between missed torch's `softmax(head(x) * 3)`: its Softmax was quantized (steps of 1/255)."""
    producer = {output: node for node in graph.node for output in node.output}
    constants = {tensor.name for tensor in graph.initializer} | {
        node.output[0] for node in graph.node if node.op_type == "Constant"
    }
    found = []
    for output in graph.output:
        node, walked = producer.get(output.name), []
        while node is not None and node.op_type not in _SCORE_LAYERS:
            walked.append(node.name)
            data = next((name for name in node.input if name and name not in constants), None)
            node = producer.get(data)
        if node is not None:
            found += [*walked, node.name]
    return found


def _logits(path: Path, input_name: str, tensors: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    step = 64  # bounded memory on large evaluation sets
    return np.concatenate([session.run(None, {input_name: tensors[i : i + step]})[0]
                           for i in range(0, len(tensors), step)])  # fmt: skip


def judge_accuracy(fp32: float, int8: float, max_drop: float) -> float:
    """The accuracy drop, or QuantizationError saying by how much it is too large."""
    drop = round(fp32 - int8, 4)
    if drop > max_drop:
        raise QuantizationError(
            f"INT8 accuracy {int8:.4f} is {drop * 100:.2f} points below fp32 {fp32:.4f} "
            f"(at most {max_drop * 100:g}): not saved{_saturation_hint()}"
        )
    return drop


def judge_agreement(agreement: float, pictures: int, min_agreement: float) -> None:
    if agreement < min_agreement:
        raise QuantizationError(
            f"INT8 top-1 agrees with fp32 on {agreement:.2%} of {pictures} pictures (at least "
            f"{min_agreement:.0%}, {(min_agreement - agreement) * 100:.2f} points short): "
            f"not saved{_saturation_hint()}"
        )


def _saturation_hint() -> str:
    return _SATURATION_HINT if int8_saturates() else ""


def gate(
    fp32: Path,
    int8: Path,
    card: ModelCard,
    data: QuantizationData,
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
) -> dict:
    """The figures that decide; raises QuantizationError when INT8 is not good enough."""
    max_accuracy_drop = MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop
    min_agreement = MIN_TOP1_AGREEMENT if min_agreement is None else min_agreement
    before = _logits(fp32, card.input_name, data.evaluation).argmax(axis=1)
    after = _logits(int8, card.input_name, data.evaluation).argmax(axis=1)
    figures = {
        "top1_agreement": round(float((before == after).mean()), 4),
        "calibration_samples": len(data.calibration),
        "evaluation_samples": len(data.evaluation),
    }
    if data.labels is not None:
        figures["fp32_accuracy"] = round(float((before == data.labels).mean()), 4)
        figures["int8_accuracy"] = round(float((after == data.labels).mean()), 4)
        figures["accuracy_drop"] = judge_accuracy(
            figures["fp32_accuracy"], figures["int8_accuracy"], max_accuracy_drop
        )
    else:
        judge_agreement(figures["top1_agreement"], len(data.evaluation), min_agreement)
    return figures


def refuse_int8_source(tag: str, card: ModelCard) -> None:
    """An INT8 entry is not quantized again (its card already holds a gate's figures)."""
    gate_of_source = card.metrics.int8_gate
    if gate_of_source is not None:
        raise QuantizationError(
            f"{tag} is already INT8 (quantized from {gate_of_source.get('source_tag')}): "
            "quantize the float32 model"
        )


def check_out_tag(source_tag: str, out_tag: str, force: bool) -> None:
    """The INT8 entry is a new one: never the source (replacing it deleted the float32 model the
    quantization reads), and an existing one only with --force (replaced once the gate passes),
    and only an INT8 entry that is not served: --force replaced any model, the served one too,
    which the next start then served unchecked."""
    name, _, version = out_tag.partition(":")
    new_tag(name, version or None, flags=("--out's name", "--out's version"))
    stored = model_store.find(out_tag)
    if stored is None:
        return
    if str(stored.tag) == source_tag.lower():
        raise QuantizationError(f"--out {out_tag} is the model being quantized: name a new tag")
    if not force:
        raise QuantizationError(
            f"{stored.tag} is already in the model store: pass --force to replace it (once the "
            "new one passes its gate), or --out another tag"
        )
    try:
        card = load_card(str(stored.tag))
    except (KeyError, ValueError):  # no card, or not ours: not an INT8 entry either
        card = None
    if card is None or card.metrics.int8_gate is None:
        raise QuantizationError(
            f"{stored.tag} is not an INT8 entry (quantize made none by that tag): --force "
            "replaces only those; --out another tag"
        )
    record = read_record(record_path())
    if str(stored.tag) in (record.model_tag, record.candidate_tag):
        raise QuantizationError(
            f"{stored.tag} is served ({record_path()}): --out another tag, then promote it"
        )


def save_int8(
    int8: Path, card: ModelCard, source_tag: str, out_tag: str, metrics: dict, figures: dict
) -> str:
    """The INT8 file as its own store entry: the source's card, its gate's figures."""
    figures["source_tag"] = source_tag
    figures["weight_bits"] = 7 if int8_saturates() else 8  # what quantize_qdq chose here
    quantized = card.model_copy(
        update={
            "name": out_tag.split(":")[0],
            # quantizing upgrades an old file (7 -> 11): not checked (onnx.checker refuses ORT's
            # per-channel weights below opset 13, which ONNX Runtime runs)
            "opset": default_opset(onnx.load(str(int8), load_external_data=False)),
            "metrics": HeldOutMetrics(**metrics, int8_gate=figures),
            "description": f"INT8 (ONNX Runtime static QDQ: uint8 activations, per-channel "
            f"int8 weights) of {source_tag}. {card.description}",
            "versions": library_versions(),
            "git_commit": git_commit(),
        }
    )
    return save_to_store(int8, quantized, out_tag)


def quantize_and_save(
    source_tag: str,
    out_tag: str | None = None,
    force: bool = False,
    data: QuantizationData | None = None,
    say: Callable[[str], None] = print,
    **gate_limits: float,
) -> str:
    """Quantize a stored fp32 model, gate it, save it as its own entry with the gate's figures."""
    source = model_store.find(source_tag)
    if source is None:
        raise QuantizationError(f"{source_tag} is not in the model store")
    card = load_card(source_tag)
    refuse_int8_source(source_tag, card)
    out_tag = out_tag or f"{source.tag.name}-int8:{source.tag.version}"
    check_out_tag(str(source.tag), out_tag, force)
    data = data if data is not None else quantization_data(card)
    fp32 = Path(source.path) / card.onnx_file
    with tempfile.TemporaryDirectory() as folder:
        int8 = Path(folder) / "model.onnx"
        quantize_qdq(fp32, int8, card.input_name, data.calibration)
        figures = gate(fp32, int8, card, data, **gate_limits)
        metrics = card.metrics.model_dump(exclude_none=True)
        if "int8_accuracy" in figures:
            metrics.update(accuracy=figures["int8_accuracy"], samples=len(data.evaluation))
        saved = save_int8(int8, card, str(source.tag), out_tag, metrics, figures)
    say(f"saved {saved}: gate passed {figures}")
    return saved
