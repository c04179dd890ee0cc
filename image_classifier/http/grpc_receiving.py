"""gRPC messages read as HTTP upload bodies are (`boundary.py`), not as grpc reads them.

grpc reads a unary call's whole message before its handler runs: a client without a token could
make a worker hold a message of up to twice MAX_BATCH_BYTES per call, a message that stopped
arriving held its stream forever, and bytes that are not the method's protobuf were answered
UNKNOWN with a traceback in the log. So the inference service's unary methods are served as
streams whose handler reads the one message itself: the token is checked first, a ModelInfer
message is counted among the uploads arriving (MAX_RECEIVING, MAX_RECEIVING_PER_CLIENT) and,
once in, against the body-memory budget until answered (MAX_BODY_MEMORY), every message must
arrive within BODY_TIMEOUT_S, and one that does not parse is INVALID_REQUEST.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from ..core.errors import ClassifierError, ErrorCode
from .admission import Gate

OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # health: no token, as over HTTP
UPLOAD_METHODS = frozenset({"ModelInfer"})  # the calls that carry pictures or tensors

Refuse = Callable[[Any, str, ClassifierError], Awaitable[NoReturn]]


class ReadsMessagesItself(grpc.aio.ServerInterceptor):
    """Serves the unary methods under `service_prefix` ("/package.Service/") as said above
    (`body_timeout_s`: BODY_TIMEOUT_S).
    `client_of(context)`: the caller's key (its token's, else its address), raising UNAUTHORIZED;
    `refuse(context, method, error)`: answers a refusal as every other error is answered."""

    def __init__(
        self,
        service_prefix: str,
        gate: Gate,
        body_timeout_s: float,
        client_of: Callable[[Any], str],
        refuse: Refuse,
    ) -> None:
        self.service_prefix = service_prefix
        self.body_timeout_s = body_timeout_s
        self.gate = gate
        self.client_of = client_of
        self.refuse = refuse

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method = details.method.removeprefix(self.service_prefix)
        if handler is None or handler.unary_unary is None or method == details.method:
            return handler

        async def read_then_answer(_requests: Any, context: Any) -> Any:
            return await self._read_then_answer(handler, method, context)

        return grpc.stream_unary_rpc_method_handler(
            read_then_answer, response_serializer=handler.response_serializer
        )

    async def _read_then_answer(self, handler: Any, method: str, context: Any) -> Any:
        upload, client = method in UPLOAD_METHODS, ""
        try:
            if method not in OPEN_METHODS:
                client = self.client_of(context)  # before a byte of the message is read
            if upload:
                self.gate.start_receiving(client)
        except ClassifierError as error:
            await self.refuse(context, method, error)
        held = 0
        try:
            try:
                message = await self._message(context, method)
                request = handler.request_deserializer(message)
            except DecodeError:
                error = ClassifierError(
                    ErrorCode.INVALID_REQUEST,
                    f"not a {method} request: the message is not the protocol's protobuf",
                )
                await self.refuse(context, method, error)
            except _NoMessage as error:
                await self._refuse_ended(context, method, error)
            except ClassifierError as error:
                await self.refuse(context, method, error)
            finally:
                if upload:
                    self.gate.stop_receiving(client)
            if upload:
                held = len(message)
                self.gate.hold_body(held)
            return await handler.unary_unary(request, context)
        finally:
            self.gate.release_body(held)

    async def _message(self, context: Any, method: str) -> bytes:
        limit = self.body_timeout_s
        try:
            async with asyncio.timeout(limit):
                message = await context.read()
        except TimeoutError:
            raise ClassifierError(
                ErrorCode.REQUEST_TIMEOUT, f"the {method} message did not arrive within {limit:g} s"
            ) from None
        if message is grpc.aio.EOF:  # grpc's clients always send one: grpc refused it
            raise _NoMessage(  # (the client already has its RESOURCE_EXHAUSTED)
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"no {method} message arrived: over the largest grpc reads, or none was sent",
            )
        return message

    async def _refuse_ended(self, context: Any, method: str, error: ClassifierError) -> NoReturn:
        """A call whose message grpc refused (over its size limit), answering the client
        itself: logged and counted like any refusal, but grpc may have closed the call by then,
        and sending our answer on it failed with a traceback in the log (an ExecuteBatchError, on
        4 of 6 gzipped messages of 150 MiB in a review). Such a call ends as one the client
        cancelled, which grpc does not log."""
        try:
            await self.refuse(context, method, error)
        except grpc.aio.AbortError:
            raise  # answered: the call was still open
        except Exception:
            raise asyncio.CancelledError from None


class _NoMessage(ClassifierError):
    """The call ended without a message."""
