"""One gRPC channel, every worker: a call that lands on a busy worker goes on to an idler one.

A gRPC client opens one HTTP/2 connection and sends all its calls on it, and the kernel hands a
connection to one worker (SO_REUSEPORT spreads connections, not calls): tritonclient's one
`InferenceServerClient` shared by 16 threads would keep one worker busy and leave the others idle.
So each worker also listens on a private unix socket in the server's shared directory, and a
ModelInfer call that arrives while this worker has more in work than another worker has is sent
on, whole, to the least busy one; its answer, or its error with the trailing metadata, comes back
unchanged (but a worker that cannot take it now, being warmed up, full or draining, leaves it
to this one). One more local hop per call passed on; none for a lone client, whose calls stay
where they land. A call passed on is never passed again, and its client's address goes with it
(`x-forwarded-for`, believed only from the unix socket), so the rate limit keys on the real
client. The worker that answers logs the access line, with the worker it came through.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from ..serving import metrics
from ..serving.worker_state import InWork
from .grpc_standard import INFERENCE_SERVICE
from .headers import ERROR_CODE_HEADER
from .protos import grpc_predict_v2_pb2 as pb

log = logging.getLogger(__name__)
FORWARDED_FOR = "x-forwarded-for"  # the client's address, as the rate limit keys it
FORWARDED_BY = "x-forwarded-by"  # the worker slot the call came through
MODEL_INFER = f"/{INFERENCE_SERVICE}/ModelInfer"
UNIX_PATH_MAX = 107  # sockaddr_un's sun_path, less its terminating zero
RETRY_UNREACHABLE_AFTER_S = 1.0  # a worker not reached, or draining, is left alone this long
# The other worker's error code when it cannot take the call now (warming up, full, draining):
# this one answers it instead. None: the other worker was not reached at all.
_ANSWER_HERE_ON = {None, "NOT_READY", "OVERLOADED", "SHUTTING_DOWN"}
_LEAVE_ALONE_ON = {None, "SHUTTING_DOWN"}  # ...and it is not asked again for a while
# No retries (grpc keeps a copy of every request it may retry: a whole upload per call), and no
# bandwidth probes: a call that fails is answered here, and a unix socket has no bandwidth to learn.
_LOCAL_CHANNEL_OPTIONS = [("grpc.enable_retries", 0), ("grpc.http2.bdp_probe", 0)]


def socket_path(folder: Path, slot: int) -> Path:
    return folder / f"grpc-{slot}.sock"


def passed_on(context: Any) -> bool:
    """True for a call another worker sent on (it came through a unix socket)."""
    return (context.peer() or "").startswith("unix:")


class CallSpreader:
    """Decides, per ModelInfer call, whether another worker should answer it, and sends it."""

    def __init__(self, in_work: InWork, slot: int, workers: int, folder: Path) -> None:
        self.in_work = in_work  # images in work in every worker (decoding, waiting, running)
        self.slot = slot
        self.others = [other for other in range(1, workers + 1) if other != slot]
        self.folder = folder
        self.answering = 0  # ModelInfer calls this worker answers itself, now
        self._sent: Counter[int] = Counter()  # calls sent to each worker and not yet answered
        self._unreachable_until: dict[int, float] = {}
        self._channels: dict[int, grpc.aio.Channel] = {}  # to each other worker, once used
        self._calls: dict[int, Any] = {}  # ModelInfer on each of those channels

    @classmethod
    def for_worker(cls, in_work: InWork, slot: int, workers: int, folder: Path | None):
        """None where there is nobody to spread to, or no socket path short enough for one."""
        if workers < 2 or folder is None or not slot:
            return None
        if len(str(socket_path(folder, workers))) > UNIX_PATH_MAX:
            log.warning("gRPC calls are not spread over workers: %s is too long a path", folder)
            return None
        return cls(in_work, slot, workers, folder)

    def own_address(self) -> str:
        """Where this worker listens for calls sent on by the others (a stale file is removed:
        a dead worker's, whose replacement this is)."""
        path = socket_path(self.folder, self.slot)
        path.unlink(missing_ok=True)
        return f"unix:{path}"

    def least_busy_other(self) -> int | None:
        """The other worker with the least in work, if it has less than this one has now. A
        worker's count is the larger of its images in work and the calls sent to it and not yet
        answered: the first lags a call's arrival there, the second knows only this worker's."""
        here = max(self.in_work.mine, self.answering)
        now = time.monotonic()
        chosen, fewest = None, here
        for other in self.others:
            if self._unreachable_until.get(other, 0) > now:
                continue
            load = max(self.in_work.of(other), self._sent[other])
            if load < fewest:
                chosen, fewest = other, load
        return chosen

    async def send_on(self, request: pb.ModelInferRequest, context: Any, client: str) -> Any:
        """The answer of the least busy other worker, or None to answer here (no worker is less
        busy, or the chosen one could not be reached or cannot take the call now). Its error
        reaches the client as it came: status, message and trailing metadata."""
        other = self.least_busy_other()
        if other is None:
            return None
        metadata = [
            (key, value)
            for key, value in context.invocation_metadata() or ()
            if not key.startswith("grpc-") and key not in (FORWARDED_FOR, FORWARDED_BY)
        ]
        metadata += [(FORWARDED_FOR, client), (FORWARDED_BY, str(self.slot))]
        call = self._model_infer(other)(
            request, metadata=metadata, timeout=context.time_remaining()
        )
        self._sent[other] += 1
        try:
            answer = await call
            trailing = tuple(await call.trailing_metadata() or ())
        except grpc.aio.AioRpcError as failed:
            answer, trailing = failed, tuple(failed.trailing_metadata() or ())
        finally:
            self._sent[other] -= 1
        if isinstance(answer, grpc.aio.AioRpcError):  # the other worker's error, or none reached
            code = dict(trailing).get(ERROR_CODE_HEADER)
            if answer.code() is grpc.StatusCode.UNAVAILABLE and code in _ANSWER_HERE_ON:
                if code in _LEAVE_ALONE_ON:
                    self._unreachable_until[other] = time.monotonic() + RETRY_UNREACHABLE_AFTER_S
                return None
        metrics.GRPC_SENT_ON.inc()
        context.set_trailing_metadata(trailing)
        if isinstance(answer, grpc.aio.AioRpcError):
            await context.abort(answer.code(), answer.details())
        return answer

    def _model_infer(self, other: int) -> Any:
        """The ModelInfer call of one channel per other worker, opened on first use (in the
        event loop that serves gRPC, as `grpc.aio` requires)."""
        if other not in self._calls:
            channel = grpc.aio.insecure_channel(
                f"unix:{socket_path(self.folder, other)}", options=_LOCAL_CHANNEL_OPTIONS
            )
            self._channels[other] = channel
            self._calls[other] = channel.unary_unary(
                MODEL_INFER,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
        return self._calls[other]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
