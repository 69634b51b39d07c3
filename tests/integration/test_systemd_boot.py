"""m4d under a real systemd: PID 1 of a throw-away container, installed by install.sh.

The container is this machine's own root under an overlay (writes go to a tmpfs and vanish),
with its own PID and mount namespaces; systemd boots it to basic.target. Inside it,
systemd/install.sh installs like on a device (live mode: sysusers, tmpfiles, daemon-reload),
then the tests start the real units and talk to the daemon through /proc/<pid>/root: the
service starts only once READY=1 came, serves on systemd's sockets as user m4 inside the
full sandbox, `m4ctl doctor` finds nothing wrong, and after a stop the next connection
starts it again.

The private venv gets the project without dependencies (PIP_ARGS=--no-deps); the test's own
site-packages are bind-mounted at /opt/m4-deps and added to the venv by a .pth file, so
nothing is downloaded. That directory is outside /home and /root on purpose: the service's
ProtectHome= would hide it there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd_testing import ROOT, tool

pytestmark = pytest.mark.slow

BOOT = r"""
set -eu
R=$1; UP=$2; shift 2
mount -t overlay overlay -o "lowerdir=/,upperdir=$UP/upper,workdir=$UP/work" "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
for bind in "$@"; do
    mkdir -p "$R${bind#*=}"
    mount --rbind "${bind%%=*}" "$R${bind#*=}"
done
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
exec env -i container=m4-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=basic.target
"""
DEPS = "/opt/m4-deps"
PREFIX = "/usr/local"
INSTALLED_PYTHON = f"{PREFIX}/lib/m4/venv/bin/python"
# The daemon's test hooks (tests/hooks/m4d_test_hooks.py), copied into the installed venv's
# site-packages and loaded by its interpreters through a .pth file while the test runs; they
# act only where the environment asks (the unit's drop-in sets M4D_TEST_HOOKS=1). Copied, not
# referenced in the checkout: the wrapper runs `python -I` (no PYTHONPATH) and the unit's
# PrivateTmp hides a checkout under /tmp, as CI's is.
HOOKS_MODULE = ROOT / "tests" / "hooks" / "m4d_test_hooks.py"
HOOKS_PTH = "import m4d_test_hooks; m4d_test_hooks.install_from_environment()\n"


class Container:
    """systemd as PID 1 in new PID and mount namespaces over an overlay of '/'."""

    def __init__(self, work: Path, binds: dict[str, str]) -> None:
        for d in ("upper", "work", "root"):
            (work / d).mkdir()
        (work / "boot.sh").write_text(BOOT)
        self.work = work
        self.console = open(work / "console.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [tool("unshare"), "--pid", "--fork", "--mount", "--uts", "--ipc",
             "--propagation", "private", "bash", str(work / "boot.sh"), str(work / "root"),
             str(work), *(f"{src}={dst}" for src, dst in binds.items())],
            stdout=self.console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self._init_pid()

    def _init_pid(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the container exited at once:\n{self.log()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            pid = children.read_text().split() if children.exists() else []
            if pid and Path(f"/proc/{pid[0]}/comm").read_text().strip() == "systemd":
                return int(pid[0])
            time.sleep(0.1)
        raise RuntimeError(f"systemd did not start as the container's PID 1:\n{self.log()}")

    def wait_for_manager(self, timeout: float = 60) -> None:
        """Until systemd listens for systemctl (its private socket exists)."""
        deadline = time.monotonic() + timeout
        while not self.path("/run/systemd/private").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not come up in the container:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return (self.work / "console.log").read_text(errors="replace")

    def run(self, *cmd: str, check: bool = True, timeout: float = 300,
            ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([tool("nsenter"), "-t", str(self.pid), "-a", *cmd],
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def path(self, inside: str) -> Path:
        """A path inside the container, as seen from here."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-b", "-u", unit, "--no-pager", "-o", "cat",
                        check=False).stdout[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd as PID 1: power off
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)  # ends every process in the namespace
                self.proc.wait(timeout=30)
        self.console.close()


