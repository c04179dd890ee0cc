"""Multipart uploads, parsed once and in memory, with the shape each api declares.

The body is parsed by python-multipart's streaming parser, right where the boundary middleware has
read it: every malformed or unexpected request gets a precise 4xx (a text value in a file field,
an unknown field or query parameter, one file too many, `top_k=abc`), and the files' bytes go
to the api as they are, with no temporary file and no second parse by the framework.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import (
    DEFAULT_MAX_HEADER_COUNT,
    DEFAULT_MAX_HEADER_SIZE,
    MultipartParser,
    MultipartState,
    parse_options_header,
)
from starlette.datastructures import Headers
from starlette.responses import Response

from ..core.errors import ClassifierError, ErrorCode
from ..serving.settings import Settings

_INTEGER = re.compile(r"[+-]?[0-9]+")  # as long as `max_text_bytes`: range checks say the rest


@dataclass(frozen=True)
class UploadRule:
    """What one route accepts: one file field with a count range, plus optional integer fields.

    Integer fields are checked here too, so a value like ``top_k=abc`` gets our 400 instead of
    a framework validation error (which BentoML logs with a full traceback).
    """

    file_field: str
    min_files: int
    max_files: int
    integer_fields: frozenset[str] = frozenset()
    max_text_bytes: int = 32


@dataclass
class UploadPart:
    name: str
    filename: str | None
    content_type: str | None
    size: int = 0
    data: bytes = field(default=b"", repr=False)  # a file's bytes, or a field's value
    chunks: list[bytes] = field(default_factory=list, repr=False)  # while it is being parsed

    @property
    def is_file(self) -> bool:
        return self.filename is not None


@dataclass(frozen=True)
class Upload:
    """One parsed upload request, as the api that answers it sees it."""

    request_id: str
    model_version: str | None  # the X-Model-Version pin, if any
    files: list[UploadPart]
    integers: dict[str, int]  # the integer form fields given (e.g. top_k)


Answer = Callable[[Upload], Awaitable[Response]]
# (path, request headers, whole body) -> response: a route that reads its own body format
BodyAnswer = Callable[[str, Headers, bytes], Awaitable[Response]]


@dataclass(frozen=True)
class UploadRoute:
    """A POST route whose body is capped at `max_bytes`; with a rule its multipart is parsed here
    and `answer` gets the parsed upload; `answer_body` gets the body as it came (with neither,
    the body goes on to the framework)."""

    rule: UploadRule | None
    max_bytes: int
    answer: Answer | None = None
    answer_body: BodyAnswer | None = None


def route_for(routes: dict[str, UploadRoute], path: str) -> UploadRoute | None:
    """Exact paths first, then glob patterns such as `/v2/models/*/infer`."""
    if path in routes:
        return routes[path]
    for pattern, route in routes.items():
        if "*" in pattern and fnmatch.fnmatchcase(path, pattern):
            return route
    return None


def routes_of_apis(
    apis: Iterable[Any], settings: Settings, answerer: Callable[[], Any]
) -> dict[str, UploadRoute]:
    """The upload rule each api (`.name`, `.route`, `.func`) declares in its signature: a `Path`
    parameter is one file (capped at MAX_UPLOAD_BYTES), `list[Path]` up to MAX_BATCH_IMAGES files
    (MAX_BATCH_BYTES), and its `int` parameters are form fields that must hold integers. The
    route is answered by the method of the same name on `answerer()`."""
    routes = {}
    for api in apis:
        hints = typing.get_type_hints(api.func)
        many = [name for name, hint in hints.items() if hint == list[Path]]
        one = [name for name, hint in hints.items() if hint is Path]
        integers = frozenset(
            name for name, hint in hints.items() if int in (hint, *typing.get_args(hint))
        )
        answer = _method_of(answerer, api.name)
        if many:
            rule = UploadRule(many[0], 1, settings.max_batch_images, integers)
            routes[api.route] = UploadRoute(rule, settings.max_batch_bytes, answer)
        elif one:
            rule = UploadRule(one[0], 1, 1, integers)
            routes[api.route] = UploadRoute(rule, settings.max_upload_bytes, answer)
    return routes


def _method_of(answerer: Callable[[], Any], name: str) -> Answer:
    async def answer(upload: Upload) -> Response:
        return await getattr(answerer(), name)(upload)

    return answer


def parse_multipart(
    content_type: str | None, body: Iterable[bytes], rule: UploadRule, query: bytes = b""
) -> tuple[list[UploadPart], dict[str, int]]:
    """The file parts in body order and the integer fields, or a ClassifierError saying what is
    wrong with the request. `body`: its chunks, as they came; `query`: the raw query string,
    where the integer fields may come too (`?top_k=2` is what users try first)."""
    boundary = multipart_boundary(content_type, rule)
    from_query = _query_integers(query, rule)
    parts = _parse_parts(boundary, _from_first_boundary(boundary, body), rule)
    files, integers = _check_parts(parts, rule)
    for name, value in from_query.items():
        if integers.setdefault(name, value) != value:
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST,
                f"{name!r} given twice with different values: {value} in the query string, "
                f"{integers[name]} in the form",
            )
    return files, integers


def multipart_boundary(content_type: str | None, rule: UploadRule) -> bytes:
    """The boundary of a multipart/form-data body, or 415 (from the head alone: the body need
    not be read to refuse it)."""
    media, options = parse_options_header(content_type or "")
    if media != b"multipart/form-data" or not options.get(b"boundary"):
        raise ClassifierError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"send multipart/form-data with the image in the field {rule.file_field!r}",
        )
    return options[b"boundary"]


def _query_integers(query: bytes, rule: UploadRule) -> dict[str, int]:
    """The integer fields given in the query string. Any other parameter is refused: ignored, a
    misplaced one (`?image=...`, `?topk=2`) would give a silently different answer."""
    integers: dict[str, int] = {}
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name not in rule.integer_fields:
            takes = ", ".join(sorted(rule.integer_fields)) or "none"
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST,
                f"unknown query parameter {name[:40]!r} (query parameters: {takes}); the image "
                f"goes in the multipart field {rule.file_field!r}",
            )
        if name in integers:
            raise ClassifierError(ErrorCode.INVALID_REQUEST, f"{name!r} given twice in the query")
        raw = value.encode()
        if (given := _integer(name, raw, len(raw), rule)) is not None:
            integers[name] = given
    return integers


def _from_first_boundary(boundary: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The body from its first boundary on. RFC 2046 allows a preamble before it (some curl, PHP
    and Java clients send one), which python-multipart refuses. Only a delimiter's length of the
    preamble is kept while looking: a long one costs no memory."""
    delimiter = b"\r\n--" + boundary
    chunks = iter(chunks)
    first = next(chunks, b"")
    if first.startswith(delimiter[2:]):  # no preamble (nearly every client): not copied
        yield first
        yield from chunks
        return
    seen = b"\r\n"  # so that a boundary at the very start is found like any other
    for chunk in itertools.chain((first,), chunks):
        seen += chunk
        found = seen.find(delimiter)
        if found >= 0:
            yield seen[found + 2 :]
            yield from chunks
            return
        seen = seen[-len(delimiter) + 1 :]


