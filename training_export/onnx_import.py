"""Bring your own ONNX image classifier: check it against its card, then save it like ours."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
from pydantic import ValidationError

from image_classifier import model_store
from image_classifier.core.classifier import CARD_FILE, Classifier
from image_classifier.core.model_card import ModelCard
from image_classifier.core.preprocessing import IMAGENET_SPEC, PreprocessSpec

from .export import ExportError, inspect_onnx
from .onnx_facts import (
    InputFacts,
    ModelFileError,
    check_rows_independent,
    input_facts,
    output_facts,
    staging_folder,
    with_dynamic_batch,
    with_only_output,
    with_weights_inside,
)
from .store import library_versions, new_tag, save_to_store

# Card fields a config file may set; the rest are read from the ONNX file or filled in here.
_CONFIG_FIELDS = {"labels", "preprocessing", "output_kind", "description", "metrics"}
_DERIVED_FIELDS = {"name", "task", "onnx_file", "input_name", "output_name", "opset", "source",
                   "versions", "git_commit", "training_data_sha256", "benchmark_only"}  # fmt: skip


class ModelImportError(ModelFileError):
    """The model and its description do not fit together."""


def read_labels(path: Path) -> list[str]:
    """One label per line; a UTF-8 byte-order mark (Windows editors write one) is not a label's."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:  # the codec's message names neither the file nor the fix
        raise ModelImportError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
            "save it as UTF-8, one label per line"
        ) from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    check_labels(labels, path)
    return labels


def check_labels(labels: list[str], source: Path) -> None:
    """The same checks for a labels file and a config's list, said when the file is read and
    naming the culprits: the card's own check comes only after the import has printed its first
    lines, and names none."""
    if len(labels) < 2:
        raise ModelImportError(f"{source}: need at least two labels, one per class")
    blank = [index for index, label in enumerate(labels) if not label.strip()]
    if blank:
        raise ModelImportError(f"{source}: labels must not be blank (at positions {blank})")
    repeated = [label for label, count in Counter(labels).items() if count > 1]
    if repeated:
        names = ", ".join(repr(label) for label in repeated)
        raise ModelImportError(f"{source}: labels must be unique; given more than once: {names}")


