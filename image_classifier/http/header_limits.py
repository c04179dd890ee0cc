"""Caps on a request's head (request line and headers), enforced while it arrives.

uvicorn's httptools protocol reads a request's headers for as long as they keep coming: one
10 MB header line, or 100,000 headers, were read whole and answered 200 (measured on this
service). This protocol counts the head's bytes and headers as the parser goes and, over either
cap, answers 431 HEADERS_TOO_LARGE in the envelope and closes the connection, so a head costs at
most one read buffer beyond its cap.
"""

from __future__ import annotations

import uuid

from uvicorn.protocols.http import auto
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.errors import ClassifierError, ErrorCode
from .envelope import error_body
from .headers import REQUEST_ID_HEADER

MAX_HEAD_BYTES = 64 * 1024  # what nginx allows by default (4 buffers of 8 KiB) is less
MAX_HEADERS = 100  # Apache's LimitRequestFields


class _HeadTooLarge(Exception):
    pass


class CappedHttpToolsProtocol(HttpToolsProtocol):
    _in_head = False  # between a request's first byte and the end of its headers
    _head_refused = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0
        self._head_refused = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._head_refused = True
            raise _HeadTooLarge  # the parser stops; uvicorn calls send_400_response
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)  # this chunk ended inside a head
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if self._head_refused:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        request_id = str(uuid.uuid4())
        refusal = ClassifierError(
            ErrorCode.HEADERS_TOO_LARGE,
            f"the request's headers are over the limit of {MAX_HEAD_BYTES:,} bytes "
            f"or {MAX_HEADERS} fields",
        )
        body = error_body(refusal, request_id)
        head = (
            f"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{REQUEST_ID_HEADER}: {request_id}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body)
        self.transport.close()


def install() -> None:
    """Make uvicorn's "auto" HTTP protocol (what BentoML's workers use) this one. Call before
    the server loads its config: importing service.py does."""
    auto.AutoHTTPProtocol = CappedHttpToolsProtocol
