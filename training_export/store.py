"""Save models with their card into the BentoML model store, and look them up."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import bentoml

from image_classifier import model_store
from image_classifier.core.classifier import CARD_FILE, Classifier, ModelLoadError
from image_classifier.core.model_card import ModelCard
from image_classifier.serving.release_record import DEFAULT_MODEL_TAG, read_record, record_path

# BentoML's rule for a tag's name and its version (bentoml/_internal/tag.py), upper case lowered.
_TAG_PART = re.compile(r"[a-z0-9]([-._a-z0-9]*[a-z0-9])?")
_TAG_PART_MAX = 63

_VERSIONED = ("torch", "onnx", "onnxruntime", "numpy", "pillow", "scikit-learn", "bentoml")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def already_saved(tag: str, force: bool, say: Callable[[str], None]) -> bool:
    """True (and says so) when `tag` is stored and stays. With `force`, False: `save_to_store`
    replaces the entry once the new model is built and checked, so a failed build or gate
    leaves the old one (it may be the one served)."""
    if model_store.find(tag) is None or force:
        return False
    say(f"{tag} is already in the model store (use --force to replace it)")
    return True


def new_tag(
    name: str, version: str | None, flags: tuple[str, str] = ("--name", "--version")
) -> str:
    """`name:version` for a new entry, checked before any work: BentoML refuses a bad one only
    when saving, with `Invalid Tag my model:v1`, which says neither which part nor what fits."""
    for flag, value in zip(flags, (name, version), strict=True):
        if value and not (len(value) <= _TAG_PART_MAX and _TAG_PART.fullmatch(value.lower())):
            raise ValueError(
                f"{flag} {value!r}: may hold only a-z, 0-9, '_', '-' and '.' (no spaces), "
                f"starting and ending with a letter or digit, at most {_TAG_PART_MAX} characters "
                "(upper case is stored lower case)"
            )
    return f"{name}:{version}" if version else name


def load_card(tag: str) -> ModelCard:
    return ModelCard.model_validate(bentoml.models.get(tag).info.metadata["card"])


def save_to_store(onnx_path: Path, card: ModelCard, tag: str) -> str:
    """The ONNX file and card.json in a new store entry (replacing one of the same tag: callers
    ask `already_saved` first); the card also goes in the metadata."""
    if model_store.find(tag) is not None:
        bentoml.models.delete(tag)
    card_json = card.model_dump(mode="json", exclude_none=True)  # the store refuses None values
    labels = {"source": card.source, "task": card.task}
    with bentoml.models.create(tag, labels=labels, metadata={"card": card_json}) as model:
        target = Path(model.path)
        shutil.copyfile(onnx_path, target / card.onnx_file)
        (target / CARD_FILE).write_text(card.model_dump_json(indent=2))
    return str(model.tag)


def stored_tag(tag: str) -> str:
    """The store's own spelling of `tag` (`name:latest` resolved, upper case lowered): what a
    record or a saved evaluation must name, for the server and the other commands to find it."""
    if ":" not in tag:
        raise ValueError(f"give a full tag, name:version (got {tag!r})")
    model = model_store.find(tag)
    if model is None:
        raise ValueError(f"{tag} is not in the model store")
    return str(model.tag)


def stored_classifier(tag: str, max_batch: int = 32) -> tuple[Classifier, Path]:
    """The stored model, loaded exactly as the service loads it (same options); and its folder."""
    from image_classifier.serving.settings import Settings

    if ":" not in tag:
        raise ValueError(f"give a full tag, name:version (got {tag!r})")
    model = model_store.find(tag)
    if model is None:
        raise ValueError(f"{tag} is not in the model store")
    options = replace(Settings.from_env({}).classifier_options(), max_batch=max_batch)
    try:
        return Classifier(Path(model.path), options), Path(model.path)
    except ModelLoadError as exc:
        raise ValueError(f"{tag} cannot be loaded: {exc}") from None


def served_tag_unless_default() -> str | None:
    """The served tag (MODEL_TAG, else served_model.json), or None when it is the default model.
    `make serve` and `make build` train the default only when it is served: a user serving their
    own model neither waits for nor needs torch for one they do not serve."""
    served = os.environ.get("MODEL_TAG", "").strip() or read_record(record_path()).model_tag
    name = DEFAULT_MODEL_TAG.split(":")[0]
    return None if served in (DEFAULT_MODEL_TAG, name, f"{name}:latest") else served
