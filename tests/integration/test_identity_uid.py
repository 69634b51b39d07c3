"""Identity from the kernel, end to end: a real client running as nobody (uid 65534) and
this test's own calls as root go through the real daemon, and the Admin Status RPC
attributes every request and token to the uid the kernel reported, whatever app name the
caller claimed; a uid capped by config (uid_max_class) stays in its class even when it
claims to be the system UI and asks for the system class.

The test runs as root. nobody cannot traverse pytest's tmp dirs (under /tmp/pytest-of-root,
0700) or exec the venv's python, so the daemon's runtime dir is a world-traversable
directory in /tmp (the app socket is 0666 by default), and the client is a helper that
imports m4client as root, then drops to 65534 before it connects (tests/integration/
uid_client.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from m4client import AdminClient, Client, DaemonStatus, UidUsage

from tests.conftest import ROOT, DaemonProcess, start_daemon

NOBODY = 65534


@pytest.fixture(scope="module")
def shared_daemon(text_image: Path) -> Iterator[DaemonProcess]:
    assert os.geteuid() == 0, "this test runs as root: it starts a client as uid 65534"
    run = Path(tempfile.mkdtemp(prefix="m4-uid-", dir="/tmp"))
    run.chmod(0o755)  # nobody must reach app.sock (0666) inside
    d = start_daemon(text_image, run, env={"M4D_UID_MAX_CLASS": f"{NOBODY}=background"})
    try:
        mode = d.app_socket.stat().st_mode & 0o777
        assert mode == 0o666, f"app socket mode {mode:o}: other uids could not connect"
        yield d
    finally:
        d.stop()
        shutil.rmtree(run, ignore_errors=True)


def as_nobody(d: DaemonProcess, app: str, priority: str, calls: int) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.uid_client", d.address, str(NOBODY), app,
         priority, str(calls)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"client as nobody failed:\n{done.stdout}\n{done.stderr}"
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["uid"] == NOBODY
    return result


def as_root(d: DaemonProcess, app: str, priority: str, calls: int) -> dict[str, int]:
    prompt = completion = 0
    with Client(d.address, app_name=app, timeout=120) as client:
        for _ in range(calls):
            r = client.complete("Root asks about the weather", max_tokens=6, temperature=0.0,
                                priority=priority)
            prompt += r.usage.prompt_tokens
            completion += r.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "calls": calls}


def status(d: DaemonProcess) -> DaemonStatus:
    with AdminClient(d.admin_address, timeout=30) as admin:
        return admin.status()


def usage(s: DaemonStatus, uid: int) -> UidUsage:
    found = [u for u in s.uids if u.uid == uid]
    assert found, f"no usage for uid {uid} in {[u.uid for u in s.uids]}"
    return found[0]


def test_usage_is_attributed_to_the_kernels_uid(shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    before_root = usage(status(d), 0)  # the self-test ran as the daemon's own uid (root)
    assert all(u.uid != NOBODY for u in status(d).uids)

    nobody = as_nobody(d, "settings", "foreground", 3)
    root = as_root(d, "settings", "system", 2)  # the same claimed name, another uid
    s = status(d)

    n = usage(s, NOBODY)
    assert n.user == "nobody"
    assert n.apps == ["settings"]
    assert (n.requests_ok, n.requests_failed, n.requests_rejected) == (3, 0, 0)
    assert n.tokens_in == nobody["prompt_tokens"] > 0
    assert n.tokens_out == nobody["completion_tokens"] > 0
    assert (n.in_flight, n.queued) == (0, 0)
    assert n.priority_class == "background"  # uid_max_class caps 65534

    r = usage(s, 0)
    assert r.user == "root" and "settings" in r.apps
    assert r.requests_ok == before_root.requests_ok + 2
    assert r.tokens_in == before_root.tokens_in + root["prompt_tokens"]
    assert r.tokens_out == before_root.tokens_out + root["completion_tokens"]
    assert r.priority_class == "system"  # root is not capped: it got what it asked for
    assert {u.uid for u in s.uids} == {0, NOBODY}  # nobody else was invented


def test_a_fake_system_name_stays_nobody_and_capped(shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    before = usage(status(d), NOBODY)
    root_before = usage(status(d), 0)
    fake = as_nobody(d, "system-ui", "system", 2)  # claims the system UI, asks for system
    s = status(d)

    n = usage(s, NOBODY)
    assert n.apps == sorted({*before.apps, "system-ui"})
    assert n.requests_ok == before.requests_ok + 2
    assert n.tokens_out == before.tokens_out + fake["completion_tokens"]
    assert n.tokens_in == before.tokens_in + fake["prompt_tokens"]
    assert n.priority_class == "background"  # asked for system, capped by config
    r = usage(s, 0)
    assert "system-ui" not in r.apps  # the label never moved to another uid
    assert (r.requests_ok, r.tokens_out) == (root_before.requests_ok, root_before.tokens_out)
