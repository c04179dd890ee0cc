"""The GET pages and the Open Inference Protocol routes, as a small Starlette app.

BentoML apis are POST-only and take multipart or JSON of their own shape, so what does not fit
them lives here: `/info`, the browser page `/ui`, and `/v2/...` (KServe/Triton's REST protocol).
The service passes itself in as the `Backend`; this module never imports BentoML.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from . import __version__, open_inference
from .errors import ClassifierError, ErrorCode, error_envelope
from .routing import MODEL_VERSION_HEADER, ModelRouter, ServedModel

REQUEST_ID_HEADER = "x-request-id"
UI_PAGE = Path(__file__).parent / "static" / "ui.html"


class Backend(Protocol):
    router: ModelRouter
    decode_limiter: anyio.CapacityLimiter

    def info(self) -> dict[str, Any]: ...


def error_response(exc: ClassifierError, request_id: str) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return JSONResponse(
        error_envelope(exc.code, exc.message, request_id), status_code=exc.status, headers=headers
    )


def build_app(get_backend: Callable[[], Backend], max_items: int) -> Starlette:
    """`get_backend` is called per request: the service instance exists only once serving."""
    ui_page = UI_PAGE.read_text(encoding="utf-8")

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(get_backend().info())

    async def ui(request: Request) -> HTMLResponse:
        return HTMLResponse(ui_page)

    async def server_metadata(request: Request) -> JSONResponse:
        return JSONResponse({"name": "image_classifier", "version": __version__, "extensions": []})

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> JSONResponse:
        for served in get_backend().router.models:
            served.ready_classifier()
        return JSONResponse({"ready": True})

    async def model_ready(request: Request) -> JSONResponse:
        served = _model(request, get_backend().router)
        served.ready_classifier()
        return JSONResponse({"name": served.ref.name, "ready": True})

    async def model_metadata(request: Request) -> JSONResponse:
        served = _model(request, get_backend().router)
        ref, card = served.ref, served.ready_classifier().card
        return JSONResponse(open_inference.model_metadata(card, ref.name, ref.version, max_items))

    async def infer(request: Request) -> JSONResponse:
        backend = get_backend()
        served = _model(request, backend.router)
        classifier = served.ready_classifier()
        infer_request = open_inference.parse_request(await request.body(), max_items)
        tensor = infer_request.inputs[0]
        if tensor.datatype == "BYTES":
            inputs = [
                await anyio.to_thread.run_sync(
                    classifier.prepare, data, None, limiter=backend.decode_limiter
                )
                for data in open_inference.encoded_images(tensor)
            ]
        else:
            inputs = list(open_inference.preprocessed_tensor(tensor, classifier.card))
        probabilities = await anyio.to_thread.run_sync(classifier.predict_all, inputs)
        for row in probabilities:
            served.record(classifier.describe(row, 1))
        ref = served.ref
        return JSONResponse(
            open_inference.infer_response(
                infer_request, probabilities, classifier.card, ref.name, ref.version
            ),
            headers={MODEL_VERSION_HEADER: ref.version},
        )

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/info", info),
        Route("/ui", ui),
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        *(Route(base, model_metadata) for base in (model, versioned)),
        *(Route(f"{base}/ready", model_ready) for base in (model, versioned)),
        *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (model, versioned)),
    ]
    return Starlette(routes=routes, exception_handlers={ClassifierError: _envelope})


def _model(request: Request, router: ModelRouter) -> ServedModel:
    """The model a /v2/models/{name}[/versions/{version}] path names; without a version, the
    router chooses (X-Model-Version pin, canary share) among the models of that name."""
    name, version = request.path_params["name"], request.path_params.get("version")
    served_tags = ", ".join(served.tag for served in router.models)
    not_served = ClassifierError(
        ErrorCode.NOT_FOUND, f"model {name}:{version or '*'} is not served here ({served_tags})"
    )
    if version is not None:  # a path that names nothing served is NOT_FOUND, as any other path
        try:
            return router.find(f"{name}:{version}")
        except ClassifierError:
            raise not_served from None
    chosen = router.route(request.headers.get(MODEL_VERSION_HEADER))
    if chosen.ref.name == name:
        return chosen
    for served in router.models:
        if served.ref.name == name:
            return served
    raise not_served


async def _envelope(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClassifierError)
    return error_response(exc, request.headers.get(REQUEST_ID_HEADER, ""))
