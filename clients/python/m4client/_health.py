"""The standard gRPC health service (grpc.health.v1) as the client calls it, without the
grpcio-health-checking package: the client distribution needs grpcio and protobuf only.

The two messages are tiny (a service name; a serving status), so they are declared here in
a private descriptor pool and called by method path. `check()` asks once, `watch()` follows
the status as the daemon changes it (no polling).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "/grpc.health.v1.Health/"
#: HealthCheckResponse.ServingStatus by number.
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1


def _messages() -> tuple[Any, Any]:
    """HealthCheckRequest {string service = 1} and HealthCheckResponse {status = 1} (the enum
    is read as its number: the same bytes on the wire)."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="m4client/health.proto",
                                               package="grpc.health.v1", syntax="proto3")
    for name, fname, ftype in (("HealthCheckRequest", "service", field.TYPE_STRING),
                               ("HealthCheckResponse", "status", field.TYPE_INT32)):
        message = proto.message_type.add(name=name)
        message.field.add(name=fname, number=1, type=ftype, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()  # private: no clash with grpc_health's own
    pool.Add(proto)
    return tuple(message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"grpc.health.v1.{n}"))
        for n in ("HealthCheckRequest", "HealthCheckResponse"))


Request, Response = _messages()


def check(channel: grpc.Channel, timeout: float | None) -> int:
    """The daemon's overall serving status (a number of STATUS_NAMES); raises grpc.RpcError."""
    call = channel.unary_unary(SERVICE + "Check", request_serializer=Request.SerializeToString,
                               response_deserializer=Response.FromString)
    return int(call(Request(service=""), timeout=timeout).status)


def watch(channel: grpc.Channel, timeout: float | None) -> Iterator[int]:
    """Every serving status the daemon reports until `timeout`, waiting for the channel to
    connect first; raises grpc.RpcError (DEADLINE_EXCEEDED when the time is up)."""
    call = channel.unary_stream(SERVICE + "Watch", request_serializer=Request.SerializeToString,
                                response_deserializer=Response.FromString)
    for reply in call(Request(service=""), timeout=timeout, wait_for_ready=True):
        yield int(reply.status)