@pytest.fixture(scope="module")
def container(text_image: Path) -> Iterator[Container]:
    if os.geteuid() != 0:
        pytest.fail("booting systemd in a container needs root (CI runs as root)")
    for name in ("systemd-analyze", "nsenter", "unshare"):
        tool(name)
    if not Path("/lib/systemd/systemd").exists():
        pytest.fail("/lib/systemd/systemd not found: apt-get install -y systemd")
    deps = next(p for p in site.getsitepackages() if Path(p, "torch").is_dir())
    work = Path(tempfile.mkdtemp(prefix="m4-container-", dir="/dev/shm"))  # tmpfs: a valid upper
    binds = {str(ROOT): str(ROOT), str(text_image): str(text_image), deps: DEPS}
    box = Container(work, binds)
    try:
        box.wait_for_manager()
        state = box.run("systemctl", "is-system-running", "--wait", check=False, timeout=120)
        assert state.stdout.strip() in ("running", "degraded"), (
            f"systemd did not finish booting ({state.stdout.strip()}):\n{box.log()}")
        yield box
    finally:
        box.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(container: Container, text_image: Path) -> Container:
    done = container.run(
        "sh", str(ROOT / "systemd/install.sh"), f"PREFIX={PREFIX}", f"PYTHON={sys.executable}",
        f"IMAGE={text_image}", "VENV_PYTHON=/usr/bin/python3", "PIP_ARGS=--no-deps")
    assert "installed; start it with" in done.stdout, done.stdout + done.stderr
    container.path(_site_dir(container)).joinpath("m4-deps.pth").write_text(DEPS + "\n")
    container.run(INSTALLED_PYTHON, "-c", "import torch, grpc, m4d.server.app")
    return container


def _site_dir(container: Container) -> str:
    """The installed venv's site-packages, inside the container."""
    return container.run(INSTALLED_PYTHON, "-c", "import site; print(site.getsitepackages()[0])"
                         ).stdout.strip()


def test_boot_created_the_user_directories_and_factory_image(installed: Container) -> None:
    passwd = installed.path("/etc/passwd").read_text()
    uid = next(int(line.split(":")[2]) for line in passwd.splitlines() if line.startswith("m4:"))
    assert "m4-admin:" in installed.path("/etc/group").read_text()
    state = installed.path("/var/lib/m4").stat()
    assert (state.st_uid, state.st_mode & 0o777) == (uid, 0o750)
    assert installed.path("/var/lib/m4/images/default/manifest.json").is_file()


def test_sockets_listen_with_their_modes_and_groups(installed: Container) -> None:
    installed.run("systemctl", "start", "m4d-app.socket", "m4d-admin.socket")
    listing = installed.run("stat", "-c", "%n %a %U:%G %F", "/run/m4", "/run/m4/app.sock",
                            "/run/m4/admin.sock").stdout.splitlines()
    assert listing == ["/run/m4 755 root:root directory",
                       "/run/m4/app.sock 666 root:root socket",
                       "/run/m4/admin.sock 660 root:m4-admin socket"]


def _client(installed: Container, name: str = "app") -> Any:
    from m4client import AdminClient, Client

    address = f"unix://{installed.path(f'/run/m4/{name}.sock')}"
    return Client(address) if name == "app" else AdminClient(address)


def _show(installed: Container, unit: str, *props: str) -> list[str]:
    """The unit's properties, in the order asked (systemctl prints them in its own)."""
    lines = installed.run("systemctl", "show", "-p", ",".join(props), unit).stdout.splitlines()
    found = dict(line.partition("=")[::2] for line in lines)
    return [found[p] for p in props]


def test_the_service_starts_socket_activated_and_notifies(installed: Container) -> None:
    """`systemctl enable --now` returns once READY=1 came (Type=notify): the model answers
    at once, on systemd's sockets, from a process running as m4 in the sandbox."""
    done = installed.run("systemctl", "enable", "--now", "m4d.service", check=False,
                         timeout=600)
    assert done.returncode == 0, done.stderr + installed.journal("m4d.service")
    state, sub, status, pid = _show(installed, "m4d.service", "ActiveState", "SubState",
                                    "StatusText", "MainPID")
    assert (state, sub) == ("active", "running"), installed.journal("m4d.service")
    assert status  # STATUS= from the daemon
    uid = installed.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip()
    assert uid == "m4"
    with _client(installed) as client:
        reply = client.complete("What is the capital of France?", max_tokens=12,
                                temperature=0, timeout=60)
    assert "Paris" in reply.text
    with _client(installed, "admin") as admin:
        assert admin.status(timeout=30).state == "READY"
    for unit in ("m4d-app.socket", "m4d-admin.socket", "m4d.service"):
        assert installed.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"


