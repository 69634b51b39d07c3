"""`m4ctl doctor` against a temporary system (`--root`): users, config, a trusted key, a
tiny signed image, the state directory, offline-enabled units and two Unix sockets
answering gRPC health like m4d. Each test breaks one thing and checks the line, the fix and
the exit code. The real command runs as `python -m m4ctl._doctor` (the same code that
`m4ctl doctor` runs)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from m4ctl import _doctor
from m4image.keys import Keyring
from m4image.sign import generate_keypair, sign_image

from tests.unit.imagekit import make_image

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
M4_UID, M4_GID, ADMIN_GID = 61990, 61990, 61991


class System:
    """A staged installation under `root` and the gRPC health servers on its sockets."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[grpc.Server] = []
        self.health: list[health.HealthServicer] = []

    def serve(self, name: str, mode: int, gid: int) -> None:
        path = self.root / "run/m4" / name
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix://{path}")
        server.start()
        os.chmod(path, mode)
        os.chown(path, 0, gid)
        self.servers.append(server)
        self.health.append(servicer)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(None)

    def run(self, *args: str) -> tuple[int, list[dict[str, str]]]:
        """Runs the doctor in-process with --json; (exit code, one dict per check)."""
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = _doctor.main(["--root", str(self.root), "--json", *args])
        return code, [json.loads(line) for line in buf.getvalue().splitlines()]

    def line(self, check: str, *args: str) -> dict[str, str]:
        return next(c for c in self.run(*args)[1] if c["check"] == check)


@pytest.fixture
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    if os.geteuid() != 0:
        pytest.fail("these tests chown files to the m4 user of the staged system: run as root")
    root = tmp_path_factory.mktemp("sys")  # short: Unix socket paths are limited to 107 bytes
    (root / "etc/m4/keys").mkdir(parents=True)
    (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/sh\nm4:x:{M4_UID}:{M4_GID}:"
                                     "M4 model daemon:/var/lib/m4:/usr/sbin/nologin\n")
    (root / "etc/group").write_text(f"root:x:0:\nm4:x:{M4_GID}:\nm4-admin:x:{ADMIN_GID}:\n")
    shutil.copy(SYSTEMD / "m4d.toml", root / "etc/m4/m4d.toml")
    (root / "usr/share/m4").mkdir(parents=True)  # the reference install.sh keeps beside it
    shutil.copy(SYSTEMD / "m4d.toml", root / "usr/share/m4/m4d.toml")
    pair = generate_keypair(tmp_path_factory.mktemp("keys") / "release")
    Keyring(root / "etc/m4/keys").add(pair.public_key)
    state = root / "var/lib/m4"
    (state / "images").mkdir(parents=True)
    for d in (state, state / "images"):
        os.chown(d, M4_UID, M4_GID)
        d.chmod(0o750)
    sign_image(make_image(state / "images/default"), pair.private_key)
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for name in ("m4d.service", "m4d-app.socket", "m4d-admin.socket"):
        text = (SYSTEMD / name).read_text().replace("@BINDIR@", "/usr/bin")
        (units / name).write_text(text.replace("@DATADIR@", "/usr/share"))
    subprocess.run(["systemctl", f"--root={root}", "enable", "m4d.service"], check=True,
                   capture_output=True)
    (root / "run/m4").mkdir(parents=True)
    s = System(root)
    s.serve("app.sock", 0o666, 0)
    s.serve("admin.sock", 0o660, ADMIN_GID)
    yield s
    s.stop()


def test_a_good_installation_passes(system: System) -> None:
    code, checks = system.run()
    assert [c["check"] for c in checks] == [
        "config", "app socket", "admin socket", "admin access", "image", "keys",
        "accelerators", "units", "state dir"]
    assert all(c["status"] == "ok" for c in checks), checks
    assert code == 0
    assert "tiny 1.0.0" in system.line("image")["detail"]
    assert "signed by" in system.line("image")["detail"]
    assert "cpu" in system.line("accelerators")["detail"]


