"""PeerRelay + identity: the caller's uid comes from the kernel, through any stock gRPC stub.

A FAKE Inference servicer (no model; defined below) runs on a real grpc.aio server on a
private socket, behind a real PeerRelay on a temporary public socket, on a uvloop loop in a
background thread. The servicer answers with what `caller_from_context` told it, so the
tests see exactly what the daemon's handlers would see. A second process that drops to
`nobody` checks that the uid follows the process, not the metadata.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import m4d.server.relay as relay_module
import pytest
import uvloop
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4d.server.identity import APP_NAME_KEY, caller_from_context, peer_from_context
from m4d.server.relay import PeerRelay
from m4d.server.sockets import RelayError, peer_name, private_dir

T = TypeVar("T")
NOBODY = 65534
TIMEOUT = 20.0


class FakeLog:
    """What the fake servicer saw, safe to read from the test thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.peers: list[str] = []
        self.cancelled = threading.Event()

    def saw(self, peer: str) -> None:
        with self.lock:
            self.peers.append(peer)


class FakeInference(pb_grpc.InferenceServicer):
    """A FAKE Inference service that reports the caller identity it was given."""

    def __init__(self, log: FakeLog, relay: PeerRelay) -> None:
        self.log = log
        self.relay = relay

    async def ListTasks(self, request: pb.ListTasksRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        self.log.saw(context.peer())
        caller = caller_from_context(context, self.relay)
        peer = peer_from_context(context, self.relay)
        return pb.ListTasksResponse(tasks=[pb.Task(
            id=str(caller.uid), m4_id=str(caller.pid), description=caller.app,
            labels=[str(peer.gid if peer else -1), str(peer.conn_id if peer else 0),
                    ",".join(map(str, peer.groups or ())) if peer else ""])])

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        caller = caller_from_context(context, self.relay)
        slow = request.prompt == "slow"
        count = 100_000 if slow else (request.sampling.max_tokens or 3)
        try:
            for i in range(count):
                yield pb.GenerateResponse(text=f"{caller.uid}:{i}")
                if slow:
                    await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.log.cancelled.set()
            raise


class RelayedServer:
    """grpc.aio server on a private socket + PeerRelay on a public one, on a uvloop thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.public = root / "app.sock"
        self.backend = private_dir(root / ".m4d-private") / "app.sock"
        self.log = FakeLog()
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay-test",
                                       daemon=True)
        self.relay = PeerRelay(self.public, self.backend, mode=0o666, name="app")
        self.server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.public}"

    @property
    def backend_address(self) -> str:
        return f"unix://{self.backend}"

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def wrapper() -> T:
            return await make()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(TIMEOUT)

    def start(self) -> None:
        self.thread.start()

        async def start() -> None:
            self.server = grpc.aio.server()
            pb_grpc.add_InferenceServicer_to_server(FakeInference(self.log, self.relay),
                                                    self.server)
            self.server.add_insecure_port(self.relay.backend_target)
            await self.server.start()
            await self.relay.start()
        self.run(start)

    def stop(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            await asyncio.gather(self.server.stop(0.5), self.relay.stop(grace=1.0))
        self.run(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    def wait_idle(self) -> None:
        self.run(self.relay.wait_idle)


@pytest.fixture(scope="module")
def server() -> Iterator[RelayedServer]:
    root = Path(tempfile.mkdtemp(prefix="m4-relay-test-"))
    root.chmod(0o755)  # `nobody` must reach the public socket
    s = RelayedServer(root)
    s.start()
    yield s
    s.stop()
    shutil.rmtree(root, ignore_errors=True)


def list_tasks(address: str, app: str = "", **options: Any) -> pb.Task:
    opts = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    with grpc.insecure_channel(address, options=opts) as channel:
        reply = pb_grpc.InferenceStub(channel).ListTasks(
            pb.ListTasksRequest(), metadata=[(APP_NAME_KEY, app)] if app else None,
            timeout=TIMEOUT)
    return reply.tasks[0]


def test_peer_string_names_the_relays_socket(server: RelayedServer) -> None:
    list_tasks(server.address)
    with server.log.lock:
        peer = server.log.peers[-1]
    assert peer.startswith("unix-abstract:m4-peer-"), peer
    assert peer_name(peer) == peer[len("unix-abstract:"):]
    assert peer_name("unix:/run/m4/.m4d-private/p-1") == "/run/m4/.m4d-private/p-1"
    assert peer_name("ipv4:127.0.0.1:5") is None


def test_uid_and_pid_come_from_the_kernel(server: RelayedServer) -> None:
    task = list_tasks(server.address, app="test-app")
    assert int(task.id) == os.getuid()
    assert int(task.m4_id) == os.getpid()
    assert int(task.labels[0]) == os.getgid()
    assert task.description == "test-app"  # the label passes through, as a label


def test_call_that_bypasses_the_relay_has_no_uid(server: RelayedServer) -> None:
    task = list_tasks(server.backend_address, app="direct")
    assert int(task.id) == -1 and int(task.m4_id) == 0


def test_backend_directory_is_private(server: RelayedServer) -> None:
    assert (server.backend.parent.stat().st_mode & 0o777) == 0o700
    assert (server.public.stat().st_mode & 0o777) == 0o666


# Runs as root up to the imports (the interpreter lives under /root, mode 0700, so a process
# started as `nobody` could not even exec it), then drops every credential before the
# channel connects: SO_PEERCRED records the credentials of connect().
AS_NOBODY = """
import json, os, sys
import grpc
from m4.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
os.setgroups([4242]); os.setgid(65534); os.setuid(65534)
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = pb_grpc.InferenceStub(channel)
    reply = stub.ListTasks(pb.ListTasksRequest(), timeout=20, metadata=[
        ("m4-app-name", "root"), ("m4-uid", "0"), ("x-forwarded-for", "unix:")])
t = reply.tasks[0]
print(json.dumps({"uid": int(t.id), "pid": int(t.m4_id), "gid": int(t.labels[0]),
                  "groups": t.labels[2],
                  "app": t.description, "me": os.getpid(), "my_uid": os.getuid()}))
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch to nobody")
def test_other_uid_is_attributed_whatever_its_metadata_says(server: RelayedServer) -> None:
    out = subprocess.run([sys.executable, "-c", AS_NOBODY, server.address],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["my_uid"] == NOBODY
    assert seen["uid"] == NOBODY and seen["gid"] == NOBODY
    assert seen["groups"] == "4242"  # SO_PEERGROUPS: supplementary groups, from the kernel
    assert seen["pid"] == seen["me"]
    assert seen["app"] == "root"  # a label only; the uid above is what counts


def test_streaming_through_the_relay(server: RelayedServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        replies = list(pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(prompt="fast", sampling=pb.SamplingParams(max_tokens=200)),
            timeout=TIMEOUT))
    assert [r.text for r in replies] == [f"{os.getuid()}:{i}" for i in range(200)]


def test_client_cancel_reaches_the_handler(server: RelayedServer) -> None:
    server.log.cancelled.clear()
    with grpc.insecure_channel(server.address) as channel:
        call = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(prompt="slow"),
                                                       timeout=TIMEOUT)
        assert next(call).text == f"{os.getuid()}:0"
        next(call)
        call.cancel()
        assert server.log.cancelled.wait(TIMEOUT), "the handler never saw the cancel"
    server.wait_idle()  # closing the channel closed both relayed connections
    assert server.relay.stats().connections_open == 0
    assert server.relay.peers == {}


STREAM_FOREVER = """
import sys
import grpc
from m4.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
call = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(prompt="slow"))
next(call)
print("streaming", flush=True)
for _ in call:
    pass
"""


def test_killed_client_cancels_the_handler(server: RelayedServer) -> None:
    """No RST_STREAM here: only the relay's half-close and close tell the server."""
    server.log.cancelled.clear()
    proc = subprocess.Popen([sys.executable, "-c", STREAM_FOREVER, server.address],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "streaming"
        proc.send_signal(signal.SIGKILL)
        assert server.log.cancelled.wait(TIMEOUT), "the handler never saw the client go"
    finally:
        proc.kill()
        proc.wait()
    server.wait_idle()


def test_fifty_concurrent_clients(server: RelayedServer) -> None:
    n = 50
    barrier = threading.Barrier(n)

    def one(i: int) -> tuple[pb.Task, list[str]]:
        opts = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.address, options=opts) as channel:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
            barrier.wait(TIMEOUT)  # all 50 connections are open at once from here
            stub = pb_grpc.InferenceStub(channel)
            task = stub.ListTasks(pb.ListTasksRequest(), metadata=[(APP_NAME_KEY, f"app-{i}")],
                                  timeout=TIMEOUT).tasks[0]
            texts = [r.text for r in stub.Generate(
                pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=5)),
                timeout=TIMEOUT)]
            return task, texts

    before = server.relay.stats()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert [t.description for t, _ in results] == [f"app-{i}" for i in range(n)]
    assert all(int(t.id) == os.getuid() for t, _ in results)
    assert len({t.labels[1] for t, _ in results}) == n  # one relayed connection each
    assert all(texts == [f"{os.getuid()}:{k}" for k in range(5)] for _, texts in results)
    server.wait_idle()
    after = server.relay.stats()
    assert after.connections_total - before.connections_total == n
    assert after.bytes_up > before.bytes_up and after.bytes_down > before.bytes_down


