"""A typed Python client: `bentoml.SyncHTTPClient` underneath, pydantic results, typed errors.

The results are the service's own response models (image_classifier.http.schemas), so a field the
server renames breaks here at once instead of somewhere downstream.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bentoml
import httpx
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ConfigDict

from image_classifier.http.schemas import AnalyzeBatchResponse, AnalyzeResponse, ModelRef

from .errors import ClassifierClientError, InvalidInput, TimedOut, Unreachable, error_for

AnalyzeResult = AnalyzeResponse
BatchResult = AnalyzeBatchResponse
Image = Path | str | bytes  # a file, or the encoded bytes of one

DEFAULT_URL = "http://127.0.0.1:3000"
# Longer than the server's own REQUEST_TIMEOUT_S (30 s by default), so a slow request gets the
# server's 504 TIMEOUT, with its request_id, before the client gives up on it.
DEFAULT_TIMEOUT_S = 60.0
API_NAMES = frozenset({"analyze", "analyze_batch"})  # what /schema.json lists for this service


class Limits(BaseModel):
    """The request limits from /info: what a client must stay under to be heard at all."""

    model_config = ConfigDict(extra="allow")
    max_upload_bytes: int
    max_batch_images: int
    max_batch_bytes: int


class ServiceInfo(BaseModel):
    """GET /info. Only the fields clients rely on are typed; the rest is kept as given."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    service: dict[str, str]
    model: ModelRef
    labels: list[str]
    limits: Limits


class ImageClassifierClient:
    """Classify images with a running service.

    Not thread-safe (SyncHTTPClient closes every file it opened after each call): use one
    client per thread.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._timeout = timeout
        try:
            urlsplit(url)  # as SyncHTTPClient parses it, which would let the ValueError out
        except ValueError as exc:  # "http://[::1"
            raise _invalid_url(url, exc) from None
        self._shown_url = _shown(url)
        try:
            self._bento = bentoml.SyncHTTPClient(
                url,
                # "" rather than None: on None, SyncHTTPClient sends $BENTO_CLOUD_API_KEY instead.
                token=token or "",
                timeout=timeout,
                # 0 skips SyncHTTPClient's wait for /readyz, a busy loop when the server is
                # down; a server that is up but still loading answers 503 NOT_READY (Overloaded).
                server_ready_timeout=0,
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:  # no http:// for one
            raise _invalid_url(url, exc) from None
        except httpx.HTTPError as exc:
            raise self._no_answer(exc, self._shown_url) from None
        except (BentoMLException, ValueError, LookupError, TypeError):  # /schema.json: none, or
            raise _not_this_service(url) from None  # not JSON, or not a BentoML schema
        if not self._bento.endpoints.keys() >= API_NAMES:  # another BentoML service
            self._bento.close()
            raise _not_this_service(url)
        # SyncHTTPClient turns a non-2xx answer into a BentoMLException holding the status and
        # the body text (so the code, message and request_id survive) but not the headers, and
        # Retry-After travels only in a header: keep the headers of the last answer here.
        self._last_headers: Mapping[str, str] = {}
        self._bento.client.event_hooks["response"].append(self._keep_headers)

    def analyze(self, image: Image, top_k: int | None = None) -> AnalyzeResult:
        """One image, from a path or from its bytes."""
        with _on_disk([image]) as (path,):
            body = self._call(self._bento.analyze, image=path, **_optional(top_k))
        return AnalyzeResult.model_validate(body)

    def analyze_batch(self, images: Sequence[Image], top_k: int | None = None) -> BatchResult:
        """Many images in one request; a bad image fails only its own item (`success: false`)."""
        if not images:
            raise InvalidInput("INVALID_REQUEST", "send at least one image")
        with _on_disk(images) as paths:
            body = self._call(self._bento.analyze_batch, images=paths, **_optional(top_k))
        return BatchResult.model_validate(body)

    def info(self) -> ServiceInfo:
        """Versions, labels and limits (SyncHTTPClient knows only the POST apis, hence raw GET)."""
        response = self._call(self._bento.request, "GET", "/info")
        if response.is_error:
            raise error_for(response.status_code, response.text, response.headers)
        return ServiceInfo.model_validate(response.json())

    def close(self) -> None:
        self._bento.close()

    def __enter__(self) -> ImageClassifierClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, api: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return api(*args, **kwargs)
        except BentoMLException as exc:
            raise error_for(int(exc.error_code), exc.message, self._last_headers) from None
        except httpx.HTTPError as exc:  # the URL named here too: the server went away mid-run
            raise self._no_answer(exc, self._shown_url) from None

    def _no_answer(self, exc: httpx.HTTPError, where: str = "") -> ClassifierClientError:
        """TimedOut when the server took the request but did not answer in time (that request
        failed); Unreachable when there is no server to talk to (every request will fail)."""
        prefix = f"{where}: " if where else ""
        if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
            message = f"no answer within {self._timeout:g} s (the client's timeout)"
            return TimedOut("TIMEOUT", f"{prefix}{message}")
        return Unreachable("UNREACHABLE", f"{prefix}{exc}")

    def _keep_headers(self, response: httpx.Response) -> None:
        self._last_headers = response.headers


def _shown(url: str) -> str:
    """The URL without the password it may carry (user:password@host), for messages; by pattern,
    so that a URL too broken to parse is shown without it too."""
    return re.sub(r"(//[^/:@]*):[^/]*@", r"\1:***@", url, count=1)


def _invalid_url(url: str, error: Exception) -> InvalidInput:
    return InvalidInput("INVALID_URL", f"{_shown(url)}: {error}")


def _not_this_service(url: str) -> InvalidInput:
    message = (
        f"{_shown(url)} answers, but not as this service (its /schema.json does not list "
        f"{' and '.join(sorted(API_NAMES))}): check the URL"
    )
    return InvalidInput("NOT_THIS_SERVICE", message)


def _optional(top_k: int | None) -> dict[str, int]:
    """Send top_k only when given: SyncHTTPClient would send None as the text "null"."""
    return {} if top_k is None else {"top_k": top_k}


@contextlib.contextmanager
def _on_disk(images: Sequence[Image]) -> Iterator[list[Path]]:
    """Paths for the images: SyncHTTPClient uploads only files, so bytes go to temporary ones."""
    with tempfile.TemporaryDirectory(prefix="classifier-upload-") as tmp:
        paths = []
        for i, image in enumerate(images):
            if isinstance(image, bytes):
                path = Path(tmp) / f"image-{i}"
                path.write_bytes(image)
                paths.append(path)
            elif _utf8(str(image)):
                paths.append(Path(image))
            else:  # a name from a non-UTF-8 disk: the upload's encoding raised UnicodeEncodeError
                readable = os.fsencode(Path(image).name).decode("utf-8", "backslashreplace")
                path = Path(tmp) / f"image-{i}-{readable}"
                path.write_bytes(Path(image).read_bytes())
                paths.append(path)
        yield paths


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
