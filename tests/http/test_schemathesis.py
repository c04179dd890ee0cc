"""Schemathesis against the real server's own OpenAPI document: no operation ever answers 5xx.

The document (`/docs.json`) is BentoML's: every api, the probes and /metrics, and the routes of
the mounted app (/info, /ui, the Open Inference Protocol v2). For each operation Schemathesis
generates requests that fit the schema (positive) and, where the operation takes input, requests
that do not (negative), and they go to a real `bentoml serve`. Every answer must be < 500 and
carry `X-Request-ID`, and every error must be in its route family's shape: the protocol's
`{"error": "<CODE>: ..."}` on /v2, the project's envelope elsewhere. The operations the project
documents itself (the mounted app's, and the apis' errors) must also answer as documented:
status, content type and body schema.

Multipart with binary fields (`image`, `images`) works with this schemathesis version: it sends
tiny real pictures (1x1 PNG, GIF, WebP) and arbitrary bytes as the file(s), plus fields with
random names and JSON values; the server must answer each with a 200 or a 4xx, never a 500.
A random model name is only ever a 404, so half the cases of a `{name}` GET route, and every
infer case, name the served model (and version), so that headers and bodies reach the code behind.

`schema.parametrize()` with `schemathesis.pytest.from_fixture` (needed because the server, and so
the schema URL, exists only at run time) fails under pytest 9 in schemathesis 4.32.5 (it sets
`node._nodeid`, which pytest 9 no longer has). So each operation's strategy is used directly
with Hypothesis (`APIOperation.as_strategy`, the documented way outside `parametrize`), and a
test checks that the operations listed here are exactly those the document has.

Bounded and derandomized: the same cases every run. The calls made are counted, and each
operation and mode must reach its minimum (see `minimum_calls`).
"""

from __future__ import annotations

import base64
import json

import openapi_spec_validator
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from image_classifier.http.envelope import is_error_envelope, is_open_inference_error
from image_classifier.http.headers import MODEL_VERSION_HEADER
from tests.figures import measured
from tests.pictures import encode

MODEL, VERSION = "digits-cnn", "v1"
EXAMPLES_PER_OPERATION_AND_MODE = 100
MODEL_ROUTES = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]
# BentoML's own operations. The probes and /metrics keep the answers it documents (its own error
# schemas, not the envelope every error really leaves in), so only the project's own properties
# are checked there; the apis' errors are documented as they are answered (`bentoml_compat`).
BENTOML_OPERATIONS = [
    "GET /healthz",
    "GET /livez",
    "GET /readyz",
    "GET /metrics",
    "POST /analyze",
    "POST /analyze_batch",
]
MOUNTED_OPERATIONS = [
    "GET /info",
    "GET /ui",
    "GET /v2",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    *(f"GET {base}{tail}" for base in MODEL_ROUTES for tail in ("", "/ready", "/config")),
    *(f"POST {base}/infer" for base in MODEL_ROUTES),
]
OPERATIONS = BENTOML_OPERATIONS + MOUNTED_OPERATIONS
# Those whose every answer must be as documented: status, content type and body schema.
DOCUMENTED_AS_ANSWERED = ["POST /analyze", "POST /analyze_batch", *MOUNTED_OPERATIONS]
# The operations with input: parameters (the `{name}` routes' path and headers) or a body.
TAKES_INPUT = [label for label in OPERATIONS if label.startswith("POST") or "{name}" in label]
# Those with a body. The others' parameters are all strings, which nothing sent in a path or a
# header can fail to be: schemathesis finds no negative case for them (Hypothesis: Unsatisfiable).
TAKES_A_BODY = [label for label in TAKES_INPUT if label.startswith("POST")]
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in TAKES_A_BODY
]
DOCUMENTED_ANSWERS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def minimum_calls(label: str) -> int:
    """An operation without input has exactly one distinct request, and Hypothesis stops once it
    has tried every distinct input: one call. With input the space is unbounded, so Hypothesis
    runs all `max_examples` (it stops early only on an exhausted space, and these schemas have no
    filters to reject examples): derandomized, the count is the same every run, so anything
    short of it means generation broke (a schema schemathesis could not satisfy, say)."""
    return EXAMPLES_PER_OPERATION_AND_MODE if label in TAKES_INPUT else 1


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/docs.json", timeout=30)


