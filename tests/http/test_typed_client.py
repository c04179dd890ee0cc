"""The typed client (client.ImageClassifierClient) against a real `bentoml serve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from client import (
    AnalyzeResult,
    BatchResult,
    ImageClassifierClient,
    InvalidInput,
    RateLimited,
    Unauthorized,
    Unreachable,
)
from loadtest.servers import REPO, free_port, serve
from tests.pictures import encode


@pytest.fixture(scope="module")
def client(server):
    with ImageClassifierClient(server.url) as client:
        yield client


@pytest.fixture(scope="module")
def digits(heldout) -> list[tuple[bytes, str]]:
    """A few held-out digits as PNG bytes, with their true labels."""
    return [(encode(image, "PNG"), str(label)) for image, label in heldout[:8]]


def test_analyze_from_a_path_and_from_bytes(client, digits, tmp_path):
    data, label = digits[0]
    path = tmp_path / "digit.png"
    path.write_bytes(data)
    from_path = client.analyze(path, top_k=2)
    from_bytes = client.analyze(data)
    assert isinstance(from_path, AnalyzeResult)
    assert from_path.prediction.label == from_bytes.prediction.label == label
    assert len(from_path.prediction.top_k) == 2
    assert len(from_bytes.prediction.top_k) == 3  # top_k=None: the server's DEFAULT_TOP_K
    assert from_path.request_id != from_bytes.request_id
    assert from_path.model.name == "digits-cnn"


def test_a_file_name_that_is_not_utf8_is_sent(client, digits, tmp_path):
    """A Latin-1 disk's `bad\xffname.png` raised a raw UnicodeEncodeError (a review's finding)."""
    data, label = digits[0]
    path = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xffname.png"))
    path.write_bytes(data)
    assert client.analyze(path).prediction.label == label
    assert client.analyze(str(path)).prediction.label == label
    batch = client.analyze_batch([path, data])
    assert [item.prediction.label for item in batch.results] == [label, label]


def test_analyze_batch_keeps_order_and_isolates_a_bad_item(client, digits):
    images = [data for data, _ in digits]
    result = client.analyze_batch([*images[:3], b"plain text, not an image", *images[3:]])
    assert isinstance(result, BatchResult)
    assert [item.index for item in result.results] == list(range(len(images) + 1))
    bad = result.results[3]
    assert not bad.success and bad.error.code == "UNSUPPORTED_MEDIA_TYPE"
    good = [item for item in result.results if item.success]
    assert [item.prediction.label for item in good] == [label for _, label in digits]


def test_top_k_none_is_not_sent(server, digits):
    """SyncHTTPClient would send an argument left at None as the form field `top_k=null`, which
    only this server's leniency reads as its default: the client leaves it out."""
    data, _ = digits[0]
    bodies = []
    with ImageClassifierClient(server.url) as fresh:
        fresh._bento.client.event_hooks["request"].append(
            lambda request: bodies.append(request.read())
        )
        fresh.analyze(data)
        fresh.analyze_batch([data, data])
        fresh.analyze(data, top_k=2)
    assert [b'name="top_k"' in body for body in bodies] == [False, False, True]


def test_info_is_typed(client):
    info = client.info()
    assert info.model.name == "digits-cnn"
    assert info.labels == [str(i) for i in range(10)]
    assert info.limits.max_batch_images == 64
    assert info.model_extra["metrics"]["accuracy"] >= 0.97  # untyped fields are kept


@pytest.mark.parametrize(
    ("call", "code", "status"),
    [
        (lambda c, tmp: c.analyze(_text_file(tmp)), "UNSUPPORTED_MEDIA_TYPE", 415),
        (lambda c, tmp: c.analyze(b"\x89PNG\r\n\x1a\n truncated"), "INVALID_IMAGE", 422),
        (lambda c, tmp: c.analyze_batch([_text_file(tmp)], top_k=99), "INVALID_REQUEST", 400),
    ],
    ids=["text-file", "truncated-png", "top-k-99"],
)
def test_refusals_raise_invalid_input_with_code_and_request_id(
    client, tmp_path, call, code, status
):
    with pytest.raises(InvalidInput) as caught:
        call(client, tmp_path)
    error = caught.value
    assert (error.code, error.status) == (code, status)
    assert re.fullmatch(r"[0-9a-f-]{36}", error.request_id), error.request_id
    assert error.message and error.retry_after is None


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not an image")
    return path


def test_tokens_and_rate_limit(trained_store, artifacts, digits):
    """No token or a wrong one is Unauthorized; a listed one works until its rate limit, then
    RateLimited carries Retry-After (a header SyncHTTPClient alone would lose)."""
    data, label = digits[0]
    env = {"API_TOKENS": "secret-1", "RATE_LIMIT": "2/minute", "WORKERS": "1"}  # limit per worker
    with serve(trained_store, artifacts / "server-tokens.log", env=env) as server:
        for token in (None, "secret-2"):
            with ImageClassifierClient(server.url, token=token) as client:
                with pytest.raises(Unauthorized) as caught:
                    client.analyze(data)
                assert (caught.value.code, caught.value.status) == ("UNAUTHORIZED", 401)
                assert caught.value.request_id
        with ImageClassifierClient(server.url, token="secret-1") as client:
            assert client.analyze(data).prediction.label == label
            assert client.analyze_batch([data]).results[0].prediction.label == label
            with pytest.raises(RateLimited) as caught:
                client.analyze(data)
    assert (caught.value.code, caught.value.status) == ("RATE_LIMITED", 429)
    assert caught.value.retry_after >= 1


def test_no_server_is_unreachable():
    with pytest.raises(Unreachable) as caught:
        ImageClassifierClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    assert caught.value.status == 0


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://[::1", "INVALID_URL"),
        ("127.0.0.1:3000", "INVALID_URL"),
        ("http://{server}/not-the-service", "NOT_THIS_SERVICE"),  # a web server, not this one
    ],
)
def test_a_wrong_url_is_invalid_input(server, url, code):
    """Found by a black-box review: a URL of another web server raised BentoMLException, and a
    URL that does not parse ValueError, both outside the client's typed errors."""
    with pytest.raises(InvalidInput) as caught:
        ImageClassifierClient(url.format(server=server.url.removeprefix("http://")))
    assert (caught.value.code, caught.value.status) == (code, 0)


def test_the_documented_example_runs(server, digits, tmp_path):
    """The ```python block of docs/clients.md, run as written: the doc cannot rot."""
    doc = (REPO / "docs" / "clients.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    data, label = digits[0]
    (tmp_path / "digit.png").write_bytes(data)
    (tmp_path / "example.py").write_text(example)
    env = {**os.environ, "CLASSIFIER_URL": server.url, "CLASSIFIER_IMAGE": "digit.png"}
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[0] == label
    assert lines[1:3] == [f"0 {label}", f"1 {label}"]
    assert lines[3] == "64"
    assert lines[4].startswith("UNSUPPORTED_MEDIA_TYPE 415 ")
