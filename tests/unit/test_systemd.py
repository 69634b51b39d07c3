"""m4d.service.systemd without systemd: socket activation, sd_notify and the watchdog.

Descriptors are passed to real child processes the way systemd passes them (dup'ed to 3,
4, ... with LISTEN_PID set to the child's own pid after the fork), notifications land on
real AF_UNIX datagram sockets bound by the test (path and abstract), and, where
`systemd-socket-activate` is installed, a small gRPC server behind a PeerRelay is started
under it on systemd's sockets.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4d.service import systemd
from m4d.service.systemd import SystemdError

TIMEOUT = 30.0

# Plays systemd's part after fork(): moves the passed descriptors to 3, 4, ..., sets
# LISTEN_PID to its own pid and execs the child (exec keeps the pid).
TRAMPOLINE = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
for target, fd in enumerate(fds, start=3):
    os.dup2(fd, target)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], *sys.argv[3:]])
"""

CHILD = """
import fcntl, json, os, socket, sys
from m4d.service.systemd import SystemdError, listen_fds
try:
    fds = listen_fds()
except SystemdError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(0)
report = {
    "names": sorted(fds),
    "env_left": [v for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if v in os.environ],
    "cloexec": {n: bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                for n, s in fds.items()},
    "listening": {n: s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for n, s in fds.items()},
    "family": {n: int(s.family) for n, s in fds.items()},
    "fileno": {n: s.fileno() for n, s in fds.items()},
}
print(json.dumps(report), flush=True)
if "app" in fds:
    conn, _ = fds["app"].accept()
    conn.sendall(b"served on the passed socket")
    conn.close()
"""


def run_with_fds(socks: list[socket.socket] | list[int], env: dict[str, str],
                 then_connect: Path | None = None) -> tuple[dict[str, object], bytes]:
    fds = [s if isinstance(s, int) else s.fileno() for s in socks]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
    child_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAMPOLINE, ",".join(map(str, fds)), CHILD],
        pass_fds=fds, env=child_env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        served = b""
        if then_connect is not None and "error" not in report:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(TIMEOUT)
                client.connect(str(then_connect))
                served = client.recv(100)
        assert proc.wait(TIMEOUT) == 0
        return report, served
    finally:
        proc.kill()
        proc.wait()


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


def test_listen_fds_adopts_named_sockets(tmp_path: Path) -> None:
    app, admin = listening(tmp_path / "app.sock"), listening(tmp_path / "admin.sock")
    with app, admin:
        report, served = run_with_fds(
            [app, admin], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "app:admin"},
            then_connect=tmp_path / "app.sock")
    assert report["names"] == ["admin", "app"]
    assert report["fileno"] == {"app": 3, "admin": 4}
    assert report["env_left"] == []  # unset, as sd_listen_fds(unset_environment=1) does
    assert report["cloexec"] == {"app": True, "admin": True}
    assert report["listening"] == {"app": 1, "admin": 1}
    assert report["family"] == {"app": int(socket.AF_UNIX), "admin": int(socket.AF_UNIX)}
    assert served == b"served on the passed socket"


def test_listen_fds_without_names_calls_them_unknown(tmp_path: Path) -> None:
    with listening(tmp_path / "s.sock") as sock:
        report, _ = run_with_fds([sock], {"LISTEN_FDS": "1"})
    assert report["names"] == ["unknown"]


def test_listen_fds_refuses_duplicate_names(tmp_path: Path) -> None:
    a, b = listening(tmp_path / "a.sock"), listening(tmp_path / "b.sock")
    with a, b:
        report, _ = run_with_fds([a, b], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "app:app"})
    assert "distinct FileDescriptorName=" in str(report["error"])


def test_listen_fds_refuses_a_descriptor_that_is_not_a_socket() -> None:
    r, w = os.pipe()
    try:
        report, _ = run_with_fds([r], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "app"})
    finally:
        os.close(r)
        os.close(w)
    assert "not a usable socket" in str(report["error"])


def test_listen_fds_ignores_variables_meant_for_another_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 100_000), "LISTEN_FDS": "2",
           "LISTEN_FDNAMES": "app:admin"}
    assert systemd.listen_fds(env) == {}
    assert env == {}  # removed all the same, as systemd does
    kept = {"LISTEN_PID": str(os.getpid() + 100_000), "LISTEN_FDS": "1"}
    assert systemd.listen_fds(kept, unset_environment=False) == {}
    assert "LISTEN_FDS" in kept
    assert systemd.listen_fds({}) == {}


