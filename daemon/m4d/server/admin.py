"""The Admin servicer, served only on the admin socket: daemon status for `m4ctl status`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import grpc
import torch
from m4.admin.v1 import admin_pb2 as pb
from m4.admin.v1 import admin_pb2_grpc as pb_grpc

from m4d.server.status import unary

if TYPE_CHECKING:
    from m4d.server.daemon import Daemon

_STATES = {"loading": pb.DAEMON_STATE_LOADING, "ready": pb.DAEMON_STATE_READY,
           "draining": pb.DAEMON_STATE_DRAINING}


def rss_bytes() -> int:
    """Resident memory of this process, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class AdminServicer(pb_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @unary
    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        d = self.daemon
        out = pb.StatusResponse(
            daemon_version=d.version, state=_STATES[d.state.value],
            uptime_seconds=d.uptime, memory_rss_bytes=rss_bytes(),
            threads=torch.get_num_threads())
        if d.image is not None:
            out.image_name = d.image.manifest.name
            out.image_version = d.image.manifest.version
            out.image_digest = d.image.digest
        if d.engine is not None:
            s = d.engine.snapshot()
            out.requests_in_flight = s["in_flight"]
            out.requests_total = s["total"]
            out.requests_cancelled = s["cancelled"]
            out.requests_rejected = s["rejected"]
            out.tokens_generated = s["tokens_generated"]
            out.tokens_prompted = s["tokens_prompted"]
            out.active_sequences = s["active_sequences"]
            out.kv_slots = s["kv_slots"]
        if d.runtime is not None:
            for c in d.runtime.components:
                out.components.append(pb.ComponentStatus(
                    name=c.name, kind=c.kind, parameters=c.parameters,
                    weight_format=c.weight_format, compute_dtype=c.compute_dtype,
                    device=c.device))
        return out
