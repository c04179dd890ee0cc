"""Open Inference over gRPC (KServe's `inference.GRPCInferenceService`), served by every worker.

Each worker runs a `grpc.aio` server on GRPC_PORT in its own event loop, on the address its HTTP
socket listens on (SO_REUSEPORT: the kernel spreads connections over the workers, as for HTTP).
A call meets what an HTTP request meets: the bearer token (`authorization` metadata), the rate
limit, the size caps, the in-flight cap and the deadline of the `Gate`; then
`serving.open_inference`, on /analyze's predictor path (batching, metrics, drift). Errors are gRPC
status codes with the stable code in front of the message ("INVALID_IMAGE: ..."), repeated in the
`x-error-code` trailing metadata; every call logs one access line with its request id (the
`x-request-id` metadata when it is a safe token), sent back in the trailing metadata. A call the
client gives up on is logged as 499 and counted as CANCELLED or DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format

from ..core.errors import ClassifierError, ErrorCode
from ..core.model_card import ModelCard
from ..serving import metrics
from ..serving import open_inference as oip
from ..serving.predictor import Predictor
from ..serving.settings import Settings
from ..serving.worker_state import directory as shared_directory
from . import logs
from .admission import Gate
from .envelope import HTTP_STATUS, INTERNAL_MESSAGE
from .grpc_receiving import ReadsMessagesItself
from .grpc_spread import FORWARDED_BY, FORWARDED_FOR, CallSpreader, passed_on
from .grpc_standard import INFERENCE_SERVICE, add_standard_services
from .headers import ERROR_CODE_HEADER, MODEL_VERSION_HEADER, REQUEST_ID_HEADER, request_id_for
from .protos import grpc_predict_v2_pb2 as pb
from .protos import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE = f"/{INFERENCE_SERVICE}/"  # the access line's endpoint: SERVICE + method
_background: set[asyncio.Task] = set()  # keeps the start task referenced until it is done
# grpc's deadline timer may cancel a call a little before the clock says its deadline passed.
DEADLINE_SLACK_S = 0.05

GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.INVALID_IMAGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.IMAGE_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNKNOWN_MODEL_VERSION: grpc.StatusCode.NOT_FOUND,
    ErrorCode.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.HEADERS_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.NOT_READY: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.OVERLOADED: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.REQUEST_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
}


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        get_predictor: Callable[[], Predictor],
        gate: Gate,
        settings: Settings,
        is_ready: Callable[[], bool],
        spreader: CallSpreader | None = None,
    ):
        self.get_predictor = get_predictor
        self.gate = gate
        self.is_ready = is_ready  # the service's own readiness, as /readyz answers it
        self.spreader = spreader  # sends ModelInfer calls on to idler workers (grpc_spread.py)
        self.limits = oip.Limits.from_settings(settings)

    # Health: open (no token), unlogged, like /v2/health/* over HTTP.
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return await self._answer(context, "ServerMetadata", lambda: _done(_server_metadata()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        async def ready() -> pb.ModelReadyResponse:
            try:
                served = self._model(request.name, request.version, context, canary=False)
            except ClassifierError as error:  # as Triton answers, and /v2/models/.../ready
                if error.code in _NOT_SERVED:  # does over HTTP: no such model is not ready
                    return pb.ModelReadyResponse(ready=False)
                raise
            return pb.ModelReadyResponse(ready=served.classifier is not None)

        return await self._answer(context, "ModelReady", ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        async def metadata() -> pb.ModelMetadataResponse:
            served = self._model(request.name, request.version, context, canary=False)
            described = oip.model_metadata(
                served.ready_classifier().card,
                served.ref.name,
                oip.served_versions(self.get_predictor().router, served.ref.name),
                self.limits.max_items,
            )
            return pb.ModelMetadataResponse(
                name=described["name"],
                versions=described["versions"],
                platform=described["platform"],
                inputs=described["inputs"],
                outputs=described["outputs"],
            )

        return await self._answer(context, "ModelMetadata", metadata)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> Any:
        """Triton's method (not KServe's): the configuration `/v2/models/{name}/config` gives."""

        async def config() -> pb.ModelConfigResponse:
            served = self._model(request.name, request.version, context, canary=False)
            card = served.ready_classifier().card
            described = oip.model_config(card, served.ref.name, self.limits.max_items)
            return pb.ModelConfigResponse(config=json_format.ParseDict(described, pb.ModelConfig()))

        return await self._answer(context, "ModelConfig", config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        if self.spreader is None:
            return await self._infer_here(request, context)
        if not passed_on(context):
            client = _client_address(context, _metadata(context))
            answer = await self.spreader.send_on(request, context, client)
            if answer is not None:
                return answer
        self.spreader.answering += 1
        try:
            return await self._infer_here(request, context)
        finally:
            self.spreader.answering -= 1

    async def _infer_here(self, request: pb.ModelInferRequest, context: Any) -> Any:
        async def infer() -> pb.ModelInferResponse:
            predictor = self.get_predictor()
            served = self._model(request.model_name, request.model_version, context)
            logs.annotate(model_version=served.ref.version)
            card = served.ready_classifier().card
            parsed = _inference_request(request, self.limits, card)
            result = await oip.infer(predictor, served, parsed, self.limits)
            return _infer_response(result)

        return await self._answer(context, "ModelInfer", infer, in_work=True)

    # Answered here rather than left to the generated servicer, whose NotImplementedError logs a
    # traceback for every call.
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        return await self._answer(context, "RepositoryModelLoad", _no_repository_control)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        return await self._answer(context, "RepositoryModelUnload", _no_repository_control)

    def _model(self, name: str, version: str, context: Any, canary: bool = True):  # noqa: ANN202
        pinned = _metadata(context).get(MODEL_VERSION_HEADER)
        router = self.get_predictor().router
        return oip.served_model(router, name, version or None, pinned, canary)

    async def _answer(
        self, context: Any, method: str, work: Callable[[], Awaitable[T]], in_work: bool = False
    ) -> T:
        """Admit the call, do the work, log one access line; an error aborts with its status."""
        metadata = _metadata(context)
        request_id = request_id_for(metadata.get(REQUEST_ID_HEADER))
        # In the trailers, which every answer has: initial metadata of our own would cost a
        # frame (and a write) of its own on every call.
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        started = time.perf_counter()
        error: ClassifierError | None = None
        status, outcome = 200, "OK"  # outcome: the metric's code
        with logs.request_context(request_id, "GRPC", SERVICE + method) as fields:
            fields["client"] = _client_address(context, metadata).removeprefix("addr:")
            if FORWARDED_BY in metadata and passed_on(context):
                fields["forwarded_by"] = metadata[FORWARDED_BY]  # the worker it came through
            try:
                await self.gate.check_rate(self.client_of(context, metadata))
                async with self._work_slot(in_work):
                    async with asyncio.timeout(self.gate.policy.request_timeout_s):
                        return await work()
            except asyncio.CancelledError:  # grpc cancels the work when the client gives up
                status, outcome = 499, _given_up(context)
                fields["error_code"] = outcome
                raise
            except ClassifierError as exc:
                error = exc
            except TimeoutError:
                limit = self.gate.policy.request_timeout_s
                error = ClassifierError(ErrorCode.TIMEOUT, f"no answer within {limit:g} s")
            except Exception:  # a bug: logged with its traceback, the client gets the code only
                log.exception("unexpected error answering %s", method)
                error = ClassifierError(ErrorCode.INTERNAL_ERROR, INTERNAL_MESSAGE)
            finally:
                if error is not None:
                    status, outcome = HTTP_STATUS[error.code], error.code.value
                    fields["error_code"] = outcome
                    metrics.ERRORS.labels(code=outcome).inc()
                metrics.GRPC_REQUESTS.labels(method=method, code=outcome).inc()
                logs.log_request(fields, status, (time.perf_counter() - started) * 1000)
        await _abort(context, error, request_id)
        raise AssertionError("unreachable: abort raises")

    def client_of(self, context: Any, metadata: dict[str, str] | None = None) -> str:
        """The caller's key for the rate limit and the upload caps: its token's digest when auth
        is on (UNAUTHORIZED without a valid one), else its address."""
        metadata = _metadata(context) if metadata is None else metadata
        client = self.gate.authenticate(metadata.get("authorization"))
        return client or _client_address(context, metadata)

    async def refuse(self, context: Any, method: str, error: ClassifierError) -> NoReturn:
        """A call refused before its message was read, logged and counted like any other."""

        async def refused() -> NoReturn:
            raise error

        await self._answer(context, method, refused)
        raise AssertionError("unreachable: _answer aborts")

    @contextlib.asynccontextmanager
    async def _work_slot(self, in_work: bool):  # noqa: ANN202
        if not in_work:
            yield
            return
        self.gate.check_not_draining()  # a call arrives whole: no receiving phase to refuse in
        await self.gate.enter()
        try:
            with metrics.GRPC_IN_WORK.track_inprogress():
                yield
        finally:
            self.gate.leave()


async def _done(value: T) -> T:
    return value


def _server_metadata() -> pb.ServerMetadataResponse:
    """What `GET /v2` announces: gRPC has a method for each extension."""
    return pb.ServerMetadataResponse(**oip.server_metadata())


_NOT_SERVED = (ErrorCode.NOT_FOUND, ErrorCode.UNKNOWN_MODEL_VERSION)


async def _no_repository_control() -> NoReturn:
    raise ClassifierError(
        ErrorCode.METHOD_NOT_ALLOWED,  # gRPC's UNIMPLEMENTED
        "model repository control is not supported: models are baked into the bento; "
        "deploy a new version",
    )


def _given_up(context: Any) -> str:
    """How the client gave up on a call: grpc cancels its handler alike when the client cancels
    and when the call's deadline passes; only the time left tells them apart."""
    remaining = context.time_remaining()  # None: the call had no deadline
    deadline_passed = remaining is not None and remaining < DEADLINE_SLACK_S
    return "DEADLINE_EXCEEDED" if deadline_passed else "CANCELLED"