def test_image_the_daemon_user_cannot_read_fails(system: System) -> None:
    """The image verifies as root, yet m4 could not open a 0600 root-owned weight file
    (what the image builder wrote for the backbone before install.sh fixed the modes)."""
    image = system.root / "var/lib/m4/images/default"
    (image / "backbone/model.safetensors").chmod(0o600)
    check = system.line("image")
    assert check["status"] == "fail"
    assert "user m4 cannot read backbone/model.safetensors" in check["detail"]
    assert check["fix"] == "chmod -R a+rX /var/lib/m4/images/default"


def test_unsigned_image_warns_when_keys_are_trusted(system: System) -> None:
    (system.root / "var/lib/m4/images/default/manifest.sig").unlink()
    check = system.line("image")
    assert check["status"] == "warn" and "not the signature" in check["detail"]
    assert "m4ctl image sign" in check["fix"]


def test_tampered_image_fails(system: System) -> None:
    (system.root / "var/lib/m4/images/default/backbone/tokenizer.json").write_text("{}")
    check = system.line("image")
    assert check["status"] == "fail" and "tokenizer.json" in check["detail"]


def test_missing_image_fails_with_the_fix(system: System) -> None:
    shutil.rmtree(system.root / "var/lib/m4/images/default")
    code, checks = system.run()
    check = next(c for c in checks if c["check"] == "image")
    assert check["status"] == "fail" and "does not exist" in check["detail"]
    assert "systemd-tmpfiles --create m4.conf" in check["fix"]
    assert code == 1


def test_corrupt_image_fails(system: System) -> None:
    image = system.root / "var/lib/m4/images/default"
    (image / "manifest.sig").unlink()
    (image / "manifest.json").write_text("{not json")
    check = system.line("image")
    assert check["status"] == "fail" and "manifest" in check["detail"]


def test_bad_config_key_is_named(system: System) -> None:
    (system.root / "etc/m4/m4d.toml").write_text("kv_slot = 3\n")
    code, checks = system.run()
    config = checks[0]
    assert config["check"] == "config" and config["status"] == "fail"
    assert "unknown key 'kv_slot'" in config["detail"]
    assert code == 1


def test_config_values_are_used(system: System) -> None:
    """The sockets and image checked are the ones the config names."""
    (system.root / "etc/m4/m4d.toml").write_text('app_socket = "/run/m4/other.sock"\n')
    assert system.line("config")["status"] == "ok"
    check = system.line("app socket")
    assert check["status"] == "fail" and "other.sock" in check["detail"]


def test_config_paths_and_group_are_used(system: System) -> None:
    (system.root / "etc/m4/m4d.toml").write_text(
        'keys_dir = "/etc/m4/other-keys"\nadmin_group = "wheel"\n')
    check = system.line("keys")
    assert check["status"] == "warn" and "/etc/m4/other-keys does not exist" in check["detail"]
    check = system.line("admin socket")
    assert check["status"] == "fail" and "group wheel does not exist" in check["detail"]


def test_missing_socket_fails_and_not_serving_warns(system: System) -> None:
    system.health[0].set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    check = system.line("app socket")
    assert check["status"] == "warn" and "NOT_SERVING" in check["detail"]
    (system.root / "run/m4/admin.sock").unlink()
    check = system.line("admin socket")
    assert check["status"] == "fail" and "no socket" in check["detail"]
    assert "systemctl enable --now m4d-admin.socket" in check["fix"]


def test_socket_nobody_answers_on_fails(system: System) -> None:
    system.servers[0].stop(None)  # removes app.sock; leave a stale one, as a crash does
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(system.root / "run/m4/app.sock"))
    stale.close()
    os.chmod(system.root / "run/m4/app.sock", 0o666)
    check = system.line("app socket")
    assert check["status"] == "fail" and "does not answer" in check["detail"]
    assert "journalctl -u m4d.service" in check["fix"]


