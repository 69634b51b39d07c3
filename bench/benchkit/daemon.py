"""Benchmark helpers (outside the serving pipeline): a real `m4d` subprocess to measure.

`Daemon` starts `python -m m4d` from an image on a temporary runtime directory (its socket
is `Daemon.address`), optionally forcing one variant of m4's CPU kernels; `ready()` waits
until health says SERVING and reads back what the daemon logged (failed self-test checks,
the kernel variant it runs); leaving the `with` block stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

DAEMON_START_TIMEOUT = 300.0


def read_manifest(image: Path) -> dict[str, Any]:
    """The image's manifest.json; SystemExit saying how to build the image if it is missing."""
    path = image.resolve() / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"no image at {image.resolve()}; build it with "
                         f"`python -m m4d.builder --default --output {image}`")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


@dataclass
class Serving:
    """What a daemon reported once it served."""

    load_s: float  # from process start to SERVING
    kernel_variant: str  # as it logged it, a note (see check_kernel_variant)
    failed_checks: list[str]  # self-test checks that failed

    def __str__(self) -> str:
        return (f"m4d serving after {self.load_s:.1f} s, kernel variant {self.kernel_variant}; "
                f"failed self-test checks: {self.failed_checks}")


class Daemon:
    """A real `m4d` subprocess on a temporary runtime dir; stopped with SIGTERM on exit.

    `threads` None leaves the daemon's default (one per core but one); `kernel_variant`
    forces that variant of m4's kernels (None: the daemon's choice); `args` and `env` add
    flags and M4D_* settings; `other_uids` opens the runtime directory (0755) so that apps
    running as other uids reach the app socket (0666) in it."""

    def __init__(self, image: Path, threads: int | None, self_test: str, *,
                 kernel_variant: str | None = None, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, other_uids: bool = False) -> None:
        self.wanted_variant = kernel_variant
        self.tmp = tempfile.TemporaryDirectory(prefix="m4bench-")
        self.runtime_dir = Path(self.tmp.name)
        if other_uids:
            self.runtime_dir.chmod(0o755)
        self.address = f"unix://{self.runtime_dir / 'app.sock'}"
        self.admin_address = f"unix://{self.runtime_dir / 'admin.sock'}"
        self.log_path = self.runtime_dir / "m4d.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "m4d", "--config", "/dev/null", "--image", str(image),
                   "--runtime-dir", str(self.runtime_dir), "--self-test", self_test,
                   "--log-format", "text", *args]
        if threads is not None:
            command += ["--threads", str(threads)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), **kernel_variant_env(kernel_variant)})

    def ready(self, client: Any = None) -> Serving:
        """Waits until the daemon serves; SystemExit if it does not run the kernel variant
        it was started with."""
        load_s = self.wait_serving(client)
        return Serving(load_s, check_kernel_variant(self, self.wanted_variant),
                       self.failed_self_test_checks())

    def wait_serving(self, client: Any = None, timeout: float = DAEMON_START_TIMEOUT) -> float:
        """Block until health says SERVING; returns the seconds since the process started."""
        from m4client import Client, UnavailableError

        if client is None:
            with Client(self.address, app_name="bench") as own:
                return self.wait_serving(own, timeout)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"m4d exited with {self.proc.returncode}:\n{self.log_tail()}")
            left = timeout - (time.monotonic() - self.started)
            if left <= 0:
                raise SystemExit(f"m4d not serving after {timeout:.0f} s:\n{self.log_tail()}")
            try:  # a bounded health Watch, so a daemon that dies while loading is noticed
                client.wait_serving(timeout=min(5.0, left))
                return time.monotonic() - self.started
            except UnavailableError:
                continue

    def kernel_variant(self) -> str | None:
        """The m4 kernel variant the daemon logged it runs ("" = torch's kernels), or None
        when its log does not say (daemons before the `kernels` log line)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            found = re.search(r": kernels .*\bvariant=(\S*)", line)
            if found:
                return found.group(1)
        return None

    def failed_self_test_checks(self) -> list[str]:
        """Names of the self-test checks the daemon logged as failed (text log format)."""
        failed = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "self-test check=" in line and "passed=False" in line:
                failed.append(line.split("check=", 1)[1].split(" ", 1)[0])
        return failed

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.tmp.cleanup()


def kernel_variant_env(name: str | None) -> dict[str, str]:
    """Environment for an m4d that must run kernel variant `name` (None: the daemon's own
    choice). M4_KERNEL_VARIANT is read wherever the kernels load; M4D_KERNEL_VARIANT is the
    daemon's `kernel_variant` setting, which would otherwise put "auto" back."""
    return {"M4_KERNEL_VARIANT": name, "M4D_KERNEL_VARIANT": name} if name else {}


def check_kernel_variant(daemon: Daemon, wanted: str | None) -> str:
    """The variant the daemon says it runs, as a note; SystemExit if it is not `wanted`."""
    logged = daemon.kernel_variant()
    if logged is None:
        return f"{wanted} (asked; this daemon does not log its variant)" if wanted else \
            "daemon's choice (not logged)"
    if wanted and logged != wanted:
        raise SystemExit(f"m4d runs kernel variant {logged!r}, not the {wanted!r} asked for")
    return (logged or "none (torch's kernels)") + (" (forced)" if wanted else " (auto)")
