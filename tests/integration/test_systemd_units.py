"""systemd/: the units pass `systemd-analyze verify`, the service's sandbox scores well in
`systemd-analyze security`, the sysusers.d and tmpfiles.d entries apply, and every file
agrees with the daemon's own defaults (m4d.config). Real systemd tools, no mocks; a missing
tool fails the test with the command that installs it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from m4d.config import STATE_DIR, Config
from systemd_testing import (
    SYSTEMD,
    UNIT_NAMES,
    assert_verifies,
    directives,
    exposure,
    make_verify_root,
    substitute,
    tool,
    uncommented_blocks,
    values,
    verify,
)

MAX_EXPOSURE = 2.0
SOURCES = {name: SYSTEMD / name for name in UNIT_NAMES}


def unit_text(name: str) -> str:
    return substitute(SOURCES[name].read_text())


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    return make_verify_root(tmp_path / "root", {n: unit_text(n) for n in UNIT_NAMES},
                            ["/usr/bin/m4d"])


def test_units_verify(verify_root: Path) -> None:
    assert_verifies(verify_root)


def test_verify_would_catch_a_missing_daemon(verify_root: Path) -> None:
    """The check above has teeth: without the ExecStart binary, verify fails."""
    (verify_root / "usr/bin/m4d").unlink()
    done = verify(verify_root)
    assert done.returncode != 0 and "/usr/bin/m4d" in done.stderr, done.stderr


def test_verify_would_catch_a_typo(verify_root: Path) -> None:
    """...and a bad value, which verify only reports on stderr (exit status 0)."""
    unit = verify_root / "usr/lib/systemd/system/m4d.service"
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    with pytest.raises(AssertionError, match="notifyy"):
        assert_verifies(verify_root)


def test_security_exposure_is_low(tmp_path: Path) -> None:
    unit = tmp_path / "m4d.service"
    unit.write_text(unit_text("m4d.service"))
    score, report = exposure(unit)
    print(report)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{report}"


def test_every_setting_says_why() -> None:
    files = [*SOURCES.values(), SYSTEMD / "sysusers.d/m4.conf", SYSTEMD / "tmpfiles.d/m4.conf"]
    for path in files:
        assert uncommented_blocks(path.read_text()) == [], f"{path.name}: settings without a comment"


def test_sockets_match_the_daemon_defaults() -> None:
    config = Config()
    app, admin = unit_text("m4d-app.socket"), unit_text("m4d-admin.socket")
    assert values(app, "ListenStream") == [str(config.app_socket)]
    assert values(admin, "ListenStream") == [str(config.admin_socket)]
    assert int(values(app, "SocketMode")[0], 8) == config.app_socket_mode
    assert int(values(admin, "SocketMode")[0], 8) == config.admin_socket_mode
    assert values(admin, "SocketGroup") == ["m4-admin"]
    assert values(app, "FileDescriptorName") == ["app"]
    assert values(admin, "FileDescriptorName") == ["admin"]
    for text in (app, admin):
        assert values(text, "Service") == ["m4d.service"]
    # The service's RuntimeDirectory is the relay's private directory beside the sockets,
    # never the sockets' own directory: systemd would chown that, sockets and all, to m4.
    service = unit_text("m4d.service")
    (runtime,) = values(service, "RuntimeDirectory")
    private = Path("/run") / runtime
    assert config.app_socket.parent == config.admin_socket.parent == private.parent
    app_py = (SYSTEMD.parent / "daemon/m4d/server/app.py").read_text()
    assert f'"{private.name}"' in app_py or "RUNTIME_DIRECTORY" in app_py, (
        "the relay's private directory moved: update RuntimeDirectory= in m4d.service")
    assert values(service, "RuntimeDirectoryMode") == ["0700"]


def _seconds(value: str) -> float:
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units.get(unit or "s", 1)
    return total


def test_service_agrees_with_the_daemon() -> None:
    service = unit_text("m4d.service")
    assert values(service, "Type") == ["notify"]
    assert values(service, "NotifyAccess") == ["main"]
    assert values(service, "ExecStart") == ["/usr/bin/m4d"]
    assert values(service, "User") == ["m4"] and values(service, "Group") == ["m4"]
    assert values(service, "StateDirectory") == [STATE_DIR.name]
    assert values(service, "ConfigurationDirectory") == ["m4"]
    # The stop timeout leaves the daemon time to drain in-flight calls first.
    assert _seconds(values(service, "TimeoutStopSec")[0]) > Config().drain_timeout
    # Exit 2 is a configuration error (m4d.__main__): restarting cannot fix it.
    assert values(service, "RestartPreventExitStatus") == ["2"]
    # Socket activation: the service needs both sockets and starts after them.
    for key in ("Requires", "After"):
        assert sorted(" ".join(values(service, key, "Unit")).split()) == sorted(UNIT_NAMES[1:])


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    """Both files apply cleanly to an empty root; the directories get the right owners."""
    if os.geteuid() != 0:
        pytest.fail("this test creates files owned by m4: run it as root (CI does)")
    root = tmp_path / "root"
    factory = root / "usr/share/m4/images/default"
    factory.mkdir(parents=True)
    (factory / "manifest.json").write_text("{}")
    (root / "etc").mkdir()  # sysusers writes etc/passwd and etc/group, but needs the directory
    sysusers = tmp_path / "sysusers.conf"
    sysusers.write_text((SYSTEMD / "sysusers.d/m4.conf").read_text())
    tmpfiles = tmp_path / "tmpfiles.conf"
    tmpfiles.write_text(substitute((SYSTEMD / "tmpfiles.d/m4.conf").read_text()))

    for cmd in ([tool("systemd-sysusers"), f"--root={root}", str(sysusers)],
                [tool("systemd-tmpfiles"), "--create", f"--root={root}", str(tmpfiles)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        # sysusers reports what it creates on stderr; anything else is a complaint.
        complaints = [line for line in done.stderr.splitlines()
                      if line.strip() and not line.startswith("Creating ")]
        assert done.returncode == 0 and not complaints, (cmd, done.stderr)

    users = {line.split(":")[0]: int(line.split(":")[2])
             for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: int(line.split(":")[2])
              for line in (root / "etc/group").read_text().splitlines()}
    assert "m4" in users and "m4" in groups and "m4-admin" in groups
    assert (root / "etc/passwd").read_text().count("/var/lib/m4") == 1  # m4's home

    def owner_mode(rel: str) -> tuple[int, int, int]:
        st = (root / rel).stat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    assert owner_mode("var/lib/m4") == (users["m4"], groups["m4"], 0o750)
    assert owner_mode("var/lib/m4/images") == (users["m4"], groups["m4"], 0o750)
    assert owner_mode("etc/m4/keys") == (0, 0, 0o755)
    # The factory image is copied, not linked, and stays root's.
    copied = root / "var/lib/m4/images/default"
    assert not copied.is_symlink() and (copied / "manifest.json").read_text() == "{}"
    assert copied.stat().st_uid == 0


def test_tmpfiles_matches_the_daemon_defaults() -> None:
    text = (SYSTEMD / "tmpfiles.d/m4.conf").read_text()
    lines = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    paths = {fields[1]: fields for fields in lines}
    assert str(STATE_DIR) in paths
    assert str(Config().image) in paths and paths[str(Config().image)][0] == "C"
    assert paths[str(Config().image)][6] == "@DATADIR@/m4/images/default"


def test_unit_files_have_only_known_sections() -> None:
    for name in UNIT_NAMES:
        sections = {s for s, _, _ in directives(unit_text(name))}
        kind = name.rsplit(".", 1)[1].capitalize()
        assert sections <= {"Unit", kind, "Install"}, (name, sections)