def test_admin_socket_open_to_everyone_fails(system: System) -> None:
    os.chmod(system.root / "run/m4/admin.sock", 0o666)
    check = system.line("admin socket")
    assert check["status"] == "fail" and "mode 0666, expected 0660" in check["detail"]


def test_admin_socket_in_the_wrong_group_warns(system: System) -> None:
    os.chown(system.root / "run/m4/admin.sock", 0, M4_GID)
    check = system.line("admin socket")
    assert check["status"] == "warn" and "m4-admin" in check["detail"]


def test_keys(system: System) -> None:
    keys = system.root / "etc/m4/keys"
    check = system.line("keys")
    assert check["status"] == "ok" and "trusts 1 key(s)" in check["detail"]
    (keys / "broken.pub").write_text("not a key\n")
    check = system.line("keys")
    assert check["status"] == "fail" and "broken.pub" in check["detail"]
    for pub in keys.glob("*.pub"):
        pub.unlink()
    check = system.line("keys")
    assert check["status"] == "warn" and "trusts no key" in check["detail"]
    assert check["fix"] == "m4ctl keys add SIGNER.pub"
    keys.chmod(0o777)
    assert system.line("keys")["status"] == "fail"
    shutil.rmtree(keys)
    assert system.line("keys")["status"] == "warn"


def test_units_disabled_or_missing_warn(system: System) -> None:
    subprocess.run(["systemctl", f"--root={system.root}", "disable", "m4d.service"],
                   check=True, capture_output=True)
    check = system.line("units")
    assert check["status"] == "warn" and "not enabled" in check["detail"]
    assert check["fix"] == "systemctl enable --now m4d.service"
    shutil.rmtree(system.root / "usr/lib/systemd/system")
    check = system.line("units")
    assert check["status"] == "warn" and "not installed" in check["detail"]


def test_state_dir(system: System) -> None:
    state = system.root / "var/lib/m4"
    assert system.line("state dir")["status"] == "ok"
    state.chmod(0o755)
    assert system.line("state dir")["status"] == "warn"
    os.chown(state, 0, 0)
    check = system.line("state dir")
    assert check["status"] == "fail" and "not owned by m4" in check["detail"]
    (system.root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    check = system.line("state dir")
    assert check["status"] == "fail" and "user m4 does not exist" in check["detail"]


def test_real_command_prints_one_line_per_check(system: System) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "m4ctl._doctor", "--root", str(system.root)],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("M4")})
    lines = done.stdout.splitlines()
    assert len(lines) == 9, done.stdout
    assert all(line.split()[0] == "ok" for line in lines), done.stdout
    assert done.returncode == 0
    assert "m4ctl doctor: 9 ok, 0 warn, 0 FAIL" in done.stderr

    shutil.rmtree(system.root / "var/lib/m4/images/default")
    done = subprocess.run(
        [sys.executable, "-m", "m4ctl._doctor", "--root", str(system.root)],
        capture_output=True, text=True, timeout=120)
    image = next(line for line in done.stdout.splitlines() if line.split()[1] == "image")
    assert image.startswith("FAIL  image") and "(fix: " in image
    assert done.returncode == 1

    quiet = subprocess.run(
        [sys.executable, "-m", "m4ctl._doctor", "--root", str(system.root), "-q"],
        capture_output=True, text=True, timeout=120)
    assert [line.split()[0] for line in quiet.stdout.splitlines()] == ["FAIL"]


def test_register_adds_the_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="m4ctl")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _doctor.register(sub, parents=[common])
    args = parser.parse_args(["doctor", "--root", "/tmp/x", "--config", "/tmp/c.toml", "--json"])
    assert (args.command, args.root, args.config, args.json) == (
        "doctor", Path("/tmp/x"), Path("/tmp/c.toml"), True)
    assert args.handler is _doctor.cmd_doctor  # how m4ctl's main() dispatches
