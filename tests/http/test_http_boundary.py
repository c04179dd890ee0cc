"""The ASGI boundary alone: request ids, streaming caps, multipart shape, the error envelope."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from image_classifier.core.errors import ClassifierError, ErrorCode
from image_classifier.http import logs
from image_classifier.http.boundary import BoundaryMiddleware
from image_classifier.http.envelope import HTTP_STATUS
from image_classifier.http.uploads import Upload, UploadRoute, UploadRule, parse_multipart
from loadtest.servers import REPO

CAP = 1000


async def echo_upload(upload: Upload) -> JSONResponse:
    """The api's side: the upload as the boundary parsed it, bytes and all."""
    return JSONResponse(
        {
            "parts": [[p.name, p.filename, p.content_type, p.size] for p in upload.files],
            "data": [p.data.decode("latin-1") for p in upload.files],
            "integers": upload.integers,
            "model_version": upload.model_version,
            "request_id": upload.request_id,
        }
    )


async def crash_upload(upload: Upload) -> JSONResponse:
    raise RuntimeError("Traceback: secret /etc/passwd details")


async def framework_400(request: Request) -> JSONResponse:
    detail = [{"type": "missing", "loc": ["body", "image"], "msg": "Field required"}]
    return JSONResponse({"error": "1 validation error", "detail": detail}, status_code=400)


