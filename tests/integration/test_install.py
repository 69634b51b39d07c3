"""systemd/install.sh (what `make install` runs) into a temporary DESTDIR: every file in
place with the right mode, no trace of DESTDIR or of a placeholder left in any file, units
that still pass `systemd-analyze verify`, users and directories that apply, the installed
interpreter running m4d, and an existing /etc/m4/m4d.toml kept.

Fast: the image is the session's built one (IMAGE=, copied and verified, not rebuilt) and
the private venv gets the project without its dependencies (PIP_ARGS=--no-deps), which is
enough for `m4d --print-config`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from systemd_testing import (
    ROOT,
    SYSTEMD,
    UNIT_NAMES,
    assert_verifies,
    make_verify_root,
    tool,
    values,
)

pytestmark = pytest.mark.slow  # needs the default image (built once per session)

PREFIX = "/usr"
INSTALL = SYSTEMD / "install.sh"


def run_install(destdir: Path, image: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M4", "PIP_"))}
    args = {"DESTDIR": str(destdir), "PREFIX": PREFIX, "PYTHON": sys.executable,
            "IMAGE": str(image), "PIP_ARGS": "--no-deps", **extra}
    return subprocess.run(["sh", str(INSTALL), *(f"{k}={v}" for k, v in args.items())],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def destdir(tmp_path_factory: pytest.TempPathFactory, text_image: Path) -> Path:
    dest = tmp_path_factory.mktemp("destdir")
    done = run_install(dest, text_image)
    assert done.returncode == 0, done.stdout + done.stderr
    return dest


EXPECTED = {  # path under DESTDIR: (kind, mode)
    "usr/bin/m4d": ("file", 0o755),
    "usr/bin/m4ctl": ("file", 0o755),
    "usr/lib/m4/venv/bin/python": ("link", None),
    "usr/lib/m4/venv/pyvenv.cfg": ("file", 0o644),
    "usr/lib/systemd/system/m4d.service": ("file", 0o644),
    "usr/lib/systemd/system/m4d-app.socket": ("file", 0o644),
    "usr/lib/systemd/system/m4d-admin.socket": ("file", 0o644),
    "usr/lib/sysusers.d/m4.conf": ("file", 0o644),
    "usr/lib/tmpfiles.d/m4.conf": ("file", 0o644),
    "etc/m4": ("dir", 0o755),
    "etc/m4/keys": ("dir", 0o755),
    "etc/m4/m4d.toml": ("file", 0o644),
    "usr/share/m4/m4d.toml": ("file", 0o644),
    "usr/share/doc/m4/README.md": ("file", 0o644),
    "usr/share/m4/images/default": ("dir", 0o755),
    "usr/share/m4/images/default/manifest.json": ("file", 0o644),
}


def test_tree_has_every_file_with_its_mode(destdir: Path) -> None:
    for rel, (kind, mode) in EXPECTED.items():
        path = destdir / rel
        st = path.lstat()
        actual = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link"}.get(
            stat.S_IFMT(st.st_mode))
        assert actual == kind, f"{rel} is a {actual}, expected a {kind}"
        if mode is not None:
            assert stat.S_IMODE(st.st_mode) == mode, f"{rel} has mode {st.st_mode:o}"


def test_image_is_complete_and_readable_by_the_daemon_user(destdir: Path,
                                                           text_image: Path) -> None:
    from m4image.verify import verify_image

    installed = destdir / "usr/share/m4/images/default"
    assert verify_image(installed).digest == verify_image(text_image).digest
    for path in installed.rglob("*"):  # 0644/0755 whatever the builder wrote (it writes 0600)
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_nothing_points_into_destdir_or_keeps_a_placeholder(destdir: Path) -> None:
    needle = str(destdir).encode()
    for path in destdir.rglob("*"):
        if path.is_symlink():
            assert needle.decode() not in os.readlink(path), path
            continue
        if not path.is_file() or "images" in path.parts:
            continue
        data = path.read_bytes()
        assert needle not in data, f"{path} mentions DESTDIR"
        if path.suffix in (".service", ".socket", ".conf", ".toml") or path.parent.name == "bin":
            assert b"@BINDIR@" not in data and b"@DATADIR@" not in data, path


def test_units_point_at_the_installed_files(destdir: Path) -> None:
    service = (destdir / "usr/lib/systemd/system/m4d.service").read_text()
    assert values(service, "ExecStart") == [f"{PREFIX}/bin/m4d"]
    assert values(service, "Documentation") == [f"file://{PREFIX}/share/doc/m4/README.md"]
    assert (destdir / values(service, "Documentation")[0][len("file:///"):]).is_file()
    wrapper = (destdir / "usr/bin/m4d").read_text()
    assert f"exec {PREFIX}/lib/m4/venv/bin/python -I -m m4d " in wrapper
    tmpfiles = (destdir / "usr/lib/tmpfiles.d/m4.conf").read_text()
    assert f"{PREFIX}/share/m4/images/default" in tmpfiles


def test_installed_units_verify(destdir: Path, tmp_path: Path) -> None:
    units = {name: (destdir / "usr/lib/systemd/system" / name).read_text() for name in UNIT_NAMES}
    root = make_verify_root(tmp_path / "root", units, [])
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy2(destdir / "usr/bin/m4d", root / "usr/bin/m4d")  # the real wrapper
    assert_verifies(root)


def test_users_and_directories_apply_to_the_tree(destdir: Path, tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles on a copy of the tree, as at first boot."""
    if os.geteuid() != 0:
        pytest.fail("this test creates files owned by m4: run it as root (CI does)")
    root = tmp_path / "root"
    subprocess.run(["cp", "-al", str(destdir), str(root)], check=True)  # hard links: fast
    for cmd in ([tool("systemd-sysusers"), f"--root={root}"],
                [tool("systemd-tmpfiles"), "--create", f"--root={root}"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (cmd, done.stderr)
    uid = next(int(line.split(":")[2]) for line in (root / "etc/passwd").read_text().splitlines()
               if line.startswith("m4:"))
    state = (root / "var/lib/m4").stat()
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (uid, 0o750)
    from m4image.verify import verify_image

    verify_image(root / "var/lib/m4/images/default")  # the factory image, copied in place


def test_installed_daemon_reads_the_installed_config(destdir: Path) -> None:
    python = destdir / "usr/lib/m4/venv/bin/python"
    done = subprocess.run(
        [str(python), "-I", "-m", "m4d", "--config", str(destdir / "etc/m4/m4d.toml"),
         "--print-config"], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "image = PosixPath('/var/lib/m4/images/default')" in done.stdout
    # The byte code names the installed path, not DESTDIR (tracebacks point at real files).
    assert list((destdir / "usr/lib/m4/venv/lib").rglob("m4d/__pycache__/config.*.pyc"))


def test_existing_config_is_kept(destdir: Path, text_image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    shutil.copytree(destdir / "etc", dest / "etc")
    (dest / "etc/m4/m4d.toml").write_text("kv_slots = 4\n")
    done = run_install(dest, text_image)
    assert done.returncode == 0, done.stderr
    assert (dest / "etc/m4/m4d.toml").read_text() == "kv_slots = 4\n"
    assert "keeping the existing" in done.stdout
    assert (dest / "usr/share/m4/m4d.toml").read_text() == (SYSTEMD / "m4d.toml").read_text()


def test_bad_settings_are_refused_with_the_fix(tmp_path: Path, text_image: Path) -> None:
    done = run_install(tmp_path / "d", text_image, PREFIX="usr")
    assert done.returncode == 1 and "PREFIX must be an absolute path" in done.stderr
    done = run_install(tmp_path / "d", text_image, RUNTIME_PYTHON="/bin/false")
    assert done.returncode == 1 and "RUNTIME_PYTHON '/bin/false' does not run" in done.stderr
    done = run_install(tmp_path / "d", tmp_path / "no-image")
    assert done.returncode == 1 and "does not verify" in done.stderr
