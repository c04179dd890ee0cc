"""`python -m training_export models ...`: the versions in the store, and which one is served.

Every version stays in the store with its card; `served_model.json` (see
`image_classifier.serving.release_record`) names the served one. Promote and roll back change
only that record, after checking the version really loads and answers; the service reads it at
start, so a change takes effect on the next restart (or rollout). Promote also refuses a version
whose last saved evaluation (`evaluate --save`) is worse than the served version's on the same
pictures, unless forced: a number, not a hunch, decides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import bentoml

from image_classifier import model_store
from image_classifier.core.classifier import Classifier
from image_classifier.core.model_card import ModelCard
from image_classifier.serving.evaluation_record import (
    EvaluationRecord,
    SavedEvaluation,
    evaluated_card,
    evaluations_path,
    file_sha256,
    read_evaluations,
)
from image_classifier.serving.release_record import (
    ReleaseRecord,
    read_record,
    record_path,
    write_record,
)
from image_classifier.serving.settings import Settings

RESTART_NOTE = "restart the service (or roll out) to apply"


class VersionError(RuntimeError):
    """The request cannot be carried out; nothing was changed."""


def _card_of(model: bentoml.Model) -> ModelCard | None:
    card = model.info.metadata.get("card")
    return ModelCard.model_validate(card) if isinstance(card, dict) else None


def _get(tag: str) -> bentoml.Model:
    if ":" not in tag:
        raise VersionError(f"give a full tag, name:version (got {tag!r})")
    model = model_store.find(tag)
    if model is None:
        raise VersionError(f"{tag} is not in the model store")
    return model


def list_versions(record: ReleaseRecord, name: str | None = None) -> list[dict]:
    """Classifier versions in the store (those with a card), oldest first, with their role and
    accuracy as served: the latest saved evaluation's, else the card's own."""
    evaluations = read_evaluations(evaluations_path())
    rows = []
    for model in bentoml.models.list(name):
        card = _card_of(model)
        if card is None:
            continue
        tag = str(model.tag)
        role = (
            "served" if tag == record.model_tag
            else "candidate" if tag == record.candidate_tag
            else "previous" if tag in record.history
            else ""
        )  # fmt: skip
        rows.append({
            "tag": tag,
            "created": model.info.creation_time.strftime("%Y-%m-%d %H:%M"),
            "source": card.source + (" (benchmark only)" if card.benchmark_only else ""),
            "accuracy": evaluated_card(card, tag, Path(model.path), evaluations).metrics.accuracy,
            "role": role,
        })  # fmt: skip
    return sorted(rows, key=lambda row: (row["created"], row["tag"]))


def check_servable(tag: str) -> ModelCard:
    """Load it as the service would and run a warm-up: never promote what cannot answer."""
    model = _get(tag)
    try:
        classifier = Classifier(Path(model.path), Settings.from_env({}).classifier_options())
        classifier.warm_up()
    except Exception as exc:
        raise VersionError(f"{tag} cannot be served: {exc}") from None
    return classifier.card


def promote(
    record: ReleaseRecord, tag: str, force: bool = False, say: Callable[[str], None] = print
) -> ReleaseRecord:
    check_servable(tag)
    if tag == record.model_tag:
        raise VersionError(f"{tag} is already the served version")
    candidate = None if record.candidate_tag == tag else record.candidate_tag
    if candidate and (clash := model_store.version_clash(tag, candidate)):
        raise VersionError(f"{clash} Or clear it first: models candidate --clear")
    worse = worse_than_served(tag, record.model_tag, say)
    if worse and not force:
        raise VersionError(f"{worse}; pass --force to promote it anyway")
    if worse:
        say(f"promoted anyway (--force): {worse}")
    return ReleaseRecord(
        model_tag=tag,
        candidate_tag=candidate,
        history=[*record.history, record.model_tag],
    )


def _evaluations_of(tag: str, record: EvaluationRecord) -> tuple[list[SavedEvaluation], str]:
    """The saved evaluations of the file now stored under `tag`, and that file's sha256."""
    model = model_store.find(tag)
    card = _card_of(model) if model is not None else None
    if card is None or tag not in record.evaluations:
        return [], ""
    digest = file_sha256(Path(model.path) / card.onnx_file)
    return [e for e in record.evaluations[tag] if e.model_sha256 == digest], digest


