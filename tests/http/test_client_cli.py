"""The batch command, `python -m client classify`, run as a subprocess against real servers."""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from client import ImageClassifierClient, cli
from client.errors import Overloaded, TimedOut, Unreachable
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
    """The held-out digits in nested folders: PNGs, some JPEGs with upper-case extensions, a few
    HEIC, JFIF and AVIF files, a text file posing as a JPEG, and a .txt the command must not pick
    up."""
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
        if i % 45 == 0:  # what phones and messengers save: picked up by default too
            for suffix, kind in (("heic", "HEIF"), ("jfif", "JPEG"), ("avif", "AVIF")):
                image.convert("RGB").save(folder / f"phone-{i:03d}.{suffix}", kind, quality=90)
                truth[str(folder / f"phone-{i:03d}.{suffix}")] = str(label)
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
    assert len(whole_records(out)) == len(lines)  # every path once, the torn half cut off
    # Found by a black-box review: the torn half was kept as a line of its own, so the next
    # resume refused the file ("line 101 is not a result of this command", exit 2).
    again = classify(tree.root, out, server.url)
    assert again.returncode == 1, again.stderr
    assert summary_counts(again.stdout)["sent"] == 0
    assert len(whole_records(out)) == len(lines)


def whole_records(out: Path) -> list[dict]:
    """Every line of the output as a record: none torn, none broken."""
    return [json.loads(line) for line in out.read_text().splitlines()]


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
    assert by_path[str(folder / "gone.png")]["error"] == "UNREADABLE"  # absolute, as typed or not
    named_oddly = by_path[str(odd)]
    assert named_oddly["label"] and len(named_oddly["top_k"]) == 2
    assert (tmp_path / "r.csv").read_bytes().count(b"\xff\xfe.png") == 1  # the name as it was
    with (tmp_path / "r.csv").open(newline="", errors="surrogateescape") as f:
        in_csv = {row["path"]: row for row in csv.DictReader(f)}
    # As in the output file, every digit: "label:probability" pairs could not be split back
    # when a label held a space or a colon, and rounded 0.99997 to 1.
    assert json.loads(in_csv[named_oddly["path"]]["top_k"]) == named_oddly["top_k"]
    again = classify(folder, out, server.url)  # the absolute path: the same files
    assert summary_counts(again.stdout)["sent"] == 0, again.stdout
    # Found by a black-box review: a resume started in another folder resent everything (the
    # records held the paths as typed, made absolute against the new run's folder).
    elsewhere = subprocess.run(
        [sys.executable, "-m", "client", "classify", os.path.relpath(folder, tmp_path),
         "--out", "results.jsonl", "--url", server.url],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert summary_counts(elsewhere.stdout)["sent"] == 0, elsewhere.stdout + elsewhere.stderr


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server in this process, answering with `handler`; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_bad_output_files_urls_and_top_k_are_usage_errors(server, tree, tmp_path):
    """Each was a traceback (exit 1), or every chunk refused with the reason hidden; a URL of
    another web server (`python -m http.server` here, a proxy's other site in real life) too."""
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("[1, 2]\n")
    (tmp_path / "site").mkdir()
    site = functools.partial(SimpleHTTPRequestHandler, directory=tmp_path / "site")
    with http_server(site) as foreign_url:
        cases = [
            (tmp_path, server.url, (), "is a folder"),
            (foreign, server.url, (), "not a result of this command"),
            (tmp_path / "r.jsonl", "http://127.0.0.1:abc", (), "INVALID_URL"),
            (tmp_path / "r.jsonl", "http://[::1", (), "INVALID_URL"),
            (tmp_path / "r.jsonl", foreign_url, (), "NOT_THIS_SERVICE"),
            (tmp_path / "r.jsonl", "http://user:secret-77@127.0.0.1:1", (), "UNREACHABLE"),
            (tmp_path / "r.jsonl", server.url, ("--top-k", "11"), "the model has 10 labels"),
            (tmp_path / "r.jsonl", server.url, ("--timeout", "0"), "not a positive number"),
            # The CSV replaced the results; a path under a file was a traceback at the end.
            (
                tmp_path / "r.jsonl",
                server.url,
                ("--csv", str(tmp_path / "r.jsonl")),
                "is the --out file too",
            ),
            (foreign / "r.jsonl", server.url, (), "is a file, so no file can be made"),
            (
                tmp_path / "r.jsonl",
                server.url,
                ("--csv", str(foreign / "r.csv")),
                "is a file, so no file can be made",
            ),
        ]
        for out, url, options, says in cases:
            run = classify(tree.root, out, url, *options)
            assert run.returncode == 2 and says in run.stderr, run.stderr
            assert "Traceback" not in run.stderr and "secret-77" not in run.stderr
    assert not (tmp_path / "r.jsonl").exists()


def stalling_proxy(target: str, stalled: bytes, unstalled: threading.Event):
    """A handler passing every request on to `target`, except that one whose body holds the
    bytes `stalled` gets no answer until `unstalled` is set: a batch the server is stuck on."""

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if stalled in body:
                unstalled.wait()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() == "content-type"}
            answer = httpx.request(self.command, target + self.path, content=body, headers=headers)
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers.get("content-type", "text/plain"))
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

    return Proxy


