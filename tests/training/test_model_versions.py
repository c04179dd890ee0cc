"""Rollout and rollback end to end: the models CLI changes the record, a restart serves it."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from image_classifier.serving.release_record import ReleaseRecord, read_record, write_record
from loadtest.servers import serve
from tests.model_store import import_model, store_model_dir, training_cli
from tests.onnx_models import build_onnx_classifier
from tests.pictures import encode


def served_version(server, image) -> tuple[str, str]:
    files = {"image": ("digit.png", encode(image, "PNG"), "image/png")}
    response = httpx.post(f"{server.url}/analyze", files=files, timeout=30)
    assert response.status_code == 200, response.text
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["model"]["version"] == response.json()["model"]["version"]
    return response.json()["model"]["version"], response.headers["x-model-version"]


def test_promote_then_roll_back_with_a_restart_each(
    trained_store, second_version, heldout, artifacts, tmp_path
):
    record = tmp_path / "served_model.json"
    env = {"SERVED_MODEL_FILE": str(record)}
    cli = {"home": trained_store, "extra_env": env}
    image = heldout[3][0]

    with serve(trained_store, artifacts / "versions-1.log", env=env) as server:
        assert served_version(server, image) == ("v1", "v1")  # no record yet: the default

    # As typed, in upper case: the record names the store's own tag (it was written as typed,
    # and neither `models list` nor saved evaluations matched it; `name:latest` alike).
    promoted = training_cli("models", "promote", second_version.upper(), **cli)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert read_record(record).model_tag == second_version
    listing = training_cli("models", "list", "digits-cnn", **cli).stdout
    assert "digits-cnn:v2" in listing and "served" in listing and "previous" in listing
    with serve(trained_store, artifacts / "versions-2.log", env=env) as server:
        assert served_version(server, image) == ("v2", "v2")

    rolled_back = training_cli("models", "rollback", **cli)
    assert rolled_back.returncode == 0, rolled_back.stdout + rolled_back.stderr
    assert "digits-cnn:v2 -> digits-cnn:v1" in rolled_back.stdout
    with serve(trained_store, artifacts / "versions-3.log", env=env) as server:
        assert served_version(server, image) == ("v1", "v1")

    nothing_left = training_cli("models", "rollback", **cli)
    assert nothing_left.returncode == 1 and "nothing to roll back" in nothing_left.stderr


def test_promote_refuses_what_cannot_be_served_and_changes_nothing(trained_store, tmp_path):
    record = tmp_path / "served_model.json"
    cli = {"home": trained_store, "extra_env": {"SERVED_MODEL_FILE": str(record)}}
    missing = training_cli("models", "promote", "digits-cnn:v404", **cli)
    assert missing.returncode == 1 and "not in the model store" in missing.stderr
    untagged = training_cli("models", "promote", "digits-cnn", **cli)
    assert untagged.returncode == 1 and "name:version" in untagged.stderr
    home = tmp_path / "home"
    stored = import_model(home, build_onnx_classifier(tmp_path / "m"), "broken:v2")
    (stored / "model.onnx").write_bytes(b"truncated")
    broken = training_cli("models", "promote", "broken:v2", home=home, extra_env=cli["extra_env"])
    assert broken.returncode == 1 and "cannot be served" in broken.stderr
    assert not record.exists()


def test_show_prints_the_card(trained_store, second_version):
    shown = training_cli("models", "show", second_version, home=trained_store)
    assert shown.returncode == 0, shown.stderr
    card = json.loads(shown.stdout)["card"]
    assert card["labels"] == [str(d) for d in range(10)] and card["metrics"]["accuracy"] > 0.95


def test_a_candidate_or_promotion_that_would_share_the_served_version_is_refused(tmp_path):
    """Two models both `v1` side by side would mix up answers, pins and metrics."""
    home, record = tmp_path / "home", tmp_path / "served_model.json"
    for tag in ("first:v1", "first:v2", "second:v1", "second:v2"):
        import_model(home, build_onnx_classifier(tmp_path / tag.replace(":", "-")), tag)
    cli = {"home": home, "extra_env": {"SERVED_MODEL_FILE": str(record)}}
    assert training_cli("models", "promote", "first:v1", **cli).returncode == 0
    clash = training_cli("models", "candidate", "second:v1", **cli)
    assert clash.returncode == 1 and "same version as the served first:v1" in clash.stderr
    assert read_record(record).candidate_tag is None
    assert training_cli("models", "candidate", "second:v2", **cli).returncode == 0
    clash = training_cli("models", "promote", "first:v2", **cli)
    assert clash.returncode == 1 and "candidate second:v2 has the same version" in clash.stderr
    assert read_record(record).model_tag == "first:v1"


def test_rollback_skips_versions_deleted_or_broken_since(tmp_path):
    """A deleted previous version stopped every rollback ("not in the model store"), with no way
    back but promote; a broken one was rolled back to without the check promote makes, and the
    restart served nothing (a review). Both are skipped, and said."""
    home, record = tmp_path / "home", tmp_path / "served_model.json"
    for tag in ("m:v1", "m:v2", "m:v3"):
        import_model(home, build_onnx_classifier(tmp_path / tag.replace(":", "-")), tag)
    (store_model_dir(home, "m:v2") / "model.onnx").write_bytes(b"truncated")
    write_record(record, ReleaseRecord(model_tag="m:v3", history=["m:v1", "m:v2", "m:v4"]))
    cli = {"home": home, "extra_env": {"SERVED_MODEL_FILE": str(record)}}
    rolled_back = training_cli("models", "rollback", **cli)
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert "m:v4 is not in the model store (deleted, or never here): skipped" in rolled_back.stdout
    assert "m:v2 cannot be served" in rolled_back.stdout
    assert (read_record(record).model_tag, read_record(record).history) == ("m:v1", [])
    write_record(record, ReleaseRecord(model_tag="m:v3", history=["m:v2"]))
    nothing = training_cli("models", "rollback", **cli)
    assert nothing.returncode == 1 and "nothing to roll back" in nothing.stderr
    assert read_record(record).model_tag == "m:v3"


def test_list_shows_the_latest_saved_evaluation_accuracy(
    own_tag, own_model, bentoml_home, tmp_path
):
    """`models list` showed "-" for a version whose figures `evaluate --save` had saved (and that
    promote and /info use), as its card holds none (found by a black-box review)."""
    cli = {"home": bentoml_home, "extra_env": {"SERVED_MODEL_FILE": str(tmp_path / "served.json")}}
    images = tmp_path / "labelled"
    shutil.copytree(own_model / "pictures" / "labelled", images)
    for picture in sorted((images / "red things").glob("*.*"))[:4]:  # 4 of 60 filed wrongly
        picture.rename(images / "blue things" / picture.name)
    for folder in (own_model / "pictures" / "labelled", images):  # 1.0, then 56/60: the latest
        saved = training_cli("evaluate", own_tag, "--images", str(folder), "--save", "--report",
                             str(tmp_path / "report"), **cli)  # fmt: skip
        assert saved.returncode == 0, saved.stderr
    listing = training_cli("models", "list", own_tag.split(":")[0], **cli)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(own_tag))
    assert row.split()[-1] == f"{56 / 60:.4f}", listing.stdout


@pytest.mark.parametrize(
    ("model_tag", "record_tag", "trains"),
    [("my-model:v1", None, False), ("", "my-model:v1", False), ("", None, True)],
    ids=["MODEL_TAG", "record", "default served"],
)
def test_make_serve_trains_the_default_only_when_it_is_served(
    trained_store, tmp_path, model_tag, record_tag, trains
):
    """`make serve` runs ensure-served: serving your own model trained the default first (minutes,
    and torch) even though nothing would serve it. An empty store shows whether it would train."""
    record = tmp_path / "served_model.json"
    if record_tag:
        record.write_text(ReleaseRecord(model_tag=record_tag).model_dump_json())
    env = {"MODEL_TAG": model_tag, "SERVED_MODEL_FILE": str(record)}
    if trains:  # the default is already in this store: it is found there, not trained again
        result = training_cli("ensure-served", home=trained_store, extra_env=env)
        assert result.returncode == 0 and "already in the model store" in result.stdout
        return
    empty = tmp_path / "home"
    result = training_cli("ensure-served", home=empty, extra_env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "serving my-model:v1: the default model is not needed\n"
    assert not (empty / "models").exists() or not any((empty / "models").iterdir())


def test_a_candidate_or_promote_to_other_labels_says_so_and_is_never_refused(tmp_path):
    """No folder of pictures fits two label sets: it was refused once both were evaluated and let
    through with "no saved evaluation" otherwise; now it is always said, and never refused."""
    home, record = tmp_path / "home", tmp_path / "served_model.json"
    import_model(home, build_onnx_classifier(tmp_path / "ten"), "ten:v1")
    import_model(home, build_onnx_classifier(tmp_path / "five", labels=5), "five:v2")
    cli = {"home": home, "extra_env": {"SERVED_MODEL_FILE": str(record)}}
    assert training_cli("models", "promote", "ten:v1", **cli).returncode == 0
    tried = training_cli("models", "candidate", "five:v2", **cli)  # was accepted silently
    assert tried.returncode == 0 and read_record(record).candidate_tag == "five:v2", tried.stderr
    assert "five:v2 answers other labels than the served ten:v1 (5 vs 10)" in tried.stdout
    promoted = training_cli("models", "promote", "five:v2", **cli)
    assert promoted.returncode == 0, promoted.stderr
    assert "five:v2 answers other labels than the served ten:v1 (5 vs 10)" in promoted.stdout
    assert read_record(record).model_tag == "five:v2"