# ---- the relay alone, on both event loops: bytes, half-close, backpressure -------------


async def _echo_through_relay(root: Path) -> None:
    backend = private_dir(root / "private") / "echo.sock"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"<eof seen>")
        writer.close()  # the relay must forward our EOF after its half-close

    echo_server = await asyncio.start_unix_server(echo, str(backend))
    relay = PeerRelay(root / "public.sock", backend, peer_names="path")
    await relay.start()
    payload = os.urandom(8 * 1024 * 1024)  # far beyond every buffer: backpressure matters

    def client() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(root / "public.sock"))
            received = bytearray()

            def reader() -> None:
                while chunk := sock.recv(1 << 20):
                    received.extend(chunk)
            t = threading.Thread(target=reader)
            t.start()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # half-close: we still read the echo
            t.join(TIMEOUT)
            return bytes(received)

    try:
        received = await asyncio.to_thread(client)
        assert received == payload + b"<eof seen>"
        await asyncio.wait_for(relay.wait_idle(), TIMEOUT)
        stats = relay.stats()
        assert stats.bytes_up == len(payload)
        assert stats.bytes_down == len(payload) + len(b"<eof seen>")
        assert stats.connections_open == 0 and relay.peers == {}
        assert list((root / "private").iterdir()) == [backend]  # peer paths unlinked
    finally:
        await relay.stop()
        echo_server.close()
    assert not (root / "public.sock").exists()


