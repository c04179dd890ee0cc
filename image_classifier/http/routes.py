"""The routes BentoML apis cannot declare, as a small Starlette app: `/info`, the browser page
`/ui` and the Open Inference Protocol v2 (`/v2/...`, KServe's and Triton's REST protocol).

BentoML apis are POST-only and take multipart or JSON of their own shape, so these live here. The
service hands in a way to reach its predictor; this module never imports BentoML.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..core.errors import ClassifierError
from ..serving import open_inference as oip
from ..serving.predictor import Predictor
from ..serving.routing import ModelRouter, ServedVersion
from ..serving.settings import Settings
from . import open_inference
from .envelope import error_response, is_open_inference_path
from .headers import MODEL_VERSION_HEADER, REQUEST_ID_HEADER
from .uploads import UploadRoute

UI_PAGE = Path(__file__).resolve().parents[1] / "static" / "ui.html"
_MODEL = "/v2/models/{name}"
_VERSIONED = "/v2/models/{name}/versions/{version}"
INFER_PATHS = (f"{_MODEL}/infer", f"{_VERSIONED}/infer")


def infer_upload_routes(settings: Settings) -> dict[str, UploadRoute]:
    """Open Inference bodies are JSON with base64 images (4/3 of their bytes) plus some slack."""
    cap = UploadRoute(None, settings.max_batch_bytes * 4 // 3 + 2**20)
    return {path.replace("{name}", "*").replace("{version}", "*"): cap for path in INFER_PATHS}


def build_app(
    get_predictor: Callable[[], Predictor], max_items: int, max_item_bytes: int
) -> Starlette:
    """`get_predictor` is called per request: the service instance exists only once serving."""
    ui_page = UI_PAGE.read_text(encoding="utf-8")

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
            served.ready_classifier()
        return JSONResponse({"ready": True})

    async def model_ready(request: Request) -> JSONResponse:
        served = _model(request, get_predictor().router)
        served.ready_classifier()
        return JSONResponse({"name": served.ref.name, "ready": True})

    async def model_metadata(request: Request) -> JSONResponse:
        served = _model(request, get_predictor().router)
        ref, card = served.ref, served.ready_classifier().card
        return JSONResponse(oip.model_metadata(card, ref.name, ref.version, max_items))

    async def model_config(request: Request) -> JSONResponse:
        served = _model(request, get_predictor().router)
        card = served.ready_classifier().card
        return JSONResponse(oip.model_config(card, served.ref.name, max_items))

    async def infer(request: Request) -> Response:
        predictor = get_predictor()
        served = _model(request, predictor.router)
        rest = open_inference.parse_request(
            await request.body(), request.headers.get(open_inference.HEADER_LENGTH)
        )
        result = await oip.infer(predictor, served, rest.request, max_items, max_item_bytes)
        labels = served.ready_classifier().card.labels
        body, headers = open_inference.encode_response(result, rest, labels)
        headers[MODEL_VERSION_HEADER] = served.ref.version
        return Response(body, headers=headers)

    routes = [
        Route("/info", info),
        Route("/ui", ui),
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        *(Route(base, model_metadata) for base in (_MODEL, _VERSIONED)),
        *(Route(f"{base}/ready", model_ready) for base in (_MODEL, _VERSIONED)),
        *(Route(f"{base}/config", model_config) for base in (_MODEL, _VERSIONED)),
        *(Route(path, infer, methods=["POST"]) for path in INFER_PATHS),
    ]
    return Starlette(routes=routes, exception_handlers={ClassifierError: _envelope})


def _model(request: Request, router: ModelRouter) -> ServedVersion:
    params, pinned = request.path_params, request.headers.get(MODEL_VERSION_HEADER)
    return oip.served_model(router, params["name"], params.get("version"), pinned)


async def _envelope(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClassifierError)
    request_id = request.headers.get(REQUEST_ID_HEADER, "")
    return error_response(exc, request_id, is_open_inference_path(request.url.path))
