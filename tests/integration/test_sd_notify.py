"""m4d under a real NOTIFY_SOCKET listener: READY=1 only once the model serves, and
WATCHDOG=1 pings only while the executor makes progress."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc

from tests.conftest import start_daemon, wait_serving
from tests.hooks.m4d_test_hooks import hooks_env


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def receive(self, until: float) -> None:
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stamp, got in self.messages:
                if got == line:
                    return stamp
            self.receive(min(deadline, time.monotonic() + 0.5))
        raise AssertionError(f"{line!r} never arrived; got {self.messages}")

    def pings(self, since: float) -> int:
        return sum(1 for t, line in self.messages if line == "WATCHDOG=1" and t >= since)


def test_ready_after_model_and_watchdog_follows_the_executor(text_image: Path,
                                                            tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    d = start_daemon(text_image, tmp_path / "run", wait=False, env=hooks_env(
        NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="1000000", M4D_TEST_HOOKS="1"))
    try:
        ready_at = listener.wait_for("READY=1", timeout=300)
        statuses = [line for _, line in listener.messages if line.startswith("STATUS=")]
        assert statuses and statuses[0].startswith("STATUS=loading image"), statuses
        assert '"msg": "ready"' in d.logs(), "READY=1 came before the model was ready"
        wait_serving(d, timeout=10)
        with grpc.insecure_channel(d.address) as channel:
            reply = pb_grpc.InferenceStub(channel).Embed(pb.EmbedRequest(texts=["ok"]))
        assert reply.dimensions == 384

        listener.receive(time.monotonic() + 3)
        assert listener.pings(ready_at) >= 4, listener.messages  # every 0.5 s

        d.proc.send_signal(10)  # SIGUSR1: freeze the executor (test hook)
        frozen_at = time.monotonic()
        listener.receive(frozen_at + 7)
        # progress may be reported for up to a second after the freeze, then the daemon
        # waits 3 s (its stale limit) before it withholds the pings
        assert listener.pings(frozen_at + 4.5) == 0, "pinged while the executor was stuck"
        assert "withholding the watchdog ping" in d.logs()

        d.proc.send_signal(12)  # SIGUSR2: thaw
        thawed_at = time.monotonic()
        listener.receive(thawed_at + 3)
        assert listener.pings(thawed_at) >= 2
    finally:
        d.stop()
    listener.receive(time.monotonic() + 1)
    assert any(line == "STOPPING=1" for _, line in listener.messages)