def _parse_parts(boundary: bytes, body: Iterable[bytes], rule: UploadRule) -> list[UploadPart]:
    """The parts, each complete. Parsing stops at the first part past the most a valid upload
    has (its files and integer fields): the parts so far then break a rule, and `_check_parts`
    says which. A body of a million tiny parts took 37 CPU-s in the event loop before."""
    most_parts = rule.max_files + len(rule.integer_fields)
    parts: list[UploadPart] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    headers: dict[str, str] = {}

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        name = header["field"].decode("latin-1").strip().lower()
        if name in headers and name in _SAID_ONCE:  # which one counts would be a guess
            raise _malformed(f"a part gives its {name} twice")
        headers[name] = header["value"].decode("latin-1").strip()
        header["field"].clear()
        header["value"].clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(headers.get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        parts.append(
            UploadPart(
                name=name,
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                content_type=headers.get("content-type"),
            )
        )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.size += end - start
        if part.is_file or part.size <= rule.max_text_bytes:  # a longer value is refused
            part.chunks.append(data[start:end])

    def on_part_end() -> None:
        part = parts[-1]
        part.data, part.chunks = b"".join(part.chunks), []
        if len(parts) > most_parts:
            _check_parts(parts, rule)

    try:
        parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
    except FormParserError as error:  # a boundary over 256 characters (RFC 2046 allows 70)
        raise ClassifierError(ErrorCode.INVALID_REQUEST, f"multipart boundary: {error}") from None
    try:
        for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise _malformed(_in_our_words(str(error))) from None
    if parser.state != MultipartState.END:  # cut off before its closing boundary
        raise _malformed("it ends before its closing boundary")
    return parts


_SAID_ONCE = ("content-disposition", "content-type")  # a part's own (RFC 7578 4.2, 4.4)

# The parser's reasons (python-multipart's wording, with its offsets), in the client's terms.
_MALFORMED_BECAUSE = {
    "Maximum header size exceeded": f"a part's header line is over {DEFAULT_MAX_HEADER_SIZE:,} "
    "bytes (a filename that long?)",
    "Maximum header count exceeded": f"a part has more than {DEFAULT_MAX_HEADER_COUNT} headers",
    "Did not find CR": "a boundary line does not end with CRLF",
    "Did not find LF": "a line does not end with CRLF (bare LF or CR line ends?)",
    "Expected boundary": "a boundary line differs from the Content-Type's boundary",
    "Did not find -": "the closing boundary does not end with '--'",
    "Found invalid character": "a part's header is not 'Name: value' (a character headers cannot "
    "hold)",
    "Found 0-length header": "a part's header has an empty name",
}


def _in_our_words(parser_reason: str) -> str:
    """The parser's reason in words of the grammar (RFC 2046, RFC 7578), not its internals."""
    return next(
        (ours for theirs, ours in _MALFORMED_BECAUSE.items() if parser_reason.startswith(theirs)),
        "it breaks the multipart grammar (RFC 2046)",
    )


def _malformed(reason: str) -> ClassifierError:
    return ClassifierError(ErrorCode.INVALID_REQUEST, f"the multipart body is malformed: {reason}")


def _check_parts(
    parts: list[UploadPart], rule: UploadRule
) -> tuple[list[UploadPart], dict[str, int]]:
    expected = ", ".join([rule.file_field, *sorted(rule.integer_fields)])
    files = []
    integers: dict[str, int] = {}
    for part in parts:
        if part.name == rule.file_field:
            if not part.is_file:
                raise ClassifierError(
                    ErrorCode.INVALID_REQUEST,
                    f"field {rule.file_field!r} must be a file upload, not a text value",
                )
            files.append(part)
        elif part.name in rule.integer_fields and part.is_file:
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST,
                f"field {part.name!r} must be a text value, not a file upload",
            )
        elif part.name in rule.integer_fields:
            if part.name in integers:
                raise ClassifierError(ErrorCode.INVALID_REQUEST, f"field {part.name!r} given twice")
            if (given := _integer(part.name, part.data, part.size, rule)) is not None:
                integers[part.name] = given
        else:
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST, f"unexpected field {part.name!r}; expected: {expected}"
            )
    if len(files) < rule.min_files:
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST, f"field {rule.file_field!r} is required (a file upload)"
        )
    if len(files) > rule.max_files:
        if rule.max_files == 1:
            raise ClassifierError(
                ErrorCode.INVALID_REQUEST,
                f"send exactly one file in {rule.file_field!r} (use /analyze_batch for several)",
            )
        raise ClassifierError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"more than {rule.max_files} files sent; at most {rule.max_files} per request",
        )
    return files, integers


def _integer(name: str, value: bytes, size: int, rule: UploadRule) -> int | None:
    """`size`: the value's length as sent (a form field keeps only its first bytes). None for
    `null`: what BentoML's clients send for an optional left at None (the OpenAPI document says
    the field is nullable), meaning the default."""
    if size > rule.max_text_bytes:
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST,
            f"{name!r} must be an integer; got a value of {size:,} bytes",
        )
    text = value.decode("utf-8", "replace").strip()
    if text == "null":
        return None
    if not _INTEGER.fullmatch(text):
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST, f"{name!r} must be an integer, got {text[:20]!r}"
        )
    return int(text)