def test_doctor_passes_on_the_running_system(installed: Container) -> None:
    done = installed.run(f"{PREFIX}/lib/m4/venv/bin/python", "-I", "-m", "m4ctl._doctor",
                         "--json", check=False, timeout=120)
    checks = {c["check"]: c for c in map(json.loads, done.stdout.splitlines())}
    assert done.returncode == 0, done.stdout + done.stderr
    assert checks["units"]["status"] == "ok" and "running" in checks["units"]["detail"]
    assert checks["app socket"]["status"] == "ok", checks["app socket"]
    assert checks["admin socket"]["status"] == "ok", checks["admin socket"]
    assert checks["image"]["status"] == "ok", checks["image"]
    assert checks["state dir"]["status"] == "ok", checks["state dir"]
    assert checks["keys"]["status"] == "warn"  # a fresh install trusts no signer yet


def test_watchdog_restarts_a_frozen_executor(installed: Container) -> None:
    """Idle, the daemon keeps pinging; with its executor frozen (the test hooks) the
    pings stop, systemd kills it and Restart=on-failure brings the model back."""
    site_dir = installed.path(_site_dir(installed))
    hooks, module = site_dir / "m4-test-hooks.pth", site_dir / HOOKS_MODULE.name
    shutil.copyfile(HOOKS_MODULE, module)
    hooks.write_text(HOOKS_PTH)
    dropin = installed.path("/etc/systemd/system/m4d.service.d/test-watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=4\nRestartSec=1\nEnvironment=M4D_TEST_HOOKS=1\n")
    try:
        installed.run("systemctl", "daemon-reload")
        installed.run("systemctl", "restart", "m4d.service", timeout=600)
        time.sleep(10)  # idle for 2.5 watchdog periods
        assert _show(installed, "m4d.service", "ActiveState", "NRestarts") == ["active", "0"]
        installed.run("systemctl", "kill", "--kill-whom=main", "-s", "SIGUSR1", "m4d.service")
        deadline = time.monotonic() + 120
        while _show(installed, "m4d.service", "NRestarts") == ["0"]:
            assert time.monotonic() < deadline, installed.journal("m4d.service")
            time.sleep(0.5)
        journal = installed.run("journalctl", "-b", "-u", "m4d.service", "--no-pager").stdout
        assert "watchdog timeout" in journal.lower(), journal[-4000:]
        with _client(installed) as client:
            client.wait_serving(timeout=300)
        assert _show(installed, "m4d.service", "ActiveState") == ["active"]
    finally:
        dropin.unlink()
        hooks.unlink()
        module.unlink()
        installed.run("systemctl", "daemon-reload")


def test_a_connection_starts_the_stopped_service(installed: Container) -> None:
    """After a stop the sockets keep listening; the next app's connection starts m4d."""
    installed.run("systemctl", "stop", "m4d.service", timeout=120)
    assert _show(installed, "m4d.service", "ActiveState") == ["inactive"]
    assert _show(installed, "m4d-app.socket", "ActiveState") == ["active"]
    assert installed.path("/run/m4/app.sock").is_socket()
    with _client(installed) as client:
        client.wait_serving(timeout=300)
        reply = client.complete("What is the capital of France?", max_tokens=12,
                                temperature=0, timeout=60)
    assert "Paris" in reply.text
    assert _show(installed, "m4d.service", "ActiveState") == ["active"]
    installed.run("systemctl", "stop", "m4d.service", timeout=120)
    code = _show(installed, "m4d.service", "ExecMainStatus")
    assert code == ["0"], installed.journal("m4d.service")  # drained and exited cleanly