async def _abort(context: Any, error: ClassifierError, request_id: str) -> None:
    trailing = [(ERROR_CODE_HEADER, error.code.value), (REQUEST_ID_HEADER, request_id)]
    if error.retry_after_s is not None:
        trailing.append(("retry-after", str(error.retry_after_s)))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(GRPC_STATUS[error.code], f"{error.code.value}: {error.message}")


def _metadata(context: Any) -> dict[str, str]:
    """Text metadata by key; of a repeated key the first value counts, as of a repeated header
    over HTTP, so a call with two tokens is judged by the same one on both."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            found.setdefault(key.lower(), value)
    return found


def _client_address(context: Any, metadata: dict[str, str]) -> str:
    """The client's address for rate limiting, as HTTP keys it ("ipv4:1.2.3.4:5678" → host); for
    a call another worker sent on, the address that worker saw."""
    if passed_on(context):
        return metadata.get(FORWARDED_FOR, "addr:unknown")
    peer = context.peer() or "unknown"
    host = peer.split(":", 1)[1].rsplit(":", 1)[0] if ":" in peer else peer
    return "addr:" + host.strip("[]")


def _inference_request(
    message: pb.ModelInferRequest, limits: oip.Limits, card: ModelCard
) -> oip.InferenceRequest:
    """Typed contents are counted before they become Python objects, raw BYTES as they are
    split: more elements than a full batch holds are refused, not converted one by one. Contents
    of another type than the datatype's are refused, as Triton does, not silently ignored."""
    contents_field = {oip.BYTES: "bytes_contents", oip.FP32: "fp32_contents"}
    raw = message.raw_input_contents
    if len(message.inputs) > oip.MAX_INPUTS:
        raise oip.invalid(f"{len(message.inputs):,} inputs; send one")
    if raw and len(raw) != len(message.inputs):
        raise oip.invalid(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    inputs = []
    for index, tensor in enumerate(message.inputs):
        oip.check_name(tensor.name)
        oip.refuse_shared_memory("input", tensor.name, tensor.parameters)
        if raw and tensor.HasField("contents"):  # the .proto: one or the other, never both
            raise oip.invalid(f"input {tensor.name}: send raw_input_contents or contents, not both")
        if not raw and not tensor.HasField("contents"):
            raise oip.invalid(
                f"input {tensor.name}: no data; send raw_input_contents (one entry per input) "
                "or contents"
            )
        own = contents_field.get(tensor.datatype)
        sent = {field.name for field, _ in tensor.contents.ListFields()}
        if own and sent - {own}:
            raise oip.invalid(
                f"input {tensor.name}: a {tensor.datatype} input carries its data in {own} only"
            )
        data: list[bytes] | np.ndarray = []
        if tensor.datatype == oip.BYTES:
            if raw:
                data = oip.split_bytes_elements(raw[index], limits.max_items)
            elif len(tensor.contents.bytes_contents) > limits.max_items:
                raise oip.too_many_items(len(tensor.contents.bytes_contents), limits.max_items)
            else:
                data = list(tensor.contents.bytes_contents)
        elif tensor.datatype == oip.FP32:
            if raw:
                data = oip.fp32_from_raw(raw[index])
            elif len(tensor.contents.fp32_contents) > limits.most_values(card):
                raise oip.too_many_values(limits.most_values(card))
            else:
                data = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        inputs.append(oip.InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data))
    for output in message.outputs:
        oip.refuse_shared_memory("output", output.name, output.parameters)
    outputs = [
        oip.RequestedOutput(output.name, _classification(output)) for output in message.outputs
    ]
    return oip.InferenceRequest(inputs, outputs, message.id or None)


