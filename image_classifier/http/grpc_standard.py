"""The standard gRPC services that tools expect beside the inference service.

- Health (`grpc.health.v1.Health/Check`, and `Watch`): what Kubernetes' `grpc:` probes,
  `grpc_health_probe`, Envoy and gRPC's client-side health checking ask. SERVING while the
  service is ready (what /readyz answers: warmed up, not draining), for the whole server ("")
  and for `inference.GRPCInferenceService` by name.
- Server reflection: `grpcurl`, Postman and Evans list and call the inference service (and the
  health check) without their .proto files. It describes from the generated code's own
  descriptor pool (a private one: Triton's client registers the same `inference.*` names in
  protobuf's default pool).

Both are open, like /v2/health/* over HTTP: no token, no access line.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .protos import grpc_predict_v2_pb2 as pb

# "inference.GRPCInferenceService", as the .proto names it (the servers' paths are built from it).
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthCheck(health_pb2_grpc.HealthServicer):
    """`Check` answers from the service's readiness at the moment it is asked (no state to keep
    in step). `Watch`, what gRPC's client-side health checking (`healthCheckConfig`) calls,
    streams the status at once and again on each change, read every WATCH_EVERY_S; an unknown
    service is SERVICE_UNKNOWN and the call stays open, as the protocol says."""

    WATCH_EVERY_S = 1.0

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        self.is_ready = is_ready

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        if request.service not in ("", INFERENCE_SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        known = request.service in ("", INFERENCE_SERVICE)
        sent = None
        while True:  # until the client cancels or the server stops (both cancel this call)
            status = self._status() if known else _SERVICE_UNKNOWN
            if status != sent:
                sent = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(self.WATCH_EVERY_S)

    def _status(self) -> int:
        return _SERVING if self.is_ready() else _NOT_SERVING


def add_standard_services(server: grpc.aio.Server, is_ready: Callable[[], bool]) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(HealthCheck(is_ready), server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME),
        server,
        pool=_described_pool(),
    )


@functools.cache
def _described_pool() -> DescriptorPool:
    """The protocol's private pool (tritonclient puts its own `inference` package in the default
    one), with the health check's file added, so that grpcurl can describe it too."""
    pool = pb.DESCRIPTOR.pool
    pool.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return pool
