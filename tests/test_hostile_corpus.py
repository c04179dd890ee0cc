"""Every hostile-corpus case against a real `bentoml serve`: status, code, envelope, request id.

Cases the server is known to answer otherwise than the README documents (`Case.known_bug`) run
as strict xfails against a server of their own, so the tracebacks they cause do not end up in the
shared server's log (which other tests check too).
"""

from __future__ import annotations

import statistics
import time

import httpx
import pytest

from image_classifier.errors import is_error_envelope
from tests.hostile_corpus import Case, case_by_id, corpus, markdown_table, send
from tests.support import envelope_code, serve

DIGITS = [str(d) for d in range(10)]
DEFAULT_TOP_K = 3


def _params(known_bug: bool) -> list:
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(strict=True, reason=case.known_bug)] if known_bug else [],
        )
        for case in corpus()
        if (case.known_bug is not None) == known_bug
    ]


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=120) as instance:
        yield instance


@pytest.fixture(scope="module")
def bug_server(trained_store, artifacts):
    """A server of its own for the known-bug cases (they log tracebacks)."""
    with serve(trained_store, artifacts / "server-known-bugs.log") as running:
        yield running


def check_case(client: httpx.Client, running, case: Case) -> None:
    log_before = len(running.log())
    response = send(client, running.url, case)
    new_log = running.log()[log_before:]

    assert response.status_code == case.expected_status, response.text[:500]
    assert response.headers.get("x-request-id"), dict(response.headers)
    assert "Traceback" not in response.text
    if response.status_code >= 300:
        assert response.headers["content-type"].startswith("application/json")
        assert is_error_envelope(response.json()), response.text[:500]
        assert envelope_code(response) == case.expected_code, response.text[:500]
    elif case.item_codes is not None:
        check_batch(response, case)
    else:
        check_prediction(response, case)
    assert "Traceback" not in new_log, new_log[-3000:]


def check_prediction(response: httpx.Response, case: Case) -> None:
    body = response.json()
    assert body["success"] is True, body
    assert body["request_id"] == response.headers["x-request-id"]
    prediction = body["prediction"]
    assert prediction["label"] in DIGITS
    top_k = int(dict(case.data).get("top_k", DEFAULT_TOP_K))
    assert len(prediction["top_k"]) == top_k
    assert prediction["top_k"][0]["label"] == prediction["label"]
    if case.expected_label is not None:
        assert prediction["label"] == case.expected_label, prediction


def check_batch(response: httpx.Response, case: Case) -> None:
    body = response.json()
    assert body["success"] is True, body
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(case.files)))
    assert [r["filename"] for r in results] == [spec[1][0] for spec in case.files]
    codes = [None if r["success"] else r["error"]["code"] for r in results]
    assert codes == list(case.item_codes), codes
    for result, label in zip(results, case.item_labels or [None] * len(results), strict=True):
        if result["success"]:
            assert result["prediction"]["label"] in DIGITS
            assert "error" not in result or result["error"] is None
        else:
            assert result["error"]["message"], result
            assert "prediction" not in result or result["prediction"] is None
        if label is not None:
            assert result["prediction"]["label"] == label, result


def test_corpus_is_big_and_covers_the_brief():
    ids = {case.id for case in corpus()}
    assert len(ids) >= 40
    assert {f"exif-orientation-{o}" for o in range(1, 9)} <= ids
    for kind in ("svg", "html", "text", "pdf", "elf", "mz"):
        assert {f"{kind}-as-jpeg", f"{kind}-as-octet"} <= ids
    bomb = case_by_id("png-bomb-50000").files[0][1][1]
    assert len(bomb) < 1024
    assert "`png-bomb-50000`" in markdown_table()


@pytest.mark.parametrize("case", _params(known_bug=False))
def test_case(client, server, case: Case):
    check_case(client, server, case)


@pytest.mark.parametrize("case", _params(known_bug=True))
def test_known_bug_case(client, bug_server, case: Case):
    check_case(client, bug_server, case)


def test_bomb_round_trip(client, server, artifacts):
    """The decompression bomb is refused from its header: the round trip is reported, not
    asserted (machines are noisy)."""
    case = case_by_id("png-bomb-50000")
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        response = send(client, server.url, case)
        timings.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 422
        assert envelope_code(response) == "IMAGE_TOO_LARGE"
    report = (
        f"PNG bomb (IHDR 50000x50000, {len(case.files[0][1][1])} bytes): client round trip "
        f"median {statistics.median(timings):.1f} ms, min {min(timings):.1f} ms, "
        f"max {max(timings):.1f} ms over {len(timings)} requests"
    )
    print(report)
    (artifacts / "bomb-round-trip.txt").write_text(report + "\n")


def test_server_log_has_no_traceback_after_the_corpus(server):
    """Runs after the corpus (file order): no client input made the shared server log a
    traceback."""
    log = server.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 500 :][:3000]
