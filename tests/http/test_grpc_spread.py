"""One gRPC channel's calls spread over workers: which worker answers a call, and what comes back
from another one. The other worker is a real `CallSpreader` listening on its unix socket, with a
stand-in handler; the sending worker's side of its client's call is a stand-in that records what
the client would get. (A real two-worker server with Triton's client:
test_open_inference_clients.py.)"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from image_classifier.http.grpc_spread import (
    FORWARDED_BY,
    FORWARDED_FOR,
    RETRY_UNREACHABLE_AFTER_S,
    CallSpreader,
)
from image_classifier.http.headers import ERROR_CODE_HEADER, REQUEST_ID_HEADER
from image_classifier.http.protos import grpc_predict_v2_pb2 as pb
from image_classifier.http.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from image_classifier.serving.worker_state import InWork

CLIENT = "addr:192.0.2.7"


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """The server's shared directory: the page of images in work, and the workers' sockets."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path


def test_a_call_stays_unless_another_worker_has_less_in_work(folder):
    here, there = InWork(slot=1), InWork(slot=2)
    spreader = CallSpreader(here, slot=1, workers=2, folder=folder)
    assert spreader.least_busy_other() is None  # a lone call: no hop
    spreader.answering = 1
    assert spreader.least_busy_other() == 2
    there.change(1)
    assert spreader.least_busy_other() == 2  # as busy: this one also carries the channel
    there.change(1)
    assert spreader.least_busy_other() is None  # busier than this one: no hop
    here.change(3)
    assert spreader.least_busy_other() == 2


class OtherWorker(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every call, or aborts with `status` and the error code in the trailers."""

    def __init__(
        self, status: grpc.StatusCode | None = None, code: str = "", hold_s: float = 0
    ) -> None:
        self.status, self.code, self.hold_s = status, code, hold_s
        self.metadata: list[dict[str, str]] = []
        self.peers: list[str] = []
        self.holding, self.cancelled = asyncio.Event(), asyncio.Event()

    async def ModelInfer(self, request, context):  # noqa: ANN001, ANN201
        self.metadata.append(dict(context.invocation_metadata()))
        self.peers.append(context.peer())
        if self.hold_s:
            self.holding.set()
            try:
                await asyncio.sleep(self.hold_s)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if self.status is None:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, "id-1"),))
            return pb.ModelInferResponse(model_name=request.model_name, id="answered there")
        context.set_trailing_metadata(((ERROR_CODE_HEADER, self.code),))
        await context.abort(self.status, f"{self.code}: as told")


class Aborted(Exception):
    pass


class ClientCall:
    """The sending worker's context of its client's call: what the client would get."""

    def __init__(self) -> None:
        self.trailing: tuple = ()
        self.aborted: tuple | None = None

    def invocation_metadata(self) -> tuple:
        return (("authorization", "Bearer token-1"), (REQUEST_ID_HEADER, "id-1"),
                (FORWARDED_FOR, "addr:forged"))  # fmt: skip

    def time_remaining(self) -> float:
        return 5.0

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


def send_on(
    folder, other: OtherWorker | None, calls: int = 1
) -> tuple[object, ClientCall, CallSpreader]:
    """Calls sent one after another from worker 1 (one call in work) to worker 2 (idle, or not
    listening); the last one's answer."""

    async def scenario():  # noqa: ANN202
        spreader = CallSpreader(InWork(slot=1), slot=1, workers=2, folder=folder)
        spreader.answering = 1
        listening = CallSpreader(InWork(slot=2), slot=2, workers=2, folder=folder)
        if other is not None:
            await listening.listen(other.ModelInfer)
        call = ClientCall()
        try:
            for _ in range(calls):
                answer = await spreader.send_on(pb.ModelInferRequest(model_name="m"), call, CLIENT)
        except Aborted:
            answer = None
        finally:
            await spreader.close()
            await listening.close()
        return answer, call, spreader

    return asyncio.run(scenario())


def test_the_answer_and_its_trailers_come_back_and_the_client_address_goes_along(folder):
    other = OtherWorker()
    answer, call, _ = send_on(folder, other)
    assert answer.id == "answered there" and call.aborted is None
    assert (REQUEST_ID_HEADER, "id-1") in call.trailing
    seen = other.metadata[0]
    assert seen["authorization"] == "Bearer token-1" and seen[REQUEST_ID_HEADER] == "id-1"
    assert seen[FORWARDED_FOR] == CLIENT and seen[FORWARDED_BY] == "1"  # not the forged one


def test_one_connection_carries_call_after_call(folder):
    other = OtherWorker()
    answer, _, _ = send_on(folder, other, calls=3)
    assert answer.id == "answered there" and len(other.metadata) == 3
    assert len(set(other.peers)) == 1, other.peers  # each call's connection, as the handler saw it


def test_a_call_its_client_gives_up_is_cancelled_in_the_other_worker(folder):
    """The sending worker's handler is cancelled (its client cancelled, or the deadline passed):
    the other worker's work on the call is cancelled too, and the next call is answered."""
    other = OtherWorker(hold_s=30)

    async def scenario():  # noqa: ANN202
        spreader = CallSpreader(InWork(slot=1), slot=1, workers=2, folder=folder)
        spreader.answering = 1
        listening = CallSpreader(InWork(slot=2), slot=2, workers=2, folder=folder)
        await listening.listen(other.ModelInfer)
        request = pb.ModelInferRequest(model_name="m")
        try:
            given_up = asyncio.ensure_future(spreader.send_on(request, ClientCall(), CLIENT))
            await asyncio.wait_for(other.holding.wait(), 5)
            given_up.cancel()
            await asyncio.wait_for(other.cancelled.wait(), 5)  # the work there stops
            other.hold_s = 0
            return await spreader.send_on(request, ClientCall(), CLIENT)
        finally:
            await spreader.close()
            await listening.close()

    assert asyncio.run(scenario()).id == "answered there"


def test_the_other_worker_s_error_reaches_the_client_as_it_came(folder):
    answer, call, _ = send_on(folder, OtherWorker(grpc.StatusCode.INVALID_ARGUMENT, "BAD_IMAGE"))
    assert answer is None
    assert call.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_IMAGE: as told")
    assert (ERROR_CODE_HEADER, "BAD_IMAGE") in call.trailing


@pytest.mark.parametrize("code", ["NOT_READY", "OVERLOADED"])
def test_a_worker_that_cannot_take_the_call_now_leaves_it_to_this_one(folder, code):
    answer, call, spreader = send_on(folder, OtherWorker(grpc.StatusCode.UNAVAILABLE, code))
    assert answer is None and call.aborted is None  # answered here instead
    assert spreader.least_busy_other() == 2  # and asked again next time


def test_a_draining_worker_leaves_the_call_to_this_one_and_is_left_alone(folder):
    answer, call, spreader = send_on(
        folder, OtherWorker(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    )
    assert answer is None and call.aborted is None  # answered here instead
    assert spreader.least_busy_other() is None  # not asked again while it drains


def test_a_worker_not_listening_is_left_alone_for_a_while(folder, monkeypatch):
    answer, call, spreader = send_on(folder, None)
    assert answer is None and call.aborted is None
    assert spreader.least_busy_other() is None
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + RETRY_UNREACHABLE_AFTER_S + 0.1)
    assert spreader.least_busy_other() == 2
