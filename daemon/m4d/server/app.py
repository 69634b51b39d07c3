"""The gRPC servers and the process life cycle: startup → serve → graceful shutdown.

Two grpc.aio servers: apps on the app socket (Inference, health, reflection) and
administrators on the admin socket (Admin, health). Each listens on a private socket
(`<app socket dir>/.m4d-private/`, mode 0700) behind a PeerRelay that owns the public
socket (bound here, or passed by systemd as "app" / "admin") and tells the servicers the
caller's uid from SO_PEERCRED. Under systemd: READY=1 once the model is loaded,
STOPPING=1 on the way out. SIGTERM or SIGINT drains: health goes NOT_SERVING, new calls
get UNAVAILABLE, in-flight calls finish (up to drain_timeout); a second signal forces
the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4.inference.v1 import inference_pb2, inference_pb2_grpc

from m4d.config import Config
from m4d.service import systemd
from m4d.server.admin import AdminServicer
from m4d.server.inference import InferenceServicer
from m4d.server.metrics import MetricsServer
from m4d.server.relay import PeerRelay, private_dir
from m4d.service.daemon import Daemon, State

log = logging.getLogger(__name__)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


class SocketInUse(RuntimeError):
    """Another process already serves on the socket path."""


def prepare_socket(path: Path) -> None:
    """Creates the socket's directory; removes a stale socket, refuses a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink()  # stale: its daemon is gone
    else:
        raise SocketInUse(f"{path} is in use by a running daemon; stop it or choose another path")
    finally:
        probe.close()


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


async def _start_server(relay: PeerRelay, config: Config,
                        register: list[object]) -> grpc.aio.Server:
    """A grpc.aio server on the relay's private socket, then the relay in front of it."""
    backend = Path(relay.backend_sockaddr)
    prepare_socket(backend)
    server = grpc.aio.server(options=_options(config))
    for add in register:
        add(server)  # type: ignore[operator]
    server.add_insecure_port(relay.backend_target)
    await server.start()
    os.chmod(backend, 0o600)
    try:
        await relay.start()
    except BaseException:
        await server.stop(None)
        raise
    return server


async def _stop_servers(servers: list[tuple[grpc.aio.Server, PeerRelay]]) -> None:
    """Stops the servers and their relays; removes only sockets this process bound.

    The relays stop accepting at once and keep piping until the gRPC servers close their
    connections (their GOAWAY reaches the clients through the relays)."""
    await asyncio.gather(*(server.stop(grace=1.0) for server, _ in servers),
                         *(relay.stop(grace=2.0) for _, relay in servers))
    for _, relay in servers:
        with contextlib.suppress(FileNotFoundError):
            Path(relay.backend_sockaddr).unlink()


def _notify(send: Callable[[], bool]) -> None:
    """sd_notify that never stops the daemon: a failure is logged."""
    try:
        send()
    except systemd.SystemdError as exc:
        log.warning("cannot notify systemd: %s", exc)


async def _watchdog(daemon: Daemon) -> None:
    """WATCHDOG=1 at half systemd's interval, but only while the executor makes progress:
    a frozen worker thread stops the pings and systemd restarts the daemon."""
    interval = systemd.watchdog_ping_interval()
    if interval is None:
        return
    stale_after = max(2 * interval, 3.0)  # an idle executor reports progress every second
    while True:
        await asyncio.sleep(interval)
        engine = daemon.engine
        if engine is None:
            if daemon.swapping:  # a drain-mode swap: no engine for a few seconds, on purpose
                _notify(systemd.watchdog_ping)
            continue
        stalled = time.monotonic() - engine.stats.last_progress
        if stalled < stale_after:
            _notify(systemd.watchdog_ping)
        else:
            log.error("executor made no progress: withholding the watchdog ping",
                      extra={"stalled_seconds": round(stalled, 1)})


