"""Check a multipart upload's shape before any framework parses it.

BentoML would otherwise accept a JSON body or a text field in place of a file, and fetch a URL
given there (a server-side request on the client's behalf). Scanning the parts first lets every
such request get a precise 4xx, and hands the declared type and size of each file to the service.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from ..core.errors import ClassifierError, ErrorCode
from ..serving.settings import Settings

_INTEGER = re.compile(r"[+-]?[0-9]{1,9}")
_PARTS_KEY = "upload_parts"  # where the boundary leaves the scanned parts for the api


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


@dataclass(frozen=True)
class UploadRoute:
    """A POST route whose body is capped at `max_bytes`; with a rule, its multipart is checked."""

    rule: UploadRule | None
    max_bytes: int


def routes_of_apis(apis: Iterable[Any], settings: Settings) -> dict[str, UploadRoute]:
    """The upload rule each api (`.route`, `.func`) declares in its signature: a `Path` parameter
    is one file (capped at MAX_UPLOAD_BYTES), `list[Path]` up to MAX_BATCH_IMAGES files
    (MAX_BATCH_BYTES), and its `int` parameters are form fields that must hold integers."""
    routes = {}
    for api in apis:
        hints = typing.get_type_hints(api.func)
        many = [name for name, hint in hints.items() if hint == list[Path]]
        one = [name for name, hint in hints.items() if hint is Path]
        integers = frozenset(
            name for name, hint in hints.items() if int in (hint, *typing.get_args(hint))
        )
        if many:
            rule = UploadRule(many[0], 1, settings.max_batch_images, integers)
            routes[api.route] = UploadRoute(rule, settings.max_batch_bytes)
        elif one:
            rule = UploadRule(one[0], 1, 1, integers)
            routes[api.route] = UploadRoute(rule, settings.max_upload_bytes)
    return routes


def remember_parts(scope: MutableMapping[str, Any], parts: list[UploadPart]) -> None:
    scope.setdefault("state", {})[_PARTS_KEY] = parts


def scanned_parts(scope: MutableMapping[str, Any]) -> list[UploadPart]:
    """The file parts the boundary scanned, in body order (declared type, size, filename)."""
    return scope["state"][_PARTS_KEY]


@dataclass
class UploadPart:
    name: str
    filename: str | None
    content_type: str | None
    size: int = 0
    text: bytearray = field(default_factory=bytearray)

    @property
    def is_file(self) -> bool:
        return self.filename is not None


def scan_multipart(content_type: str | None, body: bytes, rule: UploadRule) -> list[UploadPart]:
    """The file parts, in body order, or a ClassifierError saying what is wrong with the request."""
    media, options = parse_options_header(content_type or "")
    if media != b"multipart/form-data" or not options.get(b"boundary"):
        raise ClassifierError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"send multipart/form-data with the image in the field {rule.file_field!r}",
        )
    parts = _parse_parts(options[b"boundary"], body, rule)
    return _check_parts(parts, rule)


def canonical_content_type(content_type: str) -> str:
    """`MULTIPART/Form-Data; boundary=X` -> `multipart/form-data; boundary=X`: media types are
    case-insensitive, but BentoML compares them exactly and would parse the body as JSON."""
    media, _, rest = content_type.partition(";")
    return media.strip().lower() + (";" + rest if rest else "")


def _parse_parts(boundary: bytes, body: bytes, rule: UploadRule) -> list[UploadPart]:
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
        if not part.is_file and len(part.text) <= rule.max_text_bytes:
            part.text += data[start:end]

    parser = MultipartParser(
        boundary,
        callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    malformed = ClassifierError(ErrorCode.INVALID_REQUEST, "the multipart body is malformed")
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        raise malformed from None
    if parser.state != MultipartState.END:  # cut off before its closing boundary
        raise malformed
    return parts


def _check_parts(parts: list[UploadPart], rule: UploadRule) -> list[UploadPart]:
    expected = ", ".join([rule.file_field, *sorted(rule.integer_fields)])
    files = []
    seen_text: set[str] = set()
    for part in parts:
        if part.name == rule.file_field:
            if not part.is_file:
                raise ClassifierError(
                    ErrorCode.INVALID_REQUEST,
                    f"field {rule.file_field!r} must be a file upload, not a text value",
                )
            files.append(part)
        elif part.name in rule.integer_fields and not part.is_file:
            if part.name in seen_text:
                raise ClassifierError(ErrorCode.INVALID_REQUEST, f"field {part.name!r} given twice")
            _check_integer(part, rule)
            seen_text.add(part.name)
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
            f"{len(files)} files sent; at most {rule.max_files} per request",
        )
    return files


def _check_integer(part: UploadPart, rule: UploadRule) -> None:
    text = part.text.decode("utf-8", "replace").strip()
    if part.size > rule.max_text_bytes or not _INTEGER.fullmatch(text):
        raise ClassifierError(
            ErrorCode.INVALID_REQUEST, f"field {part.name!r} must be an integer, got {text[:20]!r}"
        )