@pytest.mark.parametrize("slow_backend", [False, True], ids=["fast-backend", "slow-backend"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_bytes_half_close_and_backpressure(loop: str, slow_backend: bool, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """8 MiB each way, in order. With a slow backend connect, the client's bytes arrive
    before the backend exists (uvloop starts reading after connection_made() whatever it
    paused): they must wait, bounded, and not be overtaken by later reads."""
    early: list[int] = []
    if slow_backend:
        connect = relay_module._Link.connect

        async def slow_connect(link: relay_module._Link) -> None:
            await asyncio.sleep(0.1)
            early.append(len(link.pending))
            await connect(link)
        monkeypatch.setattr(relay_module._Link, "connect", slow_connect)
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    runner(_echo_through_relay(tmp_path))
    assert all(n <= 2 for n in early), early  # reading paused again after the first read


async def _no_backend(root: Path) -> None:
    relay = PeerRelay(root / "public.sock", private_dir(root / "private") / "missing.sock")
    await relay.start()

    def call() -> grpc.StatusCode:
        with grpc.insecure_channel(f"unix://{root / 'public.sock'}") as channel:
            try:
                pb_grpc.InferenceStub(channel).ListTasks(pb.ListTasksRequest(), timeout=5)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    try:
        assert await asyncio.to_thread(call) == grpc.StatusCode.UNAVAILABLE
        assert relay.stats().backend_failures >= 1 and relay.peers == {}
    finally:
        await relay.stop()


def test_backend_down_gives_unavailable(tmp_path: Path) -> None:
    uvloop.run(_no_backend(tmp_path))


async def _refuses_live_socket(root: Path) -> None:
    first = PeerRelay(root / "s.sock", root / "b.sock")
    await first.start()
    try:
        with pytest.raises(RelayError, match="in use"):
            await PeerRelay(root / "s.sock", root / "b.sock").start()
    finally:
        await first.stop()
    (root / "s.sock").write_text("not a socket")
    with pytest.raises(RelayError, match="not a socket"):
        await PeerRelay(root / "s.sock", root / "b.sock").start()


def test_refuses_a_live_socket_or_a_file(tmp_path: Path) -> None:
    uvloop.run(_refuses_live_socket(tmp_path))


def test_private_dir_refuses_a_foreign_owner(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir(mode=0o755)
    assert (private_dir(d).stat().st_mode & 0o777) == 0o700  # tightened
    if os.getuid() == 0:
        os.chown(d, NOBODY, NOBODY)
        with pytest.raises(RelayError, match="owned by uid"):
            private_dir(d)