def worse_than_served(candidate: str, served: str, say: Callable[[str], None]) -> str | None:
    """Why the candidate's last saved evaluation is worse than the served version's on the same
    pictures (or cannot be compared once both were evaluated); None when it may go."""
    if other_labels := _other_labels(candidate, served):
        # No picture folder fits both, so no accuracy compares them: said, never refused (the
        # first promote of one's own model over the default digits is this, evaluated or not).
        say(f"{other_labels}: not compared; clients that map labels must expect the new ones")
        return None
    record = read_evaluations(evaluations_path())
    ours, _ = _evaluations_of(candidate, record)
    theirs, digest = _evaluations_of(served, record)
    if not ours or not theirs:
        missing = candidate if not ours else served
        say(f"note: {missing} has no saved evaluation (evaluate --save): not compared")
        return None
    last = ours[-1]
    same = record.on_images(served, digest, last.images_sha256)
    if same is None:
        return (
            f"{candidate} was last evaluated on {last.images}, and the served {served} never on "
            f"those pictures: run `evaluate {served} --images {last.images} --save`"
        )
    if last.accuracy < same.accuracy:
        return (
            f"{candidate} is worse than the served {served} on {last.images}: accuracy "
            f"{last.accuracy:.4f} vs {same.accuracy:.4f} "
            f"({(same.accuracy - last.accuracy) * 100:.2f} points lower)"
        )
    say(
        f"{candidate}: accuracy {last.accuracy:.4f} on {last.images}; "
        f"served {served}: {same.accuracy:.4f}"
    )
    return None


def _other_labels(candidate: str, served: str) -> str | None:
    """A note when the two versions answer different label sets, or None."""
    cards = [
        _card_of(model) if (model := model_store.find(tag)) else None for tag in (candidate, served)
    ]
    if not (cards[0] and cards[1]) or set(cards[0].labels) == set(cards[1].labels):
        return None
    return (
        f"note: {candidate} answers other labels than the served {served} "
        f"({len(cards[0].labels)} vs {len(cards[1].labels)})"
    )


def rollback(record: ReleaseRecord, say: Callable[[str], None] = print) -> ReleaseRecord:
    """Back to the latest earlier version still in the store that can be served, checked as
    `promote` checks (one deleted or broken since is skipped, and said: a rollback is what an
    operator runs when things are already going wrong)."""
    history = list(record.history)
    while history:
        previous = history.pop()
        if model_store.find(previous) is None:
            say(f"note: {previous} is not in the model store (deleted, or never here): skipped")
            continue
        try:
            check_servable(previous)
            break
        except VersionError as refused:
            say(f"note: {refused}: skipped")
    else:
        raise VersionError("no earlier served version is recorded: nothing to roll back to")
    candidate = None if record.candidate_tag == previous else record.candidate_tag
    return ReleaseRecord(model_tag=previous, candidate_tag=candidate, history=history)


def set_candidate(
    record: ReleaseRecord, tag: str | None, say: Callable[[str], None] = print
) -> ReleaseRecord:
    if tag is not None:
        check_servable(tag)
        if tag == record.model_tag:
            raise VersionError(f"{tag} is the served version; a candidate must differ")
        if clash := model_store.version_clash(record.model_tag, tag):
            raise VersionError(clash)
        if other_labels := _other_labels(tag, record.model_tag):
            # Allowed (a new label set is tried this way), but its canary answers and shadow
            # agreement then speak of other labels than the served version's.
            say(
                f"{other_labels}: its canary answers carry its labels, and shadow agreement "
                "compares labels that differ"
            )
    return record.model_copy(update={"candidate_tag": tag})


def run(args, say: Callable[[str], None] = print) -> None:  # noqa: ANN001 - argparse namespace
    path = record_path()
    record = read_record(path)
    action = args.models_command
    if getattr(args, "tag", None):  # the store's own spelling, as the record and server need it:
        args.tag = str(_get(args.tag).tag)  # `name:latest` resolved, upper case lowered
    if action == "list":
        rows = list_versions(record, args.name)
        say(f"{'tag':<32} {'created':<17} {'source':<26} {'accuracy':>8}  role")
        for row in rows:
            accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
            say(f"{row['tag']:<32} {row['created']:<17} {row['source']:<26} {accuracy:>8}  "
                f"{row['role']}")  # fmt: skip
        say(f"(record: {path})")
        return
    if action == "show":
        model = _get(args.tag)
        card = _card_of(model)
        say(json.dumps({
            "tag": str(model.tag),
            "path": model.path,
            "created": model.info.creation_time.isoformat(),
            "labels": model.info.labels,
            "card": card.model_dump(mode="json") if card else None,
            "saved_evaluations": [e.model_dump() for e in _evaluations_of(
                args.tag, read_evaluations(evaluations_path()))[0]],
        }, indent=2))  # fmt: skip
        return
    if action == "promote":
        updated = promote(record, args.tag, force=args.force, say=say)
        message = f"served version: {record.model_tag} -> {updated.model_tag}"
    elif action == "rollback":
        updated = rollback(record, say)
        message = f"rolled back: {record.model_tag} -> {updated.model_tag}"
    else:  # candidate
        updated = set_candidate(record, None if args.clear else args.tag, say)
        message = f"candidate: {record.candidate_tag} -> {updated.candidate_tag}"
    write_record(path, updated)
    say(f"{message} (written to {path}); {RESTART_NOTE}")
