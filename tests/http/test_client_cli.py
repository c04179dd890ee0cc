"""The batch command, `python -m client classify`, run as a subprocess against real servers."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtest.servers import REPO, free_port, serve
from tests.http.responses import metric_value

MODEL_VERSION = "digits-cnn:v1"


@dataclass
class Tree:
    root: Path
    truth: dict[str, str]  # image path -> true label
    broken: str  # a text file named .jpg

    @property
    def pngs(self) -> list[str]:
        return [path for path in self.truth if path.endswith(".png")]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, heldout) -> Tree:
    """The held-out digits in nested folders: PNGs, some JPEGs with upper-case extensions, a
    text file posing as a JPEG, and a .txt the command must not pick up."""
    root = tmp_path_factory.mktemp("cli") / "photos"
    truth = {}
    for i, (image, label) in enumerate(heldout):
        folder = root / f"box-{i % 3}" / ("scans" if i % 2 else "camera")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"digit-{i:03d}.png")
        truth[str(folder / f"digit-{i:03d}.png")] = str(label)
        if i % 15 == 0:
            jpeg = folder / f"photo-{i:03d}.{'JPG' if i % 2 else 'JPEG'}"
            image.convert("RGB").save(jpeg, "JPEG", quality=90)
            truth[str(jpeg)] = str(label)
    broken = root / "box-0" / "broken.jpg"
    broken.write_text("this is not a picture")
    (root / "box-1" / "notes.txt").write_text("not an image either, and not even named like one")
    return Tree(root, truth, str(broken))


def classify(folder: Path, out: Path, url: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", "classify", str(folder), "--out", str(out),
         "--url", url, *options],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def records(out: Path) -> list[dict]:
    """The output's JSON lines (a torn line, left on purpose by a test, is not one)."""
    lines = out.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]


def images_seen(url: str) -> float:
    """Images the server has classified or refused inside batches, from its own metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric_value(text, "image_classifier_predictions_total") + metric_value(
        text, "image_classifier_batch_item_errors_total"
    )


def summary_counts(stdout: str) -> dict[str, int]:
    """The numbers in the command's summary: ok, failed, sent, skipped, retries."""
    found = re.search(
        r"(?P<ok>\d+) ok, (?P<failed>\d+) failed.*\n"
        r"sent (?P<sent>\d+) images .*skipped (?P<skipped>\d+) .*retries: (?P<retries>\d+)",
        stdout,
    )
    assert found, stdout
    return {name: int(value) for name, value in found.groupdict().items()}