def test_listen_fds_checks_the_variables() -> None:
    with pytest.raises(SystemdError, match="2 names for 1"):
        systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1",
                            "LISTEN_FDNAMES": "app:admin"})
    with pytest.raises(SystemdError, match="not a number"):
        systemd.listen_fds({"LISTEN_PID": "self", "LISTEN_FDS": "1"})
    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == {}


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  ) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound like systemd's notify socket; yields ($NOTIFY_SOCKET, sock)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    if request.param == "path":
        path = str(tmp_path / "notify")
        sock.bind(path)
        value = path
    else:
        name = f"m4-test-notify-{secrets.token_hex(6)}"
        sock.bind("\0" + name)
        value = "@" + name
    with sock:
        yield value, sock


def test_notify_sends_one_datagram(notify_socket: tuple[str, socket.socket]) -> None:
    value, sock = notify_socket
    assert systemd.notify("READY=1", "STATUS=serving 3 tasks",
                          environ={"NOTIFY_SOCKET": value})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 3 tasks"


def test_notify_helpers(notify_socket: tuple[str, socket.socket],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    value, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.ready("model loaded")
    assert sock.recv(4096) == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=model loaded".encode()
    assert systemd.watchdog_ping()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert systemd.status("draining")
    assert sock.recv(4096) == b"STATUS=draining"
    assert systemd.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_notify_outside_systemd_and_errors(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", environ={}) is False
    with pytest.raises(SystemdError, match="without newlines"):
        systemd.notify("STATUS=a\nREADY=1", environ={"NOTIFY_SOCKET": "/nonexistent"})
    with pytest.raises(SystemdError, match="KEY=value"):
        systemd.notify("READY", environ={"NOTIFY_SOCKET": "/nonexistent"})
    with pytest.raises(SystemdError, match="not a Unix socket path"):
        systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    with pytest.raises(SystemdError, match="cannot notify"):
        systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": pid}) == 2.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000",
                                      "WATCHDOG_PID": str(os.getpid() + 100_000)}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_ping_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    with pytest.raises(SystemdError, match="not a number"):
        systemd.watchdog_interval({"WATCHDOG_USEC": "30s"})


# ---- under systemd-socket-activate: systemd's own fd passing, a relay, a stock stub ----

SERVER = textwrap.dedent("""
    import asyncio, signal, sys
    from pathlib import Path
    import grpc, uvloop
    from m4.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc
    from m4d.service import systemd
    from m4d.server.identity import caller_from_context
    from m4d.server.relay import PeerRelay
    from m4d.server.sockets import private_dir

    class Fake(pb_grpc.InferenceServicer):
        def __init__(self, relay, name):
            self.relay, self.name = relay, name
        async def ListTasks(self, request, context):
            caller = caller_from_context(context, self.relay)
            return pb.ListTasksResponse(tasks=[pb.Task(id=str(caller.uid), description=self.name)])

    async def main():
        sockets = systemd.listen_fds()
        private = private_dir(Path(sys.argv[1]))
        servers, relays = [], []
        for name in ("app", "admin"):
            relay = PeerRelay(sockets[name], private / f"{name}.sock", name=name)
            server = grpc.aio.server()
            pb_grpc.add_InferenceServicer_to_server(Fake(relay, name), server)
            server.add_insecure_port(relay.backend_target)
            await server.start()
            await relay.start()
            servers.append(server)
            relays.append(relay)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        systemd.ready("serving")
        await stop.wait()
        systemd.stopping()
        await asyncio.gather(*(s.stop(0.5) for s in servers), *(r.stop(1.0) for r in relays))

    uvloop.run(main())
""")


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_serves_on_sockets_from_systemd_socket_activate(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(TIMEOUT)
    app, admin = tmp_path / "app.sock", tmp_path / "admin.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(app), "-l", str(admin), "--fdname=app:admin",
         "-E", f"NOTIFY_SOCKET={tmp_path / 'notify'}", "-E", "PYTHONPATH",
         sys.executable, str(script), str(tmp_path / ".m4d-private")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with notify:
            # systemd-socket-activate starts the server on the first connection, which
            # waits in systemd's listening socket meanwhile (wait_for_ready: the socket
            # itself appears a moment after Popen).
            for path, name in ((app, "app"), (admin, "admin")):
                with grpc.insecure_channel(f"unix://{path}") as channel:
                    task = pb_grpc.InferenceStub(channel).ListTasks(
                        pb.ListTasksRequest(), timeout=TIMEOUT, wait_for_ready=True).tasks[0]
                assert (int(task.id), task.description) == (os.getuid(), name)
            assert notify.recv(4096).startswith(b"READY=1\nMAINPID=")
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(TIMEOUT) == 0, proc.stdout.read() if proc.stdout else ""
        assert app.is_socket()  # the listening socket belongs to systemd, not to the relay
    finally:
        proc.kill()
        proc.wait()
