"""Start-up selection from the image store, with real daemon restarts: a trial whose self-test
fails, a trial the daemon dies loading N times, a trial marked good by hand; and the
drain-mode swap under load (swap_mode = "drain": memory for one model only)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, start_daemon
from tests.integration.imagetools import (
    assert_store_clean,
    dev_keys,
    m4ctl,
    start_store_daemon,
    variant,
)
from tests.integration.test_image_admin import Load, served_version, timed_m4ctl


@pytest.fixture(scope="module")
def images(text_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("boot-images")
    key = dev_keys(root / "dev")
    selftest = json.loads((text_image / "manifest.json").read_bytes())["self_test"]
    selftest[0] = dict(selftest[0], expected_token_ids=[7, *selftest[0]["expected_token_ids"][1:]])
    return {
        "keys": root / "dev" / "keys",
        "v1": variant(text_image, root / "v1", key, version="1.0.0"),
        "v2": variant(text_image, root / "v2", key, version="1.1.0"),
        "bad": variant(text_image, root / "bad", key, version="1.2.0", self_test=selftest),
    }


def start(images: dict[str, Any], root: Path, *args: str, wait: bool = True) -> DaemonProcess:
    if wait:
        d: DaemonProcess = start_store_daemon(images["v1"], root / "run", root / "state",
                                              images["keys"], *args)
        return d
    return start_daemon(images["v1"], root / "run", "--state-dir", str(root / "state"),
                        "--keys-dir", str(images["keys"]), *args, wait=False)


def ok(d: DaemonProcess, *args: str) -> str:
    done = m4ctl(*args, env=d.env())
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def test_failing_trial_falls_back_at_boot_and_a_trial_can_be_marked_good_by_hand(
        images: dict[str, Any], tmp_path: Path) -> None:
    d = start(images, tmp_path)
    try:
        ok(d, "image", "install", str(images["bad"]))
        ok(d, "image", "install", str(images["v2"]))
        ok(d, "image", "activate", "1.2.0", "--next-boot")
    finally:
        assert d.stop() == 0
    d = start(images, tmp_path)  # boots the trial, whose self-test fails: back to v1
    try:
        assert served_version(d) == "1.0.0"
        logs = d.logs()
        assert "failed its self-test" in logs and "falling back to the last good image" in logs
        listing = ok(d, "image", "list", "--history", "3")
        assert "mark-bad" in listing and "failed its self-test" in listing, listing
        state = assert_store_clean(tmp_path / "state")
        assert state["trial"] is None and state["images"][state["active"]]["version"] == "1.0.0"
        ok(d, "image", "activate", "1.1.0", "--next-boot")
    finally:
        assert d.stop() == 0
    d = start(images, tmp_path, "--self-test", "off")  # serves the trial, does not judge it
    try:
        assert served_version(d) == "1.1.0"
        assert "stays on trial until `m4ctl image mark-good`" in d.logs()
        assert "trial: m4-default 1.1.0" in ok(d, "image", "list")
        assert "marked m4-default 1.1.0" in ok(d, "image", "mark-good")
        state = assert_store_clean(tmp_path / "state")
        assert state["trial"] is None and state["images"][state["active"]]["version"] == "1.1.0"
    finally:
        assert d.stop() == 0


def wait_for_log(d: DaemonProcess, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while needle not in d.logs():
        assert d.proc.poll() is None, d.logs()
        assert time.monotonic() < deadline, d.logs()
        time.sleep(0.05)


def test_trial_that_kills_the_daemon_while_loading_is_abandoned(images: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """The daemon dies loading the trial max_boot_attempts (3) times; the next start falls
    back to the last good image by itself and says so."""
    d = start(images, tmp_path)
    try:
        ok(d, "image", "install", str(images["v2"]))
        ok(d, "image", "activate", "1.1.0", "--next-boot")
    finally:
        d.stop()
    for attempt in (1, 2, 3):
        d = start(images, tmp_path, wait=False)
        try:
            wait_for_log(d, '"version": "1.1.0"')  # "loading image" of the trial: kill it now
        finally:
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
        for sock in (d.app_socket, d.admin_socket):  # stale: start_daemon waits for new ones
            sock.unlink()
        state = json.loads((tmp_path / "state" / "state.json").read_bytes())
        assert state["attempts"] == attempt  # counted before loading
    d = start(images, tmp_path)
    try:
        assert served_version(d) == "1.0.0"
        assert "fallback: the trial image was not marked good after 3 boot attempts" in d.logs()
        listing = ok(d, "image", "list", "--history", "2")
        assert "fallback" in listing and "not marked good after 3 attempts" in listing, listing
        assert_store_clean(tmp_path / "state")
    finally:
        assert d.stop() == 0


def test_drain_mode_swap_under_load(images: dict[str, Any], tmp_path: Path) -> None:
    """swap_mode = drain: calls get UNAVAILABLE (with a retry hint) only while the old image
    drains and the new one loads; none fails otherwise; health answers throughout."""
    d = start(images, tmp_path, "--swap-mode", "drain")
    try:
        ok(d, "image", "install", str(images["v2"]))
        with Load(d) as load:
            time.sleep(3)
            act = timed_m4ctl(d, "image", "activate", "1.1.0")
            time.sleep(3)
            back = timed_m4ctl(d, "image", "rollback")
            time.sleep(3)
        assert load.health_failed == [] and load.health_ok > 20
        codes = {code for _, code, _ in load.failed}
        assert codes <= {"UNAVAILABLE"}, load.failed[:5]
        assert all("retry after" in msg for _, _, msg in load.failed)
        for t, _, _ in load.failed:  # refused only inside an activation or a rollback
            assert act[0] <= t <= act[1] or back[0] <= t <= back[1], (t, act, back)
        assert load.versions_started(act[1], back[0]) == {frozenset({"1.1.0"})}
        assert load.versions_started(back[1], float("inf")) == {frozenset({"1.0.0"})}
        windows = [float(line.split('"seconds": ')[1].split("}")[0])
                   for line in d.logs().splitlines() if "swap window closed" in line]
        assert len(windows) == 2
        refused = [t for t, _, _ in load.failed]
        print(f"\ndrain-mode swap: windows {windows} s (daemon), {len(refused)} calls refused "
              f"UNAVAILABLE, {len(load.done)} served; activate {act[1] - act[0]:.1f} s, "
              f"rollback {back[1] - back[0]:.1f} s; RSS {min(load.rss) >> 20}-"
              f"{max(load.rss) >> 20} MiB")
    finally:
        assert d.stop() == 0


def test_an_overlap_swap_past_the_memory_budget_drains_instead(images: dict[str, Any],
                                                              tmp_path: Path) -> None:
    """swap_memory_mb: the new image would not fit beside the old one, so the swap unloads the
    old one first; what the new image adds is estimated from the weight files it does not
    share (v2 has v1's files, so only the self-test's margin)."""
    d = start_store_daemon(images["v1"], tmp_path / "run", tmp_path / "state", images["keys"],
                           env={"M4D_SWAP_MEMORY_MB": "1"})
    try:
        ok(d, "image", "install", str(images["v2"]))
        ok(d, "image", "activate", "1.1.0")
        assert served_version(d) == "1.1.0"
        lines = [json.loads(x) for x in d.logs().splitlines() if x.startswith("{")]
        budget = [x for x in lines if x["msg"] == "swap memory"]
        assert len(budget) == 1 and budget[0]["mode"] == "drain", budget
        assert budget[0]["new_image_adds_mib"] == 64 and budget[0]["budget_mib"] == 1, budget
        assert any(x["msg"] == "drain-mode swap window closed" for x in lines)
    finally:
        d.stop()