def _classification(output: Any) -> int:
    if "classification" not in output.parameters:
        return 0
    parameter = output.parameters["classification"]
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind else None
    return oip.requested_classification(output.name, value)


def _infer_response(result: oip.InferenceResult) -> pb.ModelInferResponse:
    """Outputs as raw contents, as Triton answers (its clients and KServe's read both forms)."""
    response = pb.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=result.id or ""
    )
    for output in result.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(oip.raw_contents(output))
    return response


def listening_host() -> str:
    """The address this worker's HTTP socket listens on (BentoML hands workers `--fd N`), so
    `--host 127.0.0.1` keeps gRPC local too; 127.0.0.1 when it cannot be told."""
    try:
        fd = int(sys.argv[sys.argv.index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as listening:
            host = listening.getsockname()[0]
    except (ValueError, IndexError, OSError):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class _TritonOnlyMethods(grpc.GenericRpcHandler):
    """Triton's methods beyond KServe's protocol and ModelConfig (statistics, shared memory,
    ModelStreamInfer...) are refused with UNIMPLEMENTED, the code and what is served, as over
    HTTP, not with grpc's bare "Method not found!"; logged and counted as every call is (a
    method name that is not Triton's counts as `unknown`: the metric's labels stay few)."""

    SERVED = ", ".join(
        method
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
        if not method.startswith("Repository")  # in the proto, but refused: no model control
    )
    TRITONS = frozenset({
        "ModelStreamInfer", "ModelStatistics", "RepositoryIndex", "TraceSetting", "LogSettings",
        "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    })  # fmt: skip

    def __init__(self, service: InferenceService) -> None:
        self.refuse = service.refuse

    def service(self, handler_call_details: Any) -> Any:
        if not handler_call_details.method.startswith(SERVICE):
            return None
        name = handler_call_details.method.removeprefix(SERVICE)[:80]
        error = ClassifierError(
            ErrorCode.METHOD_NOT_ALLOWED,
            f"{name} is not served here; the methods served are: {self.SERVED}",
        )
        counted_as = name if name in self.TRITONS else "unknown"

        async def refuse(_requests: Any, context: Any) -> None:
            await self.refuse(context, counted_as, error)

        return grpc.stream_stream_rpc_method_handler(refuse)


def build_server(
    get_predictor: Callable[[], Predictor],
    gate: Gate,
    settings: Settings,
    is_ready: Callable[[], bool],
    spreader: CallSpreader | None = None,
) -> tuple[grpc.aio.Server, InferenceService]:
    """The server, not started (`await server.start()` in the worker's event loop), and the
    service it serves. Messages twice the batch cap still arrive, so that a large one gets the
    PAYLOAD_TOO_LARGE code."""
    service = InferenceService(get_predictor, gate, settings, is_ready, spreader)
    server = grpc.aio.server(
        interceptors=[
            ReadsMessagesItself(
                SERVICE, gate, settings.body_timeout_s, service.client_of, service.refuse
            )
        ],
        options=[
            ("grpc.max_receive_message_length", 2 * settings.max_batch_bytes + 2**20),
            ("grpc.so_reuseport", 1),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    server.add_generic_rpc_handlers((_TritonOnlyMethods(service),))  # after the protocol's own
    add_standard_services(server, is_ready)  # health checks and reflection, for tools
    server.add_insecure_port(f"{listening_host()}:{settings.grpc_port}")
    return server, service


def serve_in_background(
    get_predictor: Callable[[], Predictor],
    gate: Gate,
    settings: Settings,
    is_ready: Callable[[], bool],
    worker_slot: int = 0,
) -> Callable[[], Awaitable[None]] | None:
    """Start this worker's gRPC server in the running event loop (GRPC_PORT=0: none); returns
    what stops it, for after the SIGTERM drain. `worker_slot`: this worker's number, by which
    the others find its unix socket."""
    if not settings.grpc_port:
        return None
    in_work = get_predictor().in_work
    spreader = CallSpreader.for_worker(in_work, worker_slot, settings.workers, shared_directory())
    server, service = build_server(get_predictor, gate, settings, is_ready, spreader)
    loop = asyncio.get_running_loop()
    starting = [server.start()]
    if spreader is not None:  # the calls the other workers send on, to its unix socket
        starting.append(spreader.listen(service.ModelInfer))
    for start in starting:
        started = loop.create_task(start)
        _background.add(started)
        started.add_done_callback(_background.discard)
    log.info("Open Inference gRPC on port %d", settings.grpc_port)

    async def stop() -> None:
        await server.stop(grace=1)
        if spreader is not None:
            await spreader.close()

    return stop
