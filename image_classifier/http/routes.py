"""The routes BentoML apis cannot declare, as a small FastAPI app: `/info`, the browser page
`/ui` and the Open Inference Protocol v2 (`/v2/...`, KServe's and Triton's REST protocol).

BentoML apis are POST-only and take multipart or JSON of their own shape, so these live here. The
service hands in a way to reach its predictor; this module never imports BentoML.

FastAPI, not plain Starlette, because BentoML merges a mounted FastAPI app's OpenAPI paths into
the document it serves at `/docs.json` (and no other app's): so these routes are documented
there, from the pydantic models that describe them. The handlers still read the raw request (the
infer body may be Triton's binary form) and answer plain responses; the models only document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import compile_path

from ..core.errors import ClassifierError, ErrorCode
from ..serving import open_inference as oip
from ..serving.predictor import Predictor
from ..serving.routing import ModelRouter, ServedVersion
from ..serving.settings import Settings
from . import logs, open_inference
from .envelope import error_response, is_open_inference_path
from .headers import MODEL_VERSION_HEADER, REQUEST_ID_HEADER
from .schemas import ErrorEnvelope, Info
from .uploads import UploadRoute

UI_PAGE = Path(__file__).resolve().parents[1] / "static" / "ui.html"
_MODEL = "/v2/models/{name}"
_VERSIONED = "/v2/models/{name}/versions/{version}"
INFER_PATHS = (f"{_MODEL}/infer", f"{_VERSIONED}/infer")
_WHY = {
    400: "not a valid inference request (INVALID_REQUEST)",
    401: "API_TOKENS is set and no valid bearer token came (UNAUTHORIZED)",
    404: "no model of that name, or version, is served here (NOT_FOUND, UNKNOWN_MODEL_VERSION)",
    408: "the body came too slowly (REQUEST_TIMEOUT)",
    413: "body over the cap, or more items than MAX_BATCH_IMAGES (PAYLOAD_TOO_LARGE)",
    415: "an item is not an allowed image format (UNSUPPORTED_MEDIA_TYPE)",
    422: "an image is corrupt, or has too many pixels (INVALID_IMAGE, IMAGE_TOO_LARGE)",
    429: "over this client's RATE_LIMIT (RATE_LIMITED; Retry-After)",
    503: "model not loaded yet, overloaded, or shutting down (Retry-After)",
    504: "no answer within REQUEST_TIMEOUT_S (TIMEOUT)",
}
_GUARDED = (401, 429, 503)  # any route outside admission.OPEN_PATHS: token, rate, drain
# What /analyze and /analyze_batch answer besides 200, each in the envelope (404: a version pin
# names no served version); `bentoml_compat` writes them into BentoML's own operations.
UPLOAD_ERRORS = {
    status: _WHY[status] for status in (400, 401, 404, 408, 413, 415, 422, 429, 503, 504)
}
_MODEL_ROUTE = (*_GUARDED, 404)
_INFER = (*_MODEL_ROUTE, 400, 408, 413, 415, 422, 504)


_INFER_PATTERNS = tuple(compile_path(path)[0] for path in INFER_PATHS)  # Starlette's own


def infer_upload_routes(
    settings: Settings, get_predictor: Callable[[], Predictor]
) -> dict[str, UploadRoute]:
    """The infer routes as the boundary middleware answers them, from the body it has read (no
    framework routing per request: measured, it cost Open Inference requests more CPU than
    /analyze's). Their bodies are JSON with base64 images (4/3 of their bytes) plus some slack."""
    limits = oip.Limits.from_settings(settings)

    async def answer(path: str, headers: Headers, body: bytes) -> Response:
        found = next(filter(None, (pattern.match(path) for pattern in _INFER_PATTERNS)), None)
        if found is None:  # the route's glob also matches deeper paths
            raise ClassifierError(ErrorCode.NOT_FOUND, f"no inference route {path}")
        name, version = found["name"], found.groupdict().get("version")
        return await _infer(get_predictor(), limits, name, version, headers, body)

    route = UploadRoute(None, settings.max_batch_bytes * 4 // 3 + 2**20, answer_body=answer)
    return {path.replace("{name}", "*").replace("{version}", "*"): route for path in INFER_PATHS}


async def _infer(
    predictor: Predictor,
    limits: oip.Limits,
    name: str,
    version: str | None,
    headers: Headers,
    body: bytes,
) -> Response:
    served = oip.served_model(predictor.router, name, version, headers.get(MODEL_VERSION_HEADER))
    logs.annotate(model_version=served.ref.version)
    card = served.ready_classifier().card
    header_length = open_inference.header_length(headers.getlist(open_inference.HEADER_LENGTH))
    rest = open_inference.parse_request(body, header_length, limits, card)
    result = await oip.infer(predictor, served, rest.request, limits)
    response_body, response_headers = open_inference.encode_response(result, rest, card.labels)
    response_headers[MODEL_VERSION_HEADER] = served.ref.version
    return Response(response_body, headers=response_headers)


def _parameter(name: str, where: str, description: str) -> dict[str, Any]:
    """A string parameter, declared in the document only (FastAPI would also validate a declared
    one, and document a 422 no client can get): the handlers read the raw request."""
    required = where == "path"
    return {"name": name, "in": where, "required": required, "description": description,
            "schema": {"type": "string"}}  # fmt: skip


_NAME = _parameter("name", "path", "the model's name, e.g. digits-cnn")
_PARAMETERS = {
    _MODEL: [_NAME, _parameter(MODEL_VERSION_HEADER, "header", "pins the version (canary)")],
    _VERSIONED: [_NAME, _parameter("version", "path", "a served version of it, e.g. v1")],
}
_BINARY_HEADER = _parameter(
    open_inference.HEADER_LENGTH, "header",
    "binary tensor data: the JSON header's byte count; the inputs' raw data (per their "
    "binary_data_size parameter) follows it in the body",
)  # fmt: skip


def _answers(error: type[BaseModel], statuses: tuple[int, ...]) -> dict[int | str, Any]:
    return {status: {"model": error, "description": _WHY[status]} for status in sorted(statuses)}


class ServiceView(Protocol):
    """What the routes need of the service: its predictor, and its readiness (every worker's
    models loaded, not draining), which `/readyz` and gRPC answer too."""

    predictor: Predictor

    def __is_ready__(self) -> bool: ...


def build_app(get_service: Callable[[], ServiceView], settings: Settings) -> FastAPI:
    """`get_service` is called per request: the service instance exists only once serving."""
    ui_page = UI_PAGE.read_text(encoding="utf-8")
    max_items = settings.max_batch_images

    def get_predictor() -> Predictor:
        return get_service().predictor

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(get_predictor().info())

    async def ui(request: Request) -> HTMLResponse:
        return HTMLResponse(ui_page)

    async def server_metadata(request: Request) -> JSONResponse:
        return JSONResponse(oip.server_metadata())

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> JSONResponse:
        for served in get_predictor().router.models:
            served.ready_classifier()  # NOT_READY, naming a model still loading here
        if not get_service().__is_ready__():  # another worker still loading, or draining
            raise ClassifierError(ErrorCode.NOT_READY, "the server is not ready to serve")
        return JSONResponse({"ready": True})

    async def model_ready(request: Request) -> JSONResponse:
        served = _model(request, get_predictor().router)
        served.ready_classifier()
        return JSONResponse({"name": served.ref.name, "ready": True})

    async def model_metadata(request: Request) -> JSONResponse:
        served = _model(request, get_predictor().router)
        router, card = get_predictor().router, served.ready_classifier().card
        versions = oip.served_versions(router, served.ref.name)
        return JSONResponse(oip.model_metadata(card, served.ref.name, versions, max_items))

    async def model_config(request: Request) -> JSONResponse:
        served = _model(request, get_predictor().router)
        card = served.ready_classifier().card
        return JSONResponse(oip.model_config(card, served.ref.name, max_items))

    async def infer(request: Request) -> Response:  # served by the boundary; here documented
        params = request.path_params
        return await _infer(
            get_predictor(), settings, params["name"], params.get("version"), request.headers,
            await request.body(),
        )  # fmt: skip

    app = FastAPI(
        title="image_classifier",
        openapi_url=None,  # the one document is BentoML's /docs.json, which holds these routes
        docs_url=None,
        redoc_url=None,
        exception_handlers={ClassifierError: _envelope},
    )
    app.get(
        "/info", response_model=Info, responses=_answers(ErrorEnvelope, _GUARDED),
        summary="service and model versions, labels, preprocessing, card metrics, limits",
    )(info)  # fmt: skip
    app.get("/ui", response_class=HTMLResponse, summary="the browser page")(ui)
    v2 = _answers(open_inference.OpenInferenceError, _GUARDED)
    app.get(
        "/v2", response_model=open_inference.ServerMetadata, responses=v2,
        summary="server metadata and extensions",
    )(server_metadata)  # fmt: skip
    app.get("/v2/health/live", response_model=open_inference.ServerLive)(live)
    app.get(
        "/v2/health/ready", response_model=open_inference.ServerReady,
        responses=_answers(open_inference.OpenInferenceError, (503,)),
    )(ready)  # fmt: skip
    _refuse_extensions_not_served(app)  # before /v2/models/{name}: "stats" is not a model
    model_errors = _answers(open_inference.OpenInferenceError, _MODEL_ROUTE)
    infer_body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": open_inference.inlined_schema(open_inference.InferenceRequestBody)
            }
        },
    }
    infer_answers = {
        200: {
            "description": "the outputs; raw after the JSON header when binary_data asks",
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        },
        **_answers(open_inference.OpenInferenceError, _INFER),
    }
    for base, parameters in _PARAMETERS.items():
        for path, handler, model in (
            (base, model_metadata, open_inference.ModelMetadata),
            (f"{base}/ready", model_ready, open_inference.ModelReady),
            (f"{base}/config", model_config, open_inference.ModelConfig),
        ):
            app.get(
                path, response_model=model, responses=model_errors,
                openapi_extra={"parameters": parameters},
            )(handler)  # fmt: skip
        app.post(
            f"{base}/infer", response_model=open_inference.InferenceResponse,
            responses=infer_answers,
            openapi_extra={"parameters": [*parameters, _BINARY_HEADER], "requestBody": infer_body},
        )(infer)  # fmt: skip
    _answer_head(app)
    return app


