"""The BentoML service: it declares the models, the apis and the hooks; `image_classifier` works.

Run it with `make serve`, or `bentoml serve service:ImageClassifier` once the model is in the
store. What each piece does lives in the floors below (README, "Where things live").
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import bentoml

import bentoml_compat
from image_classifier import model_store
from image_classifier.http import grpc_inference, logs, protocol
from image_classifier.http.admission import AdmissionPolicy, Gate
from image_classifier.http.apis import UploadApis, upload_of
from image_classifier.http.body import BodyPace
from image_classifier.http.boundary import BoundaryMiddleware
from image_classifier.http.cors import EnvelopedCORS, cors_options
from image_classifier.http.protocol import EarlyRefusal
from image_classifier.http.routes import build_app, infer_upload_routes
from image_classifier.http.schemas import AnalyzeBatchResponse, AnalyzeResponse
from image_classifier.http.shutdown import drain_on_sigterm
from image_classifier.http.uploads import routes_of_apis
from image_classifier.serving import event_loop, machine, memory, metrics, worker_state
from image_classifier.serving.predictor import Predictor
from image_classifier.serving.settings import Settings

SETTINGS = Settings.at_start()
memory.limit_malloc_arenas()  # before any thread starts: bounded memory per worker
machine.share_the_interpreter_lock(SETTINGS.gil_switch_interval_ms)  # the event loop's turn
logs.configure_logging(SETTINGS.log_format)  # BentoML configured logging before importing us
bentoml_compat.mend_bentoml()
bentoml_compat.prepare_serving(SETTINGS, model_store.pin_for_workers)  # sockets, one version
GATE = Gate(AdmissionPolicy.from_settings(SETTINGS))  # per worker: admits, and SIGTERM drains
WORKER_SLOT = bentoml.server_context.worker_index or 0  # this worker's slot in shared counts
log = logging.getLogger("image_classifier.service")
log.log(logging.WARNING if SETTINGS.over_the_cpus else logging.INFO, "sized: %s", SETTINGS.sizing)


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.workers,
    # One access line per request is ours (JSON, with model version, label and error code).
    logging={"access": {"enabled": False}},
    # BentoML's OpenTelemetry spans cost more CPU than a refusal itself: only with TRACING=1.
    tracing={} if SETTINGS.tracing else {"excluded_urls": [".*"]},
)
@bentoml.asgi_app(  # /info, /ui and /v2: it claims only its own routes
    build_app(bentoml.get_current_service, SETTINGS),
    path="/",
)
class ImageClassifier:
    # Class level, so `bentoml build` packages them: the served version and an optional candidate.
    model, candidate = model_store.served_pair(SETTINGS.model_tag, SETTINGS.candidate_model_tag)

    def __init__(self) -> None:
        event_loop.watch()  # its lateness and the garbage collector's pauses on /metrics
        replaced = metrics.forget_dead_workers()
        for pid in replaced:
            log.warning("worker %d died without shutting down; this worker replaces it", pid)
        served = [(str(m.tag), Path(m.path)) for m in (self.model, self.candidate) if m]
        self.predictor = Predictor.for_models(SETTINGS, served, WORKER_SLOT)
        self.apis = UploadApis(self.predictor)
        if replaced:  # the others serve: take no connection before ready (until __init__ ends)
            self._load_models()
        else:  # /livez answers at once; /readyz and early requests say NOT_READY until loaded
            threading.Thread(target=self._load_models, name="model-loader", daemon=True).start()
        stop_grpc = grpc_inference.serve_in_background(
            lambda: self.predictor, GATE, SETTINGS, self.__is_ready__, WORKER_SLOT
        )
        drain_on_sigterm(GATE, SETTINGS.shutdown_grace_s, then=stop_grpc)

    def _load_models(self) -> None:
        try:
            self.predictor.load_models()
        except Exception as exc:
            log.error("%s; /readyz stays 503. %s", exc, model_store.MODEL_HELP)
            return
        memory.freeze_startup_objects()
        worker_state.loaded()  # /readyz waits for every worker's
        self.__is_ready__()

    def __is_ready__(self) -> bool:
        ready = self.predictor.router.all_loaded() and not GATE.draining
        metrics.READY.set(1 if ready else 0)
        return ready and worker_state.every_worker_loaded(SETTINGS.workers)

    @bentoml.api(route="/analyze")
    async def analyze(
        self, image: Path, top_k: int | None = None, ctx: bentoml.Context = None
    ) -> AnalyzeResponse:
        """Classify one image (multipart field `image`). Header `X-Model-Version` pins a version."""
        return await self.apis.analyze(upload_of([image], top_k, ctx.request.headers))

    @bentoml.api(route="/analyze_batch")
    async def analyze_batch(
        self, images: list[Path], top_k: int | None = None, ctx: bentoml.Context = None
    ) -> AnalyzeBatchResponse:
        """Classify many images (multipart field `images`); a bad image fails only its own item."""
        return await self.apis.analyze_batch(upload_of(images, top_k, ctx.request.headers))


ROUTES = {  # the upload routes: bodies capped and read by the boundary
    **routes_of_apis(
        ImageClassifier.apis.values(), SETTINGS, lambda: bentoml.get_current_service().apis
    ),
    **infer_upload_routes(SETTINGS, lambda: bentoml.get_current_service().predictor),
}
if SETTINGS.cors_origins:  # outermost: it answers preflights, and marks every answer, errors too
    ImageClassifier.add_asgi_middleware(EnvelopedCORS, **cors_options(SETTINGS.cors_origins))
ImageClassifier.add_asgi_middleware(
    BoundaryMiddleware, gate=GATE, pace=BodyPace.from_settings(SETTINGS), upload_routes=ROUTES
)
# Before the server loads its config: request heads are capped, and overload is refused there.
EARLY_REFUSAL = EarlyRefusal(GATE, ROUTES, SETTINGS.body_timeout_s)
protocol.install(EARLY_REFUSAL, SETTINGS.workers, WORKER_SLOT)