@pytest.fixture(scope="module")
def first_run(server, tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("first-run") / "results.jsonl"
    seen = images_seen(server.url)
    run = classify(tree.root, out, server.url, "--csv", str(out.with_suffix(".csv")))
    return run, out, images_seen(server.url) - seen


def test_classifies_every_image_once(first_run, tree):
    run, out, sent = first_run
    assert run.returncode == 1, run.stderr  # the broken file failed
    results = records(out)
    by_path = {r["path"]: r for r in results}
    assert len(by_path) == len(results), "a path was written twice"
    assert set(by_path) == {*tree.truth, tree.broken}  # upper-case extensions in, .txt out
    assert sent == len(by_path)
    assert by_path[tree.broken]["error"] == "UNSUPPORTED_MEDIA_TYPE"
    assert by_path[tree.broken]["message"]
    correct = [by_path[p]["label"] == tree.truth[p] for p in tree.pngs]
    assert np.mean(correct) >= 0.97
    for path in tree.truth:
        assert by_path[path]["model_version"] == MODEL_VERSION
        assert by_path[path]["grade"] in {"high", "medium", "low"}
        assert 0 < by_path[path]["confidence"] <= 1
    assert run.stdout.startswith(f"{len(tree.truth)} ok, 1 failed (UNSUPPORTED_MEDIA_TYPE: 1)\n")
    assert summary_counts(run.stdout)["sent"] == len(by_path)


def test_csv_has_the_same_records(first_run):
    _, out, _ = first_run
    with out.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [r["path"] for r in records(out)]
    for row, record in zip(rows, records(out), strict=True):
        expected = {key: str(value) for key, value in record.items()}
        assert {key: value for key, value in row.items() if value} == expected


def test_a_second_run_sends_nothing(server, first_run, tree):
    _, out, _ = first_run
    before = out.read_text()
    seen = images_seen(server.url)
    run = classify(tree.root, out, server.url)
    assert run.returncode == 1  # the outcome for the folder: the broken file is still failed
    assert out.read_text() == before
    assert images_seen(server.url) == seen
    counts = summary_counts(run.stdout)
    assert counts["sent"] == 0
    assert counts["skipped"] == len(tree.truth) + 1
    assert (counts["ok"], counts["failed"]) == (len(tree.truth), 1)


def test_resume_sends_only_what_is_missing(server, first_run, tree, tmp_path):
    """An interrupted run: some lines written, the last one torn in half."""
    _, complete, _ = first_run
    lines = complete.read_text().splitlines(keepends=True)
    kept = 100
    out = tmp_path / "results.jsonl"
    out.write_text("".join(lines[:kept]) + lines[kept][:20])
    seen = images_seen(server.url)
    run = classify(tree.root, out, server.url)
    assert run.returncode == 1, run.stderr
    missing = len(lines) - kept  # the torn line's image is sent again too
    assert summary_counts(run.stdout)["sent"] == missing
    assert images_seen(server.url) - seen == missing
    assert outcomes(out) == outcomes(complete)
    assert len(records(out)) == len(lines)  # every path once


def outcomes(out: Path) -> dict[str, str]:
    """Each path's label or error code (confidences may differ in the last digits by batch)."""
    return {r["path"]: r.get("label", r.get("error")) for r in records(out)}


def test_usage_errors_and_no_server_exit_2(tree, tmp_path):
    out = tmp_path / "results.jsonl"
    no_server = classify(tree.root, out, f"http://127.0.0.1:{free_port()}")
    assert no_server.returncode == 2
    assert "UNREACHABLE" in no_server.stderr
    assert classify(tmp_path / "no-such-folder", out, "http://127.0.0.1:1").returncode == 2
    assert classify(tree.root, out, "http://127.0.0.1:1", "--batch-size", "0").returncode == 2
    assert not out.exists()


def test_files_that_cannot_be_read_fail_alone_and_any_file_name_is_sent(server, tree, tmp_path):
    """Found by a black-box review: a file that could not be read (or was gone when its chunk
    was sent) or whose name is not UTF-8 ended the whole run with a traceback, a link to nothing
    was skipped with exit 0, --top-k changed nothing in the output, and the same folder named
    another way was classified twice."""
    folder = tmp_path / "photos"
    copy_pngs(tree, 3, folder)
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/\xff\xfe.png"))  # not UTF-8
    odd.write_bytes(Path(tree.pngs[3]).read_bytes())
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    out = tmp_path / "results.jsonl"
    relative = os.path.relpath(folder, REPO)  # classify() runs in the repository
    run = classify(
        Path(relative), out, server.url, "--top-k", "2", "--csv", str(tmp_path / "r.csv")
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stdout.startswith("4 ok, 1 failed (UNREADABLE: 1)\n"), run.stdout
    by_path = {r["path"]: r for r in records(out)}
    assert by_path[os.path.join(relative, "gone.png")]["error"] == "UNREADABLE"
    named_oddly = by_path[os.path.join(relative, odd.name)]
    assert named_oddly["label"] and len(named_oddly["top_k"]) == 2
    assert (tmp_path / "r.csv").read_bytes().count(b"\xff\xfe.png") == 1  # the name as it was
    again = classify(folder, out, server.url)  # the absolute path: the same files
    assert summary_counts(again.stdout)["sent"] == 0, again.stdout


def test_bad_output_files_urls_and_top_k_are_usage_errors(server, tree, tmp_path):
    """Each was a traceback (exit 1), or every chunk refused with the reason hidden."""
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("[1, 2]\n")
    for out, url, options, says in [
        (tmp_path, server.url, (), "is a folder"),
        (foreign, server.url, (), "not a result of this command"),
        (tmp_path / "r.jsonl", "http://127.0.0.1:abc", (), "INVALID_URL"),
        (tmp_path / "r.jsonl", "http://user:secret-77@127.0.0.1:1", (), "UNREACHABLE"),
        (tmp_path / "r.jsonl", server.url, ("--top-k", "11"), "the model has 10 labels"),
    ]:
        run = classify(tree.root, out, url, *options)
        assert run.returncode == 2 and says in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and "secret-77" not in run.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_sigterm_ends_the_run_like_ctrl_c(server, tree, tmp_path):
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "client", "classify", str(tree.root), "--out", str(out),
               "--url", server.url, "--batch-size", "1", "--concurrency", "1"]  # fmt: skip
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 128 + signal.SIGTERM
    assert f"what came back is in {out}; run again to resume" in stderr.decode()
    assert 0 < len(records(out)) < len(tree.truth) + 1


# A server that refuses more than 2 requests a second, 5 images or 12,000 bytes a batch, and
# 8,000 bytes a file: the command must size its chunks to fit and wait out the 429s. One worker:
# the rate limit is per worker.
LIMITED = {
    "WORKERS": "1",
    "RATE_LIMIT": "2/second",
    "MAX_BATCH_IMAGES": "5",
    "MAX_BATCH_BYTES": "12000",
    "MAX_UPLOAD_BYTES": "8000",
}


@pytest.fixture(scope="module")
def limited_server(trained_store, artifacts):
    with serve(trained_store, artifacts / "server-limited.log", env=LIMITED) as running:
        yield running


def copy_pngs(tree: Tree, count: int, folder: Path) -> dict[str, str]:
    """The first `count` PNGs of the tree in `folder`, with their labels."""
    folder.mkdir()
    truth = {}
    for source in tree.pngs[:count]:
        target = folder / Path(source).name
        target.write_bytes(Path(source).read_bytes())
        truth[str(target)] = tree.truth[source]
    return truth


def test_rate_limited_run_retries_and_completes(limited_server, tree, tmp_path):
    truth = copy_pngs(tree, 40, tmp_path / "photos")
    out = tmp_path / "results.jsonl"
    seen = images_seen(limited_server.url)
    run = classify(tmp_path / "photos", out, limited_server.url, "--concurrency", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    counts = summary_counts(run.stdout)
    assert (counts["ok"], counts["failed"], counts["sent"]) == (40, 0, 40)
    assert counts["retries"] > 0
    assert f"(RATE_LIMITED: {counts['retries']})" in run.stdout
    results = records(out)
    assert sorted(r["path"] for r in results) == sorted(truth)
    assert all("label" in r for r in results)
    assert images_seen(limited_server.url) - seen == 40  # no image refused inside a batch


def test_file_over_the_upload_limit_is_recorded_unsent(limited_server, tree, tmp_path):
    truth = copy_pngs(tree, 3, tmp_path / "photos")
    noise = np.random.default_rng(0).integers(0, 256, (120, 120), dtype=np.uint8)
    big = tmp_path / "photos" / "big.png"
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > int(LIMITED["MAX_UPLOAD_BYTES"])
    out = tmp_path / "results.jsonl"
    seen = images_seen(limited_server.url)
    run = classify(tmp_path / "photos", out, limited_server.url)
    assert run.returncode == 1, run.stderr
    assert run.stdout.startswith("3 ok, 1 failed (PAYLOAD_TOO_LARGE: 1)\n")
    by_path = {r["path"]: r for r in records(out)}
    assert by_path[str(big)]["error"] == "PAYLOAD_TOO_LARGE"
    assert all("label" in by_path[p] for p in truth)
    assert summary_counts(run.stdout)["sent"] == 3
    assert images_seen(limited_server.url) - seen == 3
