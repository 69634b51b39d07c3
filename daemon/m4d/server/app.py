"""The gRPC servers, transport only: what listens, and health.

Two grpc.aio servers: apps on the app socket (Inference, health, reflection) and
administrators on the admin socket (Admin, health). Each listens on a private socket
(`<app socket dir>/.m4d-private/`, mode 0700) behind a PeerRelay that owns the public
socket (bound here, or passed by systemd as "app" / "admin") and tells the servicers the
caller's uid from SO_PEERCRED. Health answers NOT_SERVING until the process life cycle
(`m4d.__main__`) says the model serves, and again once it drains; `stop` lets in-flight
calls end and removes only the sockets this process bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4.inference.v1 import inference_pb2, inference_pb2_grpc

from m4d.config import Config
from m4d.engine.stats import EngineSnapshot
from m4d.server.admin import AdminServicer
from m4d.server.inference import InferenceServicer
from m4d.server.metrics import MetricsServer
from m4d.server.relay import PeerRelay
from m4d.server.sockets import clear_socket_path, private_dir
from m4d.service import systemd
from m4d.service.addons import AddonManager
from m4d.service.daemon import Daemon
from m4d.service.images import ImageManager

log = logging.getLogger(__name__)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def _options(config: Config) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
    ]


def _relays(config: Config) -> tuple[PeerRelay, PeerRelay]:
    """The app and admin relays: on systemd's sockets when it passed them, else on paths."""
    sockets = systemd.listen_fds()  # {} unless socket-activated
    private = private_dir(config.app_socket.parent / ".m4d-private")
    app = PeerRelay(sockets.pop("app", config.app_socket), private / "app.sock",
                    mode=config.app_socket_mode, name="app")
    admin = PeerRelay(sockets.pop("admin", config.admin_socket), private / "admin.sock",
                      mode=config.admin_socket_mode, name="admin")
    for name, sock in sockets.items():
        log.warning("ignoring a socket from systemd", extra={"fd_name": name})
        sock.close()
    return app, admin


class Servers:
    """The app and admin servers, each behind its relay, with their health services."""

    def __init__(self, config: Config, daemon: Daemon, images: ImageManager | None,
                 addons: AddonManager | None = None) -> None:
        self.config = config
        self.daemon = daemon
        self.images = images
        self.addons = addons
        self._health = {INFERENCE: health.aio.HealthServicer(),
                        ADMIN: health.aio.HealthServicer()}
        self._running: list[tuple[grpc.aio.Server, PeerRelay]] = []

    async def set_serving(self, serving: bool) -> None:
        """Health of both servers (the whole server and its service) says whether calls
        are taken."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service, servicer in self._health.items():
            for name in ("", service):
                await servicer.set(name, status)

    async def start(self) -> None:
        """Listens on both sockets, NOT_SERVING. Raises what stops it from listening
        (RelayError, SystemdError, OSError); `stop` then closes what did start."""
        await self.set_serving(False)
        app, admin = _relays(self.config)
        inference = InferenceServicer(self.daemon, peers=app)
        await self._start(app, INFERENCE, lambda server:
                          inference_pb2_grpc.add_InferenceServicer_to_server(inference, server))
        administration = AdminServicer(self.daemon, self.images, peers=admin, addons=self.addons)
        await self._start(admin, ADMIN, lambda server:
                          admin_pb2_grpc.add_AdminServicer_to_server(administration, server))
        log.info("listening", extra={"app_socket": app.address, "admin_socket": admin.address})

    async def _start(self, relay: PeerRelay, service: str,
                     add_servicer: Callable[[grpc.aio.Server], None]) -> None:
        """A grpc.aio server on the relay's private socket, then the relay in front of it."""
        backend = Path(relay.backend_sockaddr)
        clear_socket_path(backend)
        server = grpc.aio.server(options=_options(self.config))
        add_servicer(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health[service], server)
        reflection.enable_server_reflection(
            (service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        server.add_insecure_port(relay.backend_target)
        await server.start()
        os.chmod(backend, 0o600)
        try:
            await relay.start()
        except BaseException:
            await server.stop(None)
            raise
        self._running.append((server, relay))

    async def stop(self) -> None:
        """Stops the servers and their relays; removes only sockets this process bound.

        The relays stop accepting at once and keep piping until the gRPC servers close their
        connections (their GOAWAY reaches the clients through the relays)."""
        running, self._running = self._running, []
        await asyncio.gather(*(server.stop(grace=1.0) for server, _ in running),
                             *(relay.stop(grace=2.0) for _, relay in running))
        for _, relay in running:
            with contextlib.suppress(FileNotFoundError):
                Path(relay.backend_sockaddr).unlink()


async def start_metrics(config: Config, daemon: Daemon) -> MetricsServer | None:
    """The Prometheus endpoint on `config.metrics_listen` (None when that is off)."""
    if not config.metrics_listen:
        return None

    def snapshot() -> EngineSnapshot | None:
        return daemon.engine.snapshot() if daemon.engine is not None else None

    def image() -> str:
        return (f"{daemon.image.manifest.name} {daemon.image.manifest.version}"
                if daemon.image is not None else "")

    server = MetricsServer(config.metrics_listen, snapshot, image)
    await server.start()
    return server