def test_a_batch_with_no_answer_in_time_fails_alone_and_is_sent_again(server, tree, tmp_path):
    """Found by a black-box review: one batch the server did not answer within the client's
    timeout ended the whole run as UNREACHABLE (exit 2), and the timeout could not be set."""
    truth = copy_pngs(tree, 4, tmp_path / "photos")
    stuck = sorted(truth)[1]
    out = tmp_path / "results.jsonl"
    unstalled = threading.Event()
    try:
        with http_server(stalling_proxy(server.url, Path(stuck).read_bytes(), unstalled)) as url:
            options = ("--timeout", "1", "--batch-size", "1", "--concurrency", "1")
            run = classify(tmp_path / "photos", out, url, *options)
    finally:
        unstalled.set()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert run.stdout.startswith("3 ok, 1 failed (TIMEOUT: 1)\n"), run.stdout
    assert "retries: 1 (TIMEOUT: 1)" in run.stdout  # tried twice
    by_path = {r["path"]: r for r in whole_records(out)}
    assert by_path[stuck]["error"] == "TIMEOUT"
    assert "no answer within 1 s" in by_path[stuck]["message"]
    assert all(by_path[path]["label"] == label for path, label in truth.items() if path != stuck)
    again = classify(tmp_path / "photos", out, server.url)  # the server answers now
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_counts(again.stdout)["sent"] == 1
    assert outcomes(out)[stuck] == truth[stuck]


@pytest.mark.parametrize(
    ("first", "then", "raised", "calls"),
    [(["503"] * 2, "timeout", TimedOut, 4), (["503"] * 7 + ["timeout"], "503", Overloaded, 9)],
    ids=["refusals-then-timeouts", "timeout-among-refusals"],
)
def test_retries_end_when_either_kind_reaches_its_limit(monkeypatch, first, then, raised, calls):
    """One count served both limits, compared with ==: once the kinds mixed it stepped past the
    limit it had to equal, and a chunk was sent again for ever (a black-box review's finding)."""
    monkeypatch.setattr(cli, "BACKOFF_BASE_S", 0.0)
    errors = {
        "503": Overloaded("OVERLOADED", "busy", status=503),
        "timeout": TimedOut("TIMEOUT", "slow"),
    }
    outcomes = iter([*first, *itertools.repeat(then, 100)])
    made = []

    def call() -> None:
        made.append(1)
        raise errors[next(outcomes)]

    with pytest.raises(raised):
        cli.with_retries(call, cli.Tally(), threading.Event())
    assert len(made) == calls  # 2 timeouts at most; 8 refusals at most


def test_a_file_gone_since_the_walk_is_planned_and_read_as_unreadable(tmp_path):
    """It crashed the run with FileNotFoundError when it went before the chunks were planned."""
    kept, gone = tmp_path / "kept.png", tmp_path / "gone.png"
    kept.write_bytes(b"x" * 10)
    limits = cli.Limits(max_upload_bytes=10_000, max_batch_bytes=100_000, max_batch_images=8)
    too_large, chunks = cli.plan_chunks([gone, kept], limits, batch_size=8)
    assert too_large == [] and chunks == [[gone, kept]]
    readable, records = cli.read_files([gone, kept])
    assert [path for path, _ in readable] == [kept]
    assert [(r["path"], r["error"]) for r in records] == [(str(gone), cli.UNREADABLE)]


def test_an_image_resent_and_not_let_in_is_counted_once(tmp_path, capsys):
    """Its earlier TIMEOUT record and this run's refusal were both counted: 6 failed of 3."""
    images = [tmp_path / f"{i}.png" for i in range(3)]
    done = {cli._key(path): cli._failure(path, cli.TIMEOUT, "no answer") for path in images}
    tally = cli.Tally(unsent=Counter({"REQUEST_TIMEOUT": 3}))
    tally.unsent_keys.update(map(cli._key, images))
    assert cli.summarise(images, done, 0, tally, 1.0, tmp_path / "out.jsonl") == 1
    assert capsys.readouterr().out.startswith("0 ok, 3 failed (REQUEST_TIMEOUT: 3)\n")


def test_a_server_gone_mid_run_is_named_by_its_url(server, tree):
    """Once connected, a refused connection said only `[Errno 111] Connection refused`."""
    with http_server(stalling_proxy(server.url, b"never", threading.Event())) as url:
        client = ImageClassifierClient(url, timeout=5)
    with pytest.raises(Unreachable) as gone:
        client.analyze(Path(tree.pngs[0]))
    assert gone.value.message.startswith(f"{url}: "), gone.value.message


def test_linked_folders_are_walked_once_and_special_files_are_recorded(server, tree, tmp_path):
    """Found by a black-box review: a linked folder was skipped, and so was a FIFO or a socket
    named like an image, silently and with exit 0."""
    folder = tmp_path / "photos"
    copy_pngs(tree, 1, folder)
    elsewhere = tmp_path / "elsewhere"
    copy_pngs(tree, 1, elsewhere)
    (folder / "again").symlink_to(elsewhere)  # walked (the first in sorted order)...
    (folder / "more").symlink_to(elsewhere)  # ...but not twice through a second link
    (folder / "loop").symlink_to(folder)  # a link back up the tree: not walked in circles
    os.mkfifo(folder / "pipe.png")  # never opened: that would block the walk
    out = tmp_path / "results.jsonl"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(folder / "socket.png"))
        run = classify(folder, out, server.url)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.startswith("2 ok, 2 failed (UNREADABLE: 2)\n"), run.stdout
    by_path = {os.path.relpath(r["path"], folder): r for r in records(out)}
    assert sorted(by_path) == ["again/digit-000.png", "digit-000.png", "pipe.png", "socket.png"]
    assert "a FIFO" in by_path["pipe.png"]["message"]
    assert "a socket" in by_path["socket.png"]["message"]
    written = out.read_text()
    again = classify(folder, out, server.url)  # the same folder, its FIFO and socket still there
    assert again.returncode == 1, again.stdout + again.stderr
    assert out.read_text() == written  # nothing new: each run appended the FIFO's record again


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
