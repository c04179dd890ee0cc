"""Schemathesis against the real server's own OpenAPI document: no operation ever answers 5xx.

The document (`/docs.json`) is BentoML's: every api, the probes and /metrics. For each operation
Schemathesis generates requests that fit the schema (positive) and requests that do not
(negative), and they go to a real `bentoml serve`. Every answer must be < 500, carry
`X-Request-ID`, and every error must be the project's JSON envelope.

Multipart with binary fields (`image`, `images`) works with this schemathesis version: it sends
tiny real pictures (1x1 PNG, GIF, WebP) and arbitrary bytes as the file(s), plus fields with
random names and JSON values; the server must answer each with a 200 or a 4xx, never a 500.

`schema.parametrize()` with `schemathesis.pytest.from_fixture` (needed because the server, and so
the schema URL, exists only at run time) fails under pytest 9 in schemathesis 4.32.5 (it sets
`node._nodeid`, which pytest 9 no longer has). So each operation's strategy is used directly
with Hypothesis (`APIOperation.as_strategy`, the documented way outside `parametrize`), and a
test checks that the operations listed here are exactly those the document has.

Bounded and derandomized: a fixed number of examples per operation and mode, the same every run.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from image_classifier.http.envelope import is_error_envelope
from tests.figures import measured

EXAMPLES_PER_OPERATION_AND_MODE = 100
OPERATIONS = [
    "GET /healthz",
    "GET /livez",
    "GET /readyz",
    "GET /metrics",
    "POST /analyze",
    "POST /analyze_batch",
]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/docs.json", timeout=30)


def test_the_document_has_exactly_these_operations(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


# The probes take no input at all: there is nothing to make negative.
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_no_operation_answers_5xx(api_schema, server, label, mode):
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    calls = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION_AND_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(base_url=server.url, timeout=30)
        calls.append(response.status_code)
        summary = f"{case.method} {case.formatted_path} -> {response.status_code}: "
        summary += response.text[:300]
        assert response.status_code < 500, summary
        assert response.headers.get("x-request-id"), summary
        if response.status_code >= 400:
            assert is_error_envelope(response.json()), summary

    check()
    assert calls, "schemathesis generated nothing"
    measured(f"{label} ({mode}): {len(calls)} calls, statuses {sorted(set(calls))}")
