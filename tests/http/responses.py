"""Reading what the server answered: an error's code (envelope or Open Inference shape), a
Prometheus metric's value."""

from __future__ import annotations

import json

import httpx


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_names(metrics_text: str) -> set[str]:
    """Every metric with a sample in a /metrics text."""
    return {
        line.split("{")[0].split(" ")[0]
        for line in metrics_text.splitlines()
        if line and not line.startswith("#")
    }


def envelope_code(response: httpx.Response) -> str:
    body = response.json()
    assert body["success"] is False, body
    assert body["request_id"] == response.headers["x-request-id"], body
    return body["error"]["code"]


def open_inference_code(response: httpx.Response) -> str:
    """The code of an Open Inference error: `{"error": "<CODE>: <message>"}`, code in a header."""
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    code = response.headers["x-error-code"]
    assert body["error"].startswith(f"{code}: "), body
    assert response.headers["x-request-id"], response.headers
    return code


def access_lines(log: str) -> list[dict]:
    """A server log's access lines (one JSON object per request answered past the early refusal)."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "image_classifier.access"]


def assert_no_traceback(log: str) -> None:
    """No traceback in a server log; if there is one, the failure shows it (and what led to it),
    not the log's first or last lines."""
    at = log.find("Traceback")
    assert at < 0, "a traceback in the server log:\n" + log[max(0, at - 2000) : at + 4000]
