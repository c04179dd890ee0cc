"""The BentoML model store, asked one way: `find(tag)` (the service at start, the training tools).

Beside the floors, not in them: it is the one module here, besides `service.py`, that talks to
BentoML, and the core stays free of it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from .core.classifier import CARD_FILE
from .serving.release_record import DEFAULT_RECORD_PATH, RECORD_ENV, ReleaseRecord, write_record
from .serving.settings import Settings, start_refused

MODEL_HELP = (
    "Run `python -m training_export ensure-default` for the default model, or "
    "`python -m training_export import-onnx` for your own, then start again."
)


def find(tag: str) -> bentoml.Model | None:
    """The stored model, or None when the store has no such tag."""
    try:
        return bentoml.models.get(tag)
    except NotFound:
        return None


def served(tag: str, variable: str = "MODEL_TAG") -> bentoml.models.BentoModel | None:
    """The model for the service class to pin (None for an empty tag). A missing model stops the
    start with one line saying what to run, not a stack trace; `variable` names the tag's."""
    if not tag:
        return None
    stored = find(tag)
    if stored is None:
        raise start_refused(
            f"model {tag} is not in the BentoML model store{_held(tag, variable)}. {MODEL_HELP}"
        )
    if not (Path(stored.path) / CARD_FILE).is_file():  # the workers would wait unready for ever
        raise start_refused(
            f"model {stored.tag} has no model card ({CARD_FILE}): it was not saved by "
            f"training_export, so it cannot be served. {MODEL_HELP}"
        )
    return bentoml.models.BentoModel(str(stored.tag))  # resolved: a name alone is a version now


def _held(tag: str, variable: str) -> str:
    """The versions of that name the store holds, if any: a bento holds only the version it was
    built with (MODEL_TAG at `bentoml build`), which its served_model.json may not name."""
    try:
        versions = [str(model.tag) for model in bentoml.models.list(tag.split(":")[0])]
    except (NotFound, ValueError):
        versions = []
    return f" (it holds {', '.join(sorted(versions))}: set {variable} to one)" if versions else ""


def served_pair(
    model_tag: str, candidate_tag: str
) -> tuple[bentoml.models.BentoModel | None, bentoml.models.BentoModel | None]:
    """The served model and its optional candidate, refused at start when they clash."""
    model, candidate = served(model_tag), served(candidate_tag, "CANDIDATE_MODEL_TAG")
    if model and candidate and (clash := version_clash(str(model.tag), str(candidate.tag))):
        raise start_refused(clash)
    return model, candidate


def version_clash(served_tag: str, candidate_tag: str) -> str | None:
    """Why these two cannot be served side by side, or None. Answers, pins (X-Model-Version),
    metrics and drift name a model by its version alone, so two versions must differ."""
    served_version, candidate_version = served_tag.split(":")[-1], candidate_tag.split(":")[-1]
    if served_version != candidate_version:
        return None
    return (
        f"the candidate {candidate_tag} has the same version as the served {served_tag}: answers, "
        f"pins (X-Model-Version), metrics and drift name a model by its version, so they must "
        f"differ. Import the candidate under another version (import-onnx --version ...)."
    )


def pin_for_workers(settings: Settings) -> None:
    """In the arbiter, before any worker starts: every worker, a replacement too, serves the
    versions resolved now. Each worker reads its settings itself, so a `models promote` (or a
    newer import under a bare `name`) while the server runs reached the worker that replaced a
    dead one, and one server answered with two versions. The workers read a copy of the record
    (and of the saved evaluations beside it) made now, and MODEL_TAG names the version."""
    snapshot = Path(tempfile.mkdtemp(prefix="image-classifier-served-"))
    atexit.register(shutil.rmtree, snapshot, ignore_errors=True)
    evaluations = settings.evaluations_file
    if evaluations.is_file():
        shutil.copy(evaluations, snapshot / evaluations.name)
    # Checked here on the resolved versions: a worker that refused them would be respawned for ever.
    model, candidate = served_pair(settings.model_tag, settings.candidate_model_tag)
    model_tag, candidate_tag = (str(m.tag) if m else None for m in (model, candidate))
    record = snapshot / DEFAULT_RECORD_PATH.name
    write_record(record, ReleaseRecord(model_tag=model_tag, candidate_tag=candidate_tag))
    os.environ[RECORD_ENV] = str(record)
    os.environ["MODEL_TAG"] = model_tag
    os.environ["CANDIDATE_MODEL_TAG"] = candidate_tag or ""  # resolved; blank: none
