"""`m4ctl top` and `m4ctl status` as an operator runs them, against a real daemon on the
real default image while generations run, and against a daemon that is not there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from m4client import AdminClient, Client

from tests.conftest import DaemonProcess, default_sigint

APP = "top-test"


def m4ctl(daemon: DaemonProcess, *args: str, timeout: float = 120,
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m4ctl", *args], capture_output=True,
                          text=True, timeout=timeout, env=daemon.env())


@pytest.fixture
def load(daemon: DaemonProcess) -> Iterator[None]:
    """Two generations running as long as the test needs (restarted as they finish)."""
    stop = threading.Event()

    def generate() -> None:
        with Client(daemon.address, app_name=APP, timeout=300) as c:
            while not stop.is_set():
                for _ in c.generate("Tell a long story about the sea.", max_tokens=400,
                                    ignore_eos=True, priority="background"):
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=generate, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    with AdminClient(daemon.admin_address, timeout=30) as admin:
        deadline = time.monotonic() + 60
        while True:  # until both are decoding: top then shows real load
            s = admin.status()
            if s.load is not None and s.load.running_sequences == 2 and s.tokens_generated:
                break
            assert time.monotonic() < deadline, "the load never started"
            time.sleep(0.05)
    time.sleep(1.0)  # a second of samples behind the recent rates
    yield
    stop.set()
    for t in threads:
        t.join(timeout=60)


def test_top_once_shows_queues_batch_and_shares(daemon: DaemonProcess, load: None) -> None:
    out = m4ctl(daemon, "top", "--once")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "\x1b[" not in text  # not a terminal: no escape codes
    lines = text.splitlines()
    assert lines[0].startswith("m4d ") and "READY" in lines[0]
    queues = next(line for line in lines if line.startswith("queues"))
    assert "system" in queues and "foreground" in queues and "background" in queues
    batch = next(line for line in lines if line.startswith("batch"))
    assert batch.split()[1] == "2"  # two sequences running
    rate = next(line for line in lines if line.startswith("rate"))
    assert float(rate.split()[1]) > 0  # tok/s decode
    assert any(line.startswith("devices") and "backbone" in line for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("UID"))
    columns = lines[header].split()
    assert columns[:4] == ["UID", "USER", "APPS", "CLASS"] and columns[-1] == "SHARE"
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    mine = next(r for r in rows if r[0] == str(os.geteuid()))
    assert APP in mine[2].split(",")
    assert mine[3] == "background"
    assert int(mine[columns.index("INFL")]) >= 2
    assert float(mine[columns.index("TOK/S")]) > 0
    assert mine[-1].endswith("%") and int(mine[-1][:-1]) > 0


def test_top_json_is_one_frame(daemon: DaemonProcess, load: None) -> None:
    out = m4ctl(daemon, "top", "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    frame = json.loads(lines[0])
    assert frame["daemon"]["state"] == "READY"
    loadv = frame["load"]
    assert loadv["running_sequences"] == 2 and loadv["decode_tokens_per_second"] > 0
    assert loadv["kv_blocks_used"] > 0 and loadv["kv_blocks_total"] >= loadv["kv_blocks_used"]
    assert set(loadv["queues"]) == {"system", "foreground", "background"}
    me = next(u for u in frame["uids"] if u["uid"] == os.geteuid())
    assert APP in me["apps"] and me["in_flight"] >= 2 and me["tokens_per_second"] > 0
    assert 0 < me["share"] <= 1
    assert abs(sum(u["share"] for u in frame["uids"]) - 1) < 1e-3
    assert frame["devices"][0]["name"] == "cpu" and frame["devices"][0]["components"]


def test_top_refreshes_until_interrupted(daemon: DaemonProcess) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "m4ctl", "top", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=daemon.env(), preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 30
        seen = ""
        assert proc.stdout is not None
        while seen.count("UID ") < 3:  # three frames
            assert time.monotonic() < deadline, f"frames: {seen!r}"
            seen += proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert seen.count("queues ") >= 3


def test_status_shows_devices_load_and_callers(daemon: DaemonProcess, load: None) -> None:
    out = m4ctl(daemon, "status")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "devices:" in text and "m4-executor-cpu" in text
    assert "queues: system" in text and "rate:" in text and "callers:" in text
    caller = next(line.split() for line in text.splitlines()
                  if line.split()[:1] == [str(os.geteuid())])
    assert APP in caller[2].split(",")
    as_json = json.loads(m4ctl(daemon, "--json", "status").stdout)
    assert as_json["load"]["runningSequences"] == 2
    assert any(u.get("apps") and APP in u["apps"] for u in as_json["uids"])
    assert as_json["devices"][0]["name"] == "cpu"


@pytest.mark.parametrize("args", [["top", "--once"], ["top", "--json"], ["top"]])
def test_unreachable_daemon_is_one_line(args: list[str], tmp_path) -> None:
    env = dict(os.environ, M4_ADMIN_ADDRESS=f"unix://{tmp_path}/nothing.sock")
    out = subprocess.run([sys.executable, "-m", "m4ctl", *args], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("m4ctl: error: m4d is not reachable at unix://")
    assert "nothing.sock" in lines[0] and "Traceback" not in out.stderr
