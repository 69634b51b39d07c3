"""Helpers for the tests of systemd/: the real systemd tools on the real unit files.

`systemd-analyze verify` checks that ExecStart's binary exists and that the default
dependencies (sysinit.target, ...) load, so units are verified inside a small temporary
root (`--root=`) holding the host's target units, our units and an executable where
ExecStart points. It exits 0 even when it ignores a line it cannot parse, so a passing
verification also needs an empty stderr.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT_NAMES = ("m4d.service", "m4d-app.socket", "m4d-admin.socket")
INSTALL_HINT = ("install the Debian package: apt-get update && apt-get install -y systemd "
                "(.ci/run does this)")
_HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def tool(name: str) -> str:
    """The path of a systemd tool; fails the test (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT}")
    return path


def substitute(text: str, bindir: str = "/usr/bin", datadir: str = "/usr/share") -> str:
    """What systemd/install.sh does to m4d.service and tmpfiles.d/m4.conf."""
    return text.replace("@BINDIR@", bindir).replace("@DATADIR@", datadir)


def make_verify_root(root: Path, units: dict[str, str], executables: list[str]) -> Path:
    """A root for `systemd-analyze verify --root`: host targets, `units`, stub executables."""
    unit_dir = root / "usr/lib/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    targets = [t for d in _HOST_UNIT_DIRS if d.is_dir() for t in d.glob("*.target")]
    if not targets:
        pytest.fail(f"no systemd target units in {_HOST_UNIT_DIRS}: {INSTALL_HINT}")
    for target in targets:
        if not (unit_dir / target.name).exists():
            shutil.copyfile(target, unit_dir / target.name)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
    for exe in executables:
        path = root / exe.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("#!/bin/sh\nexit 0\n")
            path.chmod(0o755)
    return root


def verify(root: Path, names: tuple[str, ...] = UNIT_NAMES) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("systemd-analyze"), "verify", f"--root={root}", *names],
                          capture_output=True, text=True, timeout=120, cwd=root)


def assert_verifies(root: Path, names: tuple[str, ...] = UNIT_NAMES) -> None:
    done = verify(root, names)
    assert done.returncode == 0 and not done.stderr.strip(), (
        f"systemd-analyze verify exited {done.returncode}:\n{done.stderr}{done.stdout}")


_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def exposure(unit_file: Path) -> tuple[float, str]:
    """(overall exposure, full report) of `systemd-analyze security --offline=yes`."""
    done = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit_file)],
        capture_output=True, text=True, timeout=120)
    report = done.stdout + done.stderr
    found = _EXPOSURE.search(report)
    assert found, f"no overall exposure in systemd-analyze security output:\n{report}"
    return float(found.group(1)), report


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting in a unit file, in order."""
    section, out = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(text: str, key: str, section: str | None = None) -> list[str]:
    return [v for s, k, v in directives(text) if k == key and section in (None, s)]


def uncommented_blocks(text: str) -> list[str]:
    """Setting lines whose block (consecutive setting lines) has no comment right above it."""
    bad, previous = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        is_setting = bool(line) and not line.startswith(("#", ";", "["))
        if is_setting and not (previous.startswith("#") or previous == "setting"):
            bad.append(line)
        previous = "setting" if is_setting else line
    return bad