async def _start_metrics(config: Config, daemon: Daemon) -> MetricsServer | None:
    if not config.metrics_listen:
        return None

    def snapshot() -> dict[str, object] | None:
        return daemon.engine.snapshot() if daemon.engine is not None else None

    def image() -> str:
        return (f"{daemon.image.manifest.name} {daemon.image.manifest.version}"
                if daemon.image is not None else "")

    server = MetricsServer(config.metrics_listen, snapshot, image)
    await server.start()
    return server


def _install_test_hooks(daemon: Daemon) -> None:
    """With M4D_TEST_HOOKS=1 (tests only), SIGUSR1 freezes the executor thread and SIGUSR2
    thaws it, so the watchdog can be shown to stop pinging for a stuck worker."""
    if os.environ.get("M4D_TEST_HOOKS") != "1":
        return
    loop = asyncio.get_running_loop()

    def freeze(on: bool) -> None:
        if daemon.engine is not None:
            (daemon.engine.frozen.set if on else daemon.engine.frozen.clear)()
            log.warning("test hook: executor %s", "frozen" if on else "thawed")

    loop.add_signal_handler(signal.SIGUSR1, freeze, True)
    loop.add_signal_handler(signal.SIGUSR2, freeze, False)


async def serve(config: Config) -> int:
    """Runs the daemon until a signal; returns the process exit code."""
    daemon = Daemon(config)
    app_health = health.aio.HealthServicer()
    admin_health = health.aio.HealthServicer()

    async def set_health(serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for h, names in ((app_health, ("", INFERENCE)), (admin_health, ("", ADMIN))):
            for name in names:
                await h.set(name, status)

    await set_health(False)
    servers: list[tuple[grpc.aio.Server, PeerRelay]] = []
    try:
        app_relay, admin_relay = _relays(config)
        servers.append((await _start_server(app_relay, config, [
            lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(
                InferenceServicer(daemon, peers=app_relay), s),
            lambda s: health_pb2_grpc.add_HealthServicer_to_server(app_health, s),
            lambda s: reflection.enable_server_reflection(
                (INFERENCE, health.SERVICE_NAME, reflection.SERVICE_NAME), s),
        ]), app_relay))
        servers.append((await _start_server(admin_relay, config, [
            lambda s: admin_pb2_grpc.add_AdminServicer_to_server(
                AdminServicer(daemon, peers=admin_relay), s),
            lambda s: health_pb2_grpc.add_HealthServicer_to_server(admin_health, s),
            lambda s: reflection.enable_server_reflection(
                (ADMIN, health.SERVICE_NAME, reflection.SERVICE_NAME), s),
        ]), admin_relay))
    except (SocketInUse, OSError, RuntimeError) as exc:  # RelayError, SystemdError too
        log.error("cannot listen: %s", exc)
        await _stop_servers(servers)
        return 1
    log.info("listening", extra={"app_socket": app_relay.address,
                                 "admin_socket": admin_relay.address})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            stop.set()
        else:
            log.warning("second signal: exiting now")
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    exit_code = 0
    try:
        _notify(lambda: systemd.status(f"loading image {config.image}"))
        _install_test_hooks(daemon)
        load = asyncio.create_task(daemon.load())
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            load.result()  # raises a load failure
            await set_health(True)
            _notify(lambda: systemd.ready("serving"))
            watchdog = asyncio.create_task(_watchdog(daemon))
            metrics = await _start_metrics(config, daemon)
            await stopped
            watchdog.cancel()
            if metrics is not None:
                await metrics.stop()
        else:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await load
        _notify(systemd.stopping)
        if daemon.state is State.READY:
            await set_health(False)
            await daemon.drain(config.drain_timeout)
    except Exception as exc:
        log.error("start-up failed: %s", exc, extra={"error": type(exc).__name__})
        exit_code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await _stop_servers(servers)
        daemon.stop()
        log.info("stopped", extra={"exit_code": exit_code})
    return exit_code
