"""Firmware images through the admin socket, end to end: a real m4d booting from its image
store (seeded with a signed copy of the real default image), driven by the real m4ctl.

One daemon serves the whole module; each test leaves it serving v1 (active) again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4client import AdminClient, Client, M4Error
from m4image.keys import Keyring
from m4image.sign import generate_keypair, sign_image

from tests.conftest import DaemonProcess
from tests.integration.imagetools import (
    assert_store_clean,
    dev_keys,
    flip_byte,
    m4ctl,
    start_store_daemon,
    store_state,
    variant,
)
from tests.unit.imagekit import chunked, craft_tar, entries_of, make_image, special

WEIGHTS = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def fleet(text_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Signed variants of the default image, a dev keyring, and images that must be refused."""
    root = tmp_path_factory.mktemp("fleet")
    key = dev_keys(root / "dev")
    keys = root / "dev" / "keys"
    stranger = dev_keys(root / "stranger", trust=False)
    old = generate_keypair(root / "old")  # trusted, then revoked
    Keyring(keys).add(old.public_key)
    src = text_image
    img: dict[str, Path] = {
        "v1": variant(src, root / "v1", key, version="1.0.0"),
        "v2": variant(src, root / "v2", key, version="1.1.0"),
        "unknown key": variant(src, root / "unknown", stranger, version="1.4.0"),
        "revoked key": variant(src, root / "revoked", old.private_key, version="1.5.0"),
        "lower security_version": variant(src, root / "low", key, version="0.9.0",
                                          security_version=0),
        "compatible mismatch": variant(src, root / "gpu", key, version="1.6.0",
                                       compatible="m4-gpu-v9"),
        "flipped byte in a weight file": variant(src, root / "flipped", key, version="1.7.0",
                                                 copy=(WEIGHTS,)),
    }
    flip_byte(img["flipped byte in a weight file"] / WEIGHTS, 4096)
    bad_sig = variant(src, root / "badsig", key, version="1.3.0")
    manifest = json.loads((bad_sig / "manifest.json").read_bytes())
    manifest["version"] = "1.3.1"  # changed after signing
    (bad_sig / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    img["bad signature"] = bad_sig
    selftest = json.loads((src / "manifest.json").read_bytes())["self_test"]
    selftest[0] = dict(selftest[0], expected_token_ids=[7, *selftest[0]["expected_token_ids"][1:]])
    img["bad self-test"] = variant(src, root / "badtest", key, version="1.2.0",
                                   self_test=selftest)
    Keyring(keys).revoke(old.key_id, reason="test: a leaked key")
    tiny = make_image(root / "tiny", seed="tiny", version="9.0.0")
    sign_image(tiny, key)
    return {"root": root, "keys": keys, "key": key, "img": img, "tiny": tiny}


def _key_id(pub: Path) -> str:
    from m4image.keys import key_id_of, load_public_key

    return key_id_of(load_public_key(pub))


@pytest.fixture(scope="module")
def store_daemon(fleet: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[DaemonProcess]:
    """m4d booting from an empty store: it installs v1 (the factory image) and serves it."""
    root = tmp_path_factory.mktemp("m4d-store")
    # Sockets in a directory other users can search, so the permission test reaches them.
    run = Path(tempfile.mkdtemp(prefix="m4-image-admin-"))
    os.chmod(run, 0o755)
    d = start_store_daemon(fleet["img"]["v1"], run, root / "state", fleet["keys"],
                           env={"M4D_ADMIN_GROUP": "nogroup"})
    yield d
    d.stop()
    shutil.rmtree(run, ignore_errors=True)


def state_dir(d: DaemonProcess) -> Path:
    return Path(d.extra_env["state_dir"])


def served_version(d: DaemonProcess) -> str:
    with Client(d.address) as c:
        model = c.complete("Hello", max_tokens=2, temperature=0).model
    assert model is not None
    return model.image_version


def active_version(d: DaemonProcess) -> str:
    with AdminClient(d.admin_address) as a:
        active = a.list_images().by_state("active")
    assert active is not None
    return active.version


# ---- who may call ------------------------------------------------------------------------


def test_first_start_installs_the_factory_image(store_daemon: DaemonProcess,
                                                fleet: dict[str, Any]) -> None:
    state = assert_store_clean(state_dir(store_daemon))
    assert [r["version"] for r in state["images"].values()] == ["1.0.0"]
    assert [h["event"] for h in state["history"]] == ["install", "activate", "boot-attempt",
                                                      "mark-good"]
    assert served_version(store_daemon) == "1.0.0"


def test_admin_rpcs_are_not_served_on_the_app_socket(store_daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(store_daemon.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListImages(admin_pb2.ListImagesRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _call_as(uid: int, gid: int, socket: Path) -> subprocess.CompletedProcess[str]:
    """ListImages from a process running as uid:gid (no supplementary groups). It drops root
    after its imports: the interpreter under /root is not readable by other users."""
    code = (
        "import os\n"
        "from m4client import AdminClient, M4Error\n"
        f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
        "try:\n"
        f"    AdminClient('unix://{socket}', timeout=10).list_images()\n"
        "    print('OK')\n"
        "except M4Error as e:\n"
        "    print(e.code, e.message)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_unprivileged_callers_are_refused(store_daemon: DaemonProcess) -> None:
    sock = store_daemon.admin_socket
    assert (sock.stat().st_mode & 0o777) == 0o660
    nobody, nogroup, other = 65534, 65534, 1
    # The socket's mode keeps an unprivileged uid out before any RPC runs.
    done = _call_as(nobody, other, sock)
    assert done.stdout.startswith("UNAVAILABLE"), done
    # With the socket opened up, the handler still checks the kernel's uid and groups.
    os.chmod(sock, 0o666)
    try:
        done = _call_as(nobody, other, sock)
        assert done.stdout.startswith("PERMISSION_DENIED"), done
        assert "'nogroup' group" in done.stdout
        done = _call_as(nobody, nogroup, sock)  # a member of the admin group (admin_group)
        assert done.stdout.strip() == "OK", done
    finally:
        os.chmod(sock, 0o660)


# ---- install, list, activate, rollback ---------------------------------------------------


def test_install_list_activate_rollback_with_m4ctl(store_daemon: DaemonProcess,
                                                   fleet: dict[str, Any]) -> None:
    env = store_daemon.env()
    done = m4ctl("image", "install", str(fleet["img"]["v2"]), env=env)
    assert done.returncode == 0, done.stderr
    assert "installed m4-default 1.1.0" in done.stdout
    assert "files:" in done.stderr or "publish" in done.stderr  # progress on stderr

    done = m4ctl("--json", "image", "list", env=env)
    images = {i["version"]: i for i in json.loads(done.stdout)["images"]}
    assert images["1.0.0"]["state"] == "IMAGE_STATE_ACTIVE"
    assert images["1.1.0"]["state"] == "IMAGE_STATE_INSTALLED"
    assert images["1.1.0"]["signedBy"] == _key_id(fleet["key"].with_suffix(".pub"))

    done = m4ctl("image", "activate", "1.1.0", env=env)
    assert done.returncode == 0, done.stderr
    assert "activated m4-default 1.1.0" in done.stdout
    assert served_version(store_daemon) == "1.1.0"
    done = m4ctl("image", "list", env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[2]: line.split()[0] for line in done.stdout.splitlines()[1:3]}
    assert rows == {"1.0.0": "previous", "1.1.0": "active"}, done.stdout

    done = m4ctl("image", "remove", "1.0.0", env=env)  # the previous image stays
    assert done.returncode == 1 and "FAILED_PRECONDITION" in done.stderr, done.stderr

    done = m4ctl("image", "rollback", env=env)
    assert done.returncode == 0, done.stderr
    assert "rolled back to m4-default 1.0.0" in done.stdout
    assert served_version(store_daemon) == "1.0.0"
    done = m4ctl("image", "list", "--history", "3", env=env)
    assert "rollback" in done.stdout and "back to m4-default 1.0.0" in done.stdout
    state = assert_store_clean(state_dir(store_daemon))
    assert state["images"][state["active"]]["version"] == "1.0.0"
    assert state["images"][state["previous"]]["version"] == "1.1.0"


def test_activate_for_the_next_boot(store_daemon: DaemonProcess) -> None:
    env = store_daemon.env()
    done = m4ctl("image", "activate", "1.1.0", "--next-boot", env=env)
    assert done.returncode == 0, done.stderr
    assert "on trial: it is tried at the daemon's next start" in done.stdout
    assert served_version(store_daemon) == "1.0.0"  # nothing changes until then
    done = m4ctl("image", "list", env=env)
    assert "trial: m4-default 1.1.0" in done.stdout and "previous+trial" in done.stdout
    done = m4ctl("image", "activate", "1.0.0", env=env)
    assert done.returncode == 1 and "already the active image" in done.stderr
    # Marking good by hand is for a trial the daemon serves (self_test warn or off).
    done = m4ctl("image", "mark-good", env=env)
    assert done.returncode == 1 and "is not what this daemon serves" in done.stderr
    done = m4ctl("image", "activate", "1.1.0", env=env)  # the pending trial, now
    assert done.returncode == 0, done.stderr
    assert served_version(store_daemon) == "1.1.0"
    done = m4ctl("image", "rollback", env=env)
    assert done.returncode == 0, done.stderr
    state = assert_store_clean(state_dir(store_daemon))
    assert state["trial"] is None
    assert state["images"][state["active"]]["version"] == "1.0.0"
    assert served_version(store_daemon) == "1.0.0"


# ---- refusals ----------------------------------------------------------------------------

M4CTL_REFUSALS = {
    "bad signature": "does not match manifest.json",
    "unknown key": "not in the keyring",
    "revoked key": "which is revoked",
    "flipped byte in a weight file": "corrupted in transfer or tampered",
    "lower security_version": "anti-rollback floor",
    "compatible mismatch": "built for 'm4-gpu-v9'",
}


def _tiny_tars(tiny: Path) -> dict[str, tuple[bytes, str, str]]:
    """Malicious or broken tars of a small signed image: (tar, status code, message part)."""
    e = entries_of(tiny)
    weights = "backbone/model.safetensors"
    rest = [x for x in e if x[0] != weights]
    return {
        "truncated file": (craft_tar(e, size_override={weights: 1000}), "FAILED_PRECONDITION",
                           "truncated"),
        "extra file": (craft_tar([*e, ("backbone/extra.bin", b"surprise")]),
                       "FAILED_PRECONDITION", "not listed in the manifest"),
        "missing file": (craft_tar(rest), "FAILED_PRECONDITION", "was not in the install tar"),
        "'..' path": (craft_tar([*e[:2], ("../escape", b"x"), *e[2:]]), "FAILED_PRECONDITION",
                      "unsafe path"),
        "symlink": (craft_tar([*rest, special(weights, b"2", "/etc/shadow")]),
                    "FAILED_PRECONDITION", "symlink entry"),
        "oversized manifest": (craft_tar([("manifest.json", b" " * ((1 << 20) + 1))]),
                               "FAILED_PRECONDITION", "over the"),
        "manifest not first": (craft_tar([e[2], *e[:2], *e[3:]]), "INVALID_ARGUMENT",
                               "must start with manifest.json"),
    }


def test_refusals_leave_the_active_image_serving(store_daemon: DaemonProcess,
                                                 fleet: dict[str, Any]) -> None:
    env = store_daemon.env()
    before = store_state(state_dir(store_daemon))
    for case, message in M4CTL_REFUSALS.items():
        done = m4ctl("image", "install", str(fleet["img"][case]), env=env)
        assert done.returncode == 1, (case, done.stdout)
        assert "FAILED_PRECONDITION" in done.stderr and message in done.stderr, (case, done.stderr)
    with AdminClient(store_daemon.admin_address, timeout=60) as admin:
        for case, (tar, code, message) in _tiny_tars(fleet["tiny"]).items():
            with pytest.raises(M4Error) as e:
                admin.install_image(chunked(tar, 100_000))
            assert e.value.code == code and message in e.value.message, (case, e.value)
    after = assert_store_clean(state_dir(store_daemon))
    assert after["images"] == before["images"] and after["active"] == before["active"]
    assert served_version(store_daemon) == "1.0.0"


def test_trial_failing_its_self_test_is_refused_and_recorded(store_daemon: DaemonProcess,
                                                             fleet: dict[str, Any]) -> None:
    env = store_daemon.env()
    done = m4ctl("image", "install", str(fleet["img"]["bad self-test"]), env=env)
    assert done.returncode == 0, done.stderr
    done = m4ctl("image", "activate", "1.2.0", env=env)
    assert done.returncode == 1
    assert "FAILED_PRECONDITION" in done.stderr and "failed its self-test" in done.stderr
    assert served_version(store_daemon) == "1.0.0"
    done = m4ctl("image", "list", "--history", "4", env=env)
    assert "mark-bad" in done.stdout and "failed its self-test" in done.stdout, done.stdout
    assert "activation refused" in store_daemon.logs()
    state = assert_store_clean(state_dir(store_daemon))
    assert state["trial"] is None and state["images"][state["active"]]["version"] == "1.0.0"
    done = m4ctl("image", "remove", "1.2.0", env=env)
    assert done.returncode == 0, done.stderr


def test_async_admin_client(store_daemon: DaemonProcess, fleet: dict[str, Any]) -> None:
    """AsyncAdminClient: install (with progress), list and remove a small signed image."""
    from m4client import AsyncAdminClient
    from m4image.tarstream import iter_image_tar

    async def main() -> None:
        async with AsyncAdminClient(store_daemon.admin_address, timeout=60) as admin:
            seen: list[str] = []
            image = await admin.install_image(iter_image_tar(fleet["tiny"]),
                                              progress=lambda p: seen.append(p.stage))
            assert (image.version, image.state) == ("9.0.0", "installed") and "signature" in seen
            listing = await admin.list_images(history=True)
            assert listing.history[-1].event == "install"
            assert await admin.remove_image("9.0.0") == image.digest

    asyncio.run(main())
    assert_store_clean(state_dir(store_daemon))


# ---- swap under load ---------------------------------------------------------------------


class Load:
    """8 clients streaming generations back to back, and a health checker, until stopped."""

    def __init__(self, d: DaemonProcess, clients: int = 8) -> None:
        self.d = d
        self.stop = threading.Event()
        self.done: list[tuple[float, float, frozenset[str]]] = []  # start, end, versions
        self.failed: list[tuple[float, str, str]] = []
        self.health_failed: list[tuple[float, str]] = []
        self.health_ok = 0
        self.rss: list[int] = []  # the daemon's resident memory, sampled every 0.2 s
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        self.threads += [threading.Thread(target=self._health), threading.Thread(target=self._rss)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def _client(self, i: int) -> None:
        with Client(self.d.address, app_name=f"load-{i}") as c:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    versions = set()
                    with c.generate(f"Tell me a fact about the number {i}.", max_tokens=12,
                                    temperature=0, timeout=120) as stream:
                        for chunk in stream:
                            if chunk.model is not None:
                                versions.add(chunk.model.image_version)
                    self.done.append((start, time.monotonic(), frozenset(versions)))
                except M4Error as exc:
                    self.failed.append((time.monotonic(), exc.code, exc.message))
                    if exc.code == "UNAVAILABLE":
                        time.sleep(0.2)

    def _health(self) -> None:
        with grpc.insecure_channel(self.d.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.wait(0.2):
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                    self.health_ok += 1
                except (grpc.RpcError, AssertionError) as exc:
                    self.health_failed.append((time.monotonic(), repr(exc)))

    def _rss(self) -> None:
        with AdminClient(self.d.admin_address, timeout=5) as admin:
            while not self.stop.wait(0.2):
                self.rss.append(admin.status().memory_rss_bytes)

    def versions_started(self, start: float, end: float) -> set[frozenset[str]]:
        """The images that served the calls started in [start, end] (a call stays on the
        image it started on, however long it runs)."""
        return {v for s, _, v in self.done if start <= s <= end}


def timed_m4ctl(d: DaemonProcess, *args: str) -> tuple[float, float]:
    start = time.monotonic()
    done = m4ctl(*args, env=d.env())
    assert done.returncode == 0, done.stderr
    return start, time.monotonic()


def test_swap_under_load(store_daemon: DaemonProcess, fleet: dict[str, Any]) -> None:
    """8 clients stream all the time; activate v2, then roll back: no call fails, responses
    switch image_version, health answers throughout."""
    timed_m4ctl(store_daemon, "image", "install", str(fleet["img"]["v2"]))  # if not yet
    with Load(store_daemon) as load:
        time.sleep(3)
        act = timed_m4ctl(store_daemon, "image", "activate", "1.1.0")
        time.sleep(3)
        back = timed_m4ctl(store_daemon, "image", "rollback")
        time.sleep(3)
    assert load.failed == [], load.failed[:5]
    assert load.health_failed == [] and load.health_ok > 20
    assert all(len(v) == 1 for _, _, v in load.done)  # one image per response, start to end
    assert load.versions_started(0, act[0]) == {frozenset({"1.0.0"})}
    assert load.versions_started(act[1], back[0]) == {frozenset({"1.1.0"})}
    assert load.versions_started(back[1], float("inf")) == {frozenset({"1.0.0"})}
    during = [e - s for s, e, _ in load.done if s < act[1] and e > act[0]]
    before = sorted(e - s for s, e, _ in load.done if e < act[0])
    print(f"\nswap under load: {len(load.done)} calls, 0 failed; activate took "
          f"{act[1] - act[0]:.1f} s, rollback {back[1] - back[0]:.1f} s; call latency before "
          f"p50 {before[len(before) // 2]:.2f} s, during the activation max {max(during):.2f} s;"
          f" RSS {min(load.rss) >> 20}-{max(load.rss) >> 20} MiB")