# Triton's HTTP extensions this server does not serve, and why (tritonclient has a method for
# each: its users get the reason, not a bare "Not Found", nor "model stats is not served").
_NOT_SERVED_EXTENSIONS = {
    "/v2/models/stats": "statistics",
    "/v2/models/{name}/stats": "statistics",
    "/v2/models/{name}/versions/{version}/stats": "statistics",
    "/v2/repository/{rest:path}": "model repository",
    "/v2/systemsharedmemory{rest:path}": "shared memory",
    "/v2/cudasharedmemory{rest:path}": "shared memory",
    "/v2/logging": "logging",
    "/v2/trace/setting": "trace",
    "/v2/models/{name}/trace/setting": "trace",
}
_INSTEAD = {
    "statistics": "GET /metrics has the service's Prometheus metrics",
    "model repository": "models are baked into the bento; deploy a new version",
    "shared memory": "send tensors in the request body",
    "logging": "set LOG_FORMAT at start",
    "trace": "set TRACING at start",
}


def _refuse_extensions_not_served(app: FastAPI) -> None:
    for path, extension in _NOT_SERVED_EXTENSIONS.items():
        refuse = _refusal(f"the {extension} extension is not served here: {_INSTEAD[extension]}")
        app.add_api_route(path, refuse, methods=["GET", "POST"], include_in_schema=False)


def _refusal(message: str) -> Callable[[Request], Awaitable[Response]]:
    async def refuse(request: Request) -> Response:
        raise ClassifierError(ErrorCode.NOT_FOUND, message)

    return refuse


def _answer_head(app: FastAPI) -> None:
    """Every GET route answers HEAD too, as HTTP asks (RFC 9110 9.3.2; the server drops the
    body): FastAPI, unlike Starlette, routes only the methods declared. Undocumented, so each
    operation is listed once in /docs.json."""
    for route in list(app.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods:
            app.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False)


def _model(request: Request, router: ModelRouter) -> ServedVersion:
    params, pinned = request.path_params, request.headers.get(MODEL_VERSION_HEADER)
    return oip.served_model(router, params["name"], params.get("version"), pinned, canary=False)


async def _envelope(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClassifierError)
    request_id = request.headers.get(REQUEST_ID_HEADER, "")
    return error_response(exc, request_id, is_open_inference_path(request.url.path))