def read_config(path: Path) -> dict[str, Any]:
    """The card fields a JSON file gives; ModelImportError naming the file for any it cannot."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise ModelImportError(f"{path}: a JSON object of card fields is needed, not a list")
    unknown = set(config) - _CONFIG_FIELDS - _DERIVED_FIELDS
    if unknown:
        raise ModelImportError(f"{path}: unknown fields {sorted(unknown)}")
    labels = config.get("labels")
    if labels is not None and not (
        isinstance(labels, list) and all(isinstance(label, str) for label in labels)
    ):
        raise ModelImportError(f"{path}: 'labels' must be a list of strings, one per class")
    if labels is not None:
        check_labels(labels, path)
    return {key: value for key, value in config.items() if key in _CONFIG_FIELDS}


PRESETS = {"imagenet": IMAGENET_SPEC}


def resolve_spec(
    facts: InputFacts,
    preset: str | None = None,
    config: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> PreprocessSpec:
    """Preset < what the file says < config < flags; a declaration the file contradicts is an
    error (the model would fail, or worse, run on wrongly shaped pixels)."""
    declared = {**(config or {}), **(flags or {})}
    fields = PRESETS[preset].model_dump() if preset else {}
    for name, value in facts.as_spec_fields().items():
        given = declared.get(name)
        if given is not None and _normal(given) != _normal(value):
            raise ModelImportError(f"{name} is given as {given} but the file's input says {value}")
        if preset and fields.get(name) is not None and _normal(fields[name]) != _normal(value):
            say(f"note: {name} {value} from the file, not the preset's {fields[name]}")
        fields[name] = value
    fields.update(declared)
    if fields.get("color_mode") == "L" and preset:  # a grey model: the channels' average
        for key in ("mean", "std"):
            if key not in declared and len(fields[key]) == 3:
                fields[key] = (round(sum(fields[key]) / 3, 4),)
                say(f"note: {key} {fields[key][0]} for one grey channel (the preset's average)")
    try:
        return PreprocessSpec(**fields)
    except ValidationError as exc:
        missing = any(error["type"] == "missing" for error in exc.errors())
        hint = " (the file leaves it open: give --preset imagenet or --input-size/--color-mode)"
        raise ModelImportError(
            f"preprocessing: {invalid_fields(exc)}{hint if missing else ''}"
        ) from None
    except TypeError as exc:
        raise ModelImportError(f"preprocessing: {exc}") from None


def invalid_fields(exc: ValidationError) -> str:
    """Pydantic's errors on one line: each field and what is wrong with it (not its input
    echoed back, nor its documentation links)."""
    return "; ".join(
        ".".join(map(str, error["loc"])) + ": " + error["msg"] if error["loc"] else error["msg"]
        for error in exc.errors()
    )


def _normal(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def import_onnx(
    model_path: Path,
    name: str,
    version: str | None,
    labels: list[str] | None = None,
    config: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    output_kind: str = "auto",
    description: str = "",
    preset: str | None = None,
    source: str = "imported",
    extra_metrics: dict[str, Any] | None = None,
    output: str | None = None,
    say: Callable[[str], None] = print,
) -> str:
    """Validate and save; returns the tag. Flags (labels, preprocessing) override the config.
    `output`: the class scores' output of a file that has several (the others are dropped)."""
    model_path = Path(model_path)
    config = dict(config or {})
    tag = new_tag(name, version)
    if version and model_store.find(tag) is not None:
        raise ModelImportError(f"{tag} is already in the model store: give another --version")
    signature = inspect_onnx(model_path, output)
    labels = labels or config.pop("labels", None)
    if not labels:
        raise ModelImportError("labels are required (--labels FILE or a config file)")
    declared = config.pop("preprocessing", {})
    facts = input_facts(signature, {**declared, **(preprocessing or {})}.get("layout"))
    spec = resolve_spec(facts, preset, declared, preprocessing, say)
    kind = config.pop("output_kind", output_kind) if output_kind == "auto" else output_kind
    with staging_folder() as folder:
        model_path = with_weights_inside(model_path, Path(folder))
        model_path = with_only_output(model_path, Path(folder), signature.output_name)
        notes = []  # said once every check has passed: "saved" before a refusal misled
        if facts.static_batch is not None:
            model_path = with_dynamic_batch(model_path, Path(folder), spec)
            notes.append(
                f"note: the file fixes the batch axis at {facts.static_batch}; saved with a "
                "dynamic one (a batch gave the same rows as single runs)"
            )
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        check_rows_independent(session, spec)
        output = output_facts(session, spec, len(labels), kind)
        height, width = spec.input_size
        say(
            f"input {spec.layout} {spec.color_mode} {height}x{width}, "
            f"{len(labels)} labels; {output.note}"
        )
        card = ModelCard(
            name=name,
            labels=labels,
            preprocessing=spec,
            output_kind=output.kind,
            input_name=signature.input_name,
            output_name=signature.output_name,
            opset=signature.opset,
            source=source,
            description=description or config.pop("description", ""),
            metrics={**config.pop("metrics", {}), **(extra_metrics or {})},
            versions=library_versions(),
        )
        _check_with_runtime(model_path, card)
        saved = save_to_store(model_path, card, tag)
        for note in notes:
            say(note)
        return saved


def _check_with_runtime(model_path: Path, card: ModelCard) -> None:
    """Load it exactly as the service will, and run it once: mismatches fail here, not in prod."""
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder)
        (staged / card.onnx_file).symlink_to(model_path.resolve())
        (staged / CARD_FILE).write_text(card.model_dump_json())
        try:
            Classifier(staged).warm_up()
        except Exception as exc:
            raise ModelImportError(f"{model_path} does not fit its card: {exc}") from None


__all__ = [
    "ExportError",
    "ModelFileError",
    "ModelImportError",
    "import_onnx",
    "read_config",
    "read_labels",
]