def test_the_document_has_exactly_these_operations(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


def test_exactly_the_listed_operations_take_input(api_schema):
    """So each operation with input gets its full count of cases, and each with a body is also
    fuzzed with bodies that do not fit."""
    with_input, with_body = set(), set()
    for path, item in api_schema.raw_schema["paths"].items():
        for method, operation in item.items():
            label = f"{method.upper()} {path}"
            if operation.get("requestBody"):
                with_body.add(label)
            if operation.get("requestBody") or operation.get("parameters"):
                with_input.add(label)
    assert with_input == set(TAKES_INPUT)
    assert with_body == set(TAKES_A_BODY)


def test_the_document_is_valid_openapi_of_the_version_it_declares(api_schema):
    """BentoML declared 3.0.2 over pydantic's JSON Schema 2020-12 and typed uploads `file`:
    validators and code generators refused the document."""
    assert api_schema.raw_schema["openapi"].startswith("3.1.")
    openapi_spec_validator.validate(api_schema.raw_schema)  # raises on the first error
    upload = api_schema.raw_schema["components"]["schemas"]["analyze__Input"]["properties"]
    assert upload["image"]["type"] == "string" and upload["image"]["format"] == "binary"


def test_the_infer_body_is_the_protocols_json(api_schema):
    """The request body is documented from the model that parses it (inputs with name, shape,
    datatype, data, parameters; optional outputs), inline so that the document resolves."""
    operation = api_schema.raw_schema["paths"]["/v2/models/{name}/infer"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["inputs"] and "$defs" not in json.dumps(body)
    tensor = body["properties"]["inputs"]["items"]
    assert tensor["required"] == ["name", "shape", "datatype"]
    assert set(tensor["properties"]) == {"name", "shape", "datatype", "data", "parameters"}
    assert "outputs" in body["properties"]
    assert {"200", "400", "404", "413", "503"} <= set(operation["responses"])


def header(response: Response, name: str) -> str | None:
    """Schemathesis keeps each header's values in a list."""
    values = response.headers.get(name)
    return values[0] if values else None


def check_error_shape(path: str, response: Response, summary: str) -> None:
    body = response.json()
    code = header(response, "x-error-code")
    assert code, summary
    if path == "/v2" or path.startswith("/v2/"):
        assert is_open_inference_error(body) and body["error"].startswith(f"{code}: "), summary
    else:
        assert is_error_envelope(body) and body["error"]["code"] == code, summary
        assert body["request_id"] == header(response, "x-request-id"), summary


def served_model(case) -> None:
    """Name the served model (and version) in a `{name}` route's path, with no version pin (a
    random one is a 404 too)."""
    if "name" in (case.path_parameters or {}):
        case.path_parameters["name"] = MODEL
        if "version" in case.path_parameters:
            case.path_parameters["version"] = VERSION
        if case.headers:
            case.headers.pop(MODEL_VERSION_HEADER, None)


def naming(label: str) -> st.SearchStrategy[bool]:
    """Whether a case names the served model. Infer always does: its budget goes to the body
    (the GET routes send the random names, to the same lookup)."""
    if "/infer" in label:
        return st.just(True)
    return st.booleans() if "{name}" in label else st.just(False)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_no_operation_answers_5xx(api_schema, server, label, mode):
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    documented_here = label in DOCUMENTED_AS_ANSWERED
    calls = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION_AND_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), name_the_model=naming(label))
    def check(case, name_the_model):
        if name_the_model:  # else a random name: a 404 before the rest is read
            served_model(case)
        response = case.call(base_url=server.url, timeout=30)
        calls.append(response.status_code)
        summary = f"{case.method} {case.formatted_path} -> {response.status_code}: "
        summary += response.text[:300]
        assert response.status_code < 500, summary
        assert header(response, "x-request-id"), summary
        if response.status_code >= 400:
            check_error_shape(case.formatted_path, response, summary)
        if documented_here and mode == GenerationMode.POSITIVE:
            case.validate_response(response, checks=DOCUMENTED_ANSWERS)

    check()
    statuses = {status: calls.count(status) for status in sorted(set(calls))}
    measured(f"schemathesis {label} ({mode}): {len(calls)} calls, statuses {statuses}")
    assert len(calls) >= minimum_calls(label), (label, mode, len(calls))


def json_infer_body(image: bytes) -> dict:
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES",
              "data": [base64.b64encode(image).decode()]}  # fmt: skip
    top3 = {"name": "probabilities", "parameters": {"classification": 3}}
    return {"id": "1", "inputs": [tensor], "outputs": [top3, {"name": "label"}]}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_real_inference_answers_as_documented(api_schema, server, heldout, binary):
    """The fuzzing above never sends a real image; one real answer is checked here, JSON and
    binary (an output's `binary_data`), against the same documented answers."""
    operation = api_schema.find_operation_by_label(
        "POST /v2/models/{name}/versions/{version}/infer"
    )
    body = json_infer_body(encode(heldout[0][0], "PNG"))
    body["parameters"] = {"binary_data_output": binary}
    case = operation.Case(path_parameters={"name": MODEL, "version": VERSION}, body=body)
    response = case.call(base_url=server.url, timeout=30)
    assert response.status_code == 200, response.text
    expected_type = "application/octet-stream" if binary else "application/json"
    assert header(response, "content-type") == expected_type
    case.validate_response(response, checks=DOCUMENTED_ANSWERS)