async def crash(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Traceback: secret /etc/passwd details", status_code=500)


async def break_mid_answer(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise RuntimeError("a bug after the answer began")


async def overloaded(request: Request) -> JSONResponse:
    return JSONResponse({"error": "process is overloaded"}, status_code=503)


APP = Starlette(
    routes=[
        Route("/upload", echo_upload, methods=["POST"]),
        Route("/bad", framework_400, methods=["POST"]),
        Route("/crash", crash),
        Route("/busy", overloaded),
        Mount("/broken", break_mid_answer),
    ]
)
CLIENT = TestClient(
    BoundaryMiddleware(
        APP,
        upload_routes={
            "/upload": UploadRoute(
                UploadRule("image", 1, 1, integer_fields=frozenset({"top_k"})), CAP, echo_upload
            ),
            "/crash_upload": UploadRoute(UploadRule("image", 1, 1), CAP, crash_upload),
        },
    ),
    raise_server_exceptions=False,
)


def code(response) -> str:
    body = response.json()
    assert body["success"] is False
    assert body["request_id"] == response.headers["x-request-id"]
    return body["error"]["code"]


def test_a_good_upload_reaches_its_api_parsed_once():
    response = CLIENT.post(
        "/upload",
        files={"image": ("a.png", b"x\r\n--y" * 10, "image/png")},
        data={"top_k": " +2 "},
        headers={"x-model-version": "v2"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["parts"] == [["image", "a.png", "image/png", 60]]
    assert body["data"] == ["x\r\n--y" * 10]  # the bytes as sent, boundary-like lines and all
    assert body["integers"] == {"top_k": 2}
    assert body["model_version"] == "v2"
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("preamble", [b"", b"RFC 2046 allows this\r\n--boundar\r\n\r\n"])
def test_a_body_parsed_from_its_chunks_is_the_same_wherever_they_split(preamble):
    """The boundary parses an upload chunk by chunk, as it came: a split anywhere, inside the
    boundary line, a header or the file's bytes, gives the same parts; a preamble before the
    first boundary (even one almost like it) is skipped."""
    payload = bytes(range(256)) + b"\r\n--bound\r\n--b-" + bytes(range(255, -1, -1))
    body = preamble + (
        b'--boundary\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + payload + b"\r\n--boundary\r\n"
        b'Content-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--boundary--\r\n'
    )
    rule = UploadRule("image", 1, 1, integer_fields=frozenset({"top_k"}))
    content_type = "multipart/form-data; boundary=boundary"
    for at in range(1, len(body)):
        for split in ([body[:at], body[at:]], [body[i : i + at] for i in range(0, len(body), at)]):
            files, integers = parse_multipart(content_type, split, rule)
            assert [(f.name, f.filename, f.data) for f in files] == [("image", "p.png", payload)]
            assert integers == {"top_k": 3}


def test_a_bug_in_an_api_is_one_enveloped_500_with_no_details():
    response = CLIENT.post("/crash_upload", files={"image": ("a.png", b"1", "image/png")})
    assert response.status_code == 500
    assert code(response) == "INTERNAL_ERROR"
    assert "passwd" not in response.text and "Traceback" not in response.text


@pytest.mark.parametrize(
    ("given", "kept"),
    [("abc-123_X.y", True), ("a" * 128, True), ("a" * 129, False), ("bad id", False),
     ("<script>", False), (None, False)],
)  # fmt: skip
def test_request_id_is_kept_only_when_safe(given, kept):
    headers = {"x-request-id": given} if given is not None else {}
    response = CLIENT.post("/upload", files={"image": ("a", b"1")}, headers=headers)
    returned = response.headers["x-request-id"]
    assert response.json()["request_id"] == returned
    assert (returned == given) is kept
    if not kept:
        assert len(returned) == 36  # a UUID4


def test_content_length_over_the_cap_is_refused_before_reading():
    body = b"--b\r\n" + b"x" * (CAP * 2)
    response = CLIENT.post(
        "/upload", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413
    assert code(response) == "PAYLOAD_TOO_LARGE"


def test_a_chunked_body_is_cut_at_the_cap():
    def chunks():
        for _ in range(50):
            yield b"y" * 100

    response = CLIENT.post(
        "/upload", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413
    assert code(response) == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize(
    ("kwargs", "status", "expected"),
    [
        ({"json": {"image": "http://169.254.169.254/"}}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({"data": {"image": "http://example.com/a.png"}, "files": {"x": ("", b"")}}, 400,
         "INVALID_REQUEST"),
        ({"files": {"file": ("a.png", b"1")}}, 400, "INVALID_REQUEST"),
        ({"files": [("image", ("a", b"1")), ("image", ("b", b"2"))]}, 400, "INVALID_REQUEST"),
        ({"files": [("image", ("a", b"1"))], "data": {"top_k": "1" * 2000}}, 413,
         "PAYLOAD_TOO_LARGE"),
        ({"content": b"--b\r\nnot multipart at all", "headers": {
            "content-type": "multipart/form-data; boundary=b"}}, 400, "INVALID_REQUEST"),
    ],
)  # fmt: skip
def test_malformed_uploads_get_precise_codes(kwargs, status, expected):
    response = CLIENT.post("/upload", **kwargs)
    assert response.status_code == status, response.text
    assert code(response) == expected


_TOP_K = frozenset({"top_k"})


def _refusal_of(body: bytes, rule: UploadRule, boundary: str = "b") -> ClassifierError:
    with pytest.raises(ClassifierError) as refused:
        parse_multipart(f"multipart/form-data; boundary={boundary}", [body], rule)
    return refused.value


def test_a_bug_after_the_answer_began_is_logged_once_with_its_request(caplog):
    """Too late for the envelope, the error goes on to the server, which cuts the answer and
    logged the traceback a second time, without the request id."""
    with pytest.raises(RuntimeError) as raised:
        TestClient(BoundaryMiddleware(APP, upload_routes={})).get("/broken")
    ours = [r for r in caplog.records if r.name == "image_classifier.http.boundary"]
    assert len(ours) == 1 and ours[0].exc_info[1] is raised.value
    again = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "Exception in ASGI "
                              "application", (), (RuntimeError, raised.value, None))  # fmt: skip
    assert logs._said_already(again) is False
    other = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "x", (), None)
    assert logs._said_already(other) is True


def test_a_client_gone_mid_body_is_logged_499_not_counted_as_a_bad_request(caplog):
    """It was answered 400 INVALID_REQUEST (to no one) and counted in the errors that the
    refused-uploads alarm watches."""
    messages = [{"type": "http.request", "body": b"--b\r\n", "more_body": True},
                {"type": "http.disconnect"}]  # fmt: skip
    sent = []

    async def receive():  # noqa: ANN202
        return messages.pop(0)

    async def send(message) -> None:  # noqa: ANN001
        sent.append(message)

    headers = [(b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", b"900")]
    scope = {"type": "http", "method": "POST", "path": "/upload", "headers": headers,
             "query_string": b"", "client": ("127.0.0.1", 5000)}  # fmt: skip
    caplog.set_level(logging.INFO, logger="image_classifier.access")
    asyncio.run(CLIENT.app(scope, receive, send))
    assert sent == []
    (line,) = [r for r in caplog.records if r.name == "image_classifier.access"]
    assert line.status == 499 and not hasattr(line, "error_code"), vars(line)


def test_a_malformed_body_says_what_is_wrong_with_it():
    rule = UploadRule("image", 1, 1)
    long_name = ("字" * 2000).encode()  # 6 KB in the part's header line
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="%s"\r\n\r\n1\r\n--b--'
    refusal = _refusal_of(body % long_name, rule)
    assert refusal.code is ErrorCode.INVALID_REQUEST
    assert "header line is over 4,224 bytes" in refusal.message, refusal.message
    cut = _refusal_of(body.replace(b"--b--", b"") % b"a.png", rule)
    assert "ends before its closing boundary" in cut.message, cut.message
    # The parser's own wording, with its offsets, was the message (a black-box review)
    bare_lf = _refusal_of((body % b"a.png").replace(b"\r\n", b"\n"), rule)
    assert bare_lf.message.endswith("a boundary line does not end with CRLF"), bare_lf.message
    colonless = _refusal_of(b"--b\r\nContent-Disposition form-data\r\n\r\n1\r\n--b--", rule)
    assert colonless.message.endswith("(a character headers cannot hold)"), colonless.message


def test_a_misplaced_or_oversized_top_k_is_named_for_what_it_is():
    """top_k sent as a file was told "unexpected field 'top_k'; expected: image, top_k"; one over
    the text cap quoted an empty value (found by a black-box review)."""
    rule = UploadRule("image", 1, 1, _TOP_K)
    image = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n1\r\n'
    as_file = b'--b\r\nContent-Disposition: form-data; name="top_k"; filename="k"\r\n\r\n3\r\n'
    refusal = _refusal_of(image + as_file + b"--b--\r\n", rule)
    assert refusal.message == "field 'top_k' must be a text value, not a file upload"
    padded = b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3' + b" " * 100_000
    refusal = _refusal_of(image + padded + b"\r\n--b--\r\n", rule)
    assert refusal.message == "'top_k' must be an integer; got a value of 100,001 bytes"


def test_parsing_stops_at_the_first_part_past_what_a_valid_upload_has():
    """111,000 empty parts (a 1 MB body) were all parsed before the first, nameless one was
    refused (0.9 CPU-s in the event loop; 37 CPU-s for 63 MB): parsing now stops at the first
    part too many, so the cut tail after it is never reached ("malformed" if it were)."""
    cut_tail = b'--b\r\nContent-Disposition: form-data; name="image"; filename="c'
    nameless = _refusal_of(b"--b\r\n\r\n\r\n" * 3 + cut_tail, UploadRule("image", 1, 1, _TOP_K))
    assert nameless.message.startswith("unexpected field ''"), nameless.message
    file_part = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n1\r\n'
    )
    # 100 files sent: parsing stops at the 65th, so the count is not known (it said "65 files
    # sent", or 66 with a top_k field: a black-box review).
    too_many = _refusal_of(file_part * 100 + cut_tail, UploadRule("image", 1, 64, _TOP_K))
    assert too_many.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert too_many.message == "more than 64 files sent; at most 64 per request"
    one_only = _refusal_of(file_part * 3 + cut_tail, UploadRule("image", 1, 1, _TOP_K))
    assert one_only.message.startswith("send exactly one file"), one_only.message


def test_a_boundary_longer_than_the_parser_takes_is_a_400_not_a_500():
    file_part = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n1\r\n'
    boundary = "B" * 257  # python-multipart takes 256; RFC 2046 allows 70
    body = f"--{boundary}\r\n".encode() + file_part + f"--{boundary}--\r\n".encode()
    refused = _refusal_of(body, UploadRule("image", 1, 1), boundary)
    assert refused.code is ErrorCode.INVALID_REQUEST and "boundary" in refused.message


def test_framework_validation_errors_are_rewritten_readably():
    response = CLIENT.post("/bad")
    assert response.status_code == 400
    assert code(response) == "INVALID_REQUEST"
    assert response.json()["error"]["message"] == "image: Field required"


def test_server_errors_leak_nothing():
    response = CLIENT.get("/crash")
    assert response.status_code == 500
    assert code(response) == "INTERNAL_ERROR"
    assert "passwd" not in response.text and "Traceback" not in response.text


def test_overload_gets_retry_after():
    response = CLIENT.get("/busy")
    assert response.status_code == 503
    assert code(response) == "OVERLOADED"
    assert response.headers["retry-after"] == "1"


def test_unknown_routes_are_enveloped_too():
    response = CLIENT.get("/nowhere")
    assert response.status_code == 404
    assert code(response) == "NOT_FOUND"
    assert json.loads(response.content)["error"]["message"]


def test_the_readme_error_table_has_every_code_with_its_status():
    """Clients switch on codes: each one they can get is in the README, with the status it has."""
    table = (REPO / "README.md").read_text().split("| code | status | when |", 1)[1]
    tabled = {}
    for row in table.split("\n\n", 1)[0].splitlines()[2:]:
        codes, statuses = row.split(" | ")[:2]
        for code, status in zip(codes.split(","), statuses.split(","), strict=True):
            tabled[code.strip(" |`")] = int(status)
    assert tabled == {code.value: status for code, status in HTTP_STATUS.items()}


def test_a_path_cannot_end_its_log_line_or_forge_another(caplog):
    """Percent-decoded, a path may hold line ends: in the text log format they wrote a second,
    forged line (a review). They are logged escaped, in the message and the endpoint field."""
    with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
        TestClient(BoundaryMiddleware(APP, upload_routes={})).get(
            "/x%0a2026-12-07T06:34:00+0000%20[ERROR]%20forged%E2%80%A8"
        )
    (line,) = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    message = line.getMessage()
    assert message.splitlines() == [message] and "\\x0a2026" in message, message
    assert "\u2028" not in message and line.endpoint.startswith("/x\\x0a2026"), line.endpoint
