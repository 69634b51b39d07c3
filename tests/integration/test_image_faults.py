"""Fault injection in the style of OSTree's upgrade tests: kill -9 at random points of real
installs, activations and rollbacks, with m4d and m4ctl as real processes.

A walk through the image life cycle (install vN, activate vN, roll back, install vN+1, ...)
runs on a real daemon serving the real model; at each point one process dies by SIGKILL:

- the daemon (`DAEMON_KILLS` points): it runs with the test hooks (tests/hooks) and
  M4D_TEST_STORE_CRASH_AFTER_READY=K, so the store's crash point (m4image.durable) kills it
  at its K-th durable step (write, fsync, rename, mkdir, delete) of the operation, K drawn at random from the operation's
  measured step count. Then the daemon restarts (recovery, boot selection, a trial's
  attempt and self-test) and must become ready.
- the client (`CLI_KILLS` points): m4ctl is killed at a random time while its call runs; the
  daemon keeps running (an install is abandoned, a swap runs to its end).

After every point: state.json parses, the active image is exactly the old or the new one
and is what the daemon serves, its files verify against the keyring, no staging directory
or temporary file is left, and images/ holds exactly the images state.json lists. Restarting
the daemon costs about 8 s (loading the model), so the daemon is killed at 15 points and the
client at 36; `tests/unit/test_store.py` kills the store itself at every durable step of a
small image. Set M4_FAULT_SEED to replay a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from m4client import AdminClient
from m4image.keys import Keyring
from m4image.verify import verify_image

from tests.conftest import DaemonProcess
from tests.hooks.m4d_test_hooks import hooks_env
from tests.integration.imagetools import (
    ROOT,
    assert_store_clean,
    dev_keys,
    start_store_daemon,
    variant,
)

DAEMON_KILLS = 15
CLI_KILLS = 36


class World:
    """The image walk: which operation comes next, given the store's state."""

    def __init__(self, src: Path, root: Path) -> None:
        self.src, self.root = src, root
        self.key = dev_keys(root / "dev")
        self.keys = root / "dev" / "keys"
        self.state_dir = root / "state"
        self.run = root / "run"
        self.images = {1: variant(src, root / "v1", self.key, version="1.0.0")}
        self.n = 2  # the walk's current image: installed, activated, then left by rollback

    def image(self, n: int) -> Path:
        if n not in self.images:
            self.images[n] = variant(self.src, self.root / f"v{n}", self.key,
                                     version=f"1.{n - 1}.0")
        return self.images[n]

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_bytes())
        return data

    def version_of(self, state: dict[str, Any], digest: str | None) -> str | None:
        return state["images"][digest]["version"] if digest else None

    def next_op(self, advance: bool = True) -> tuple[str, list[str]]:
        """(operation, m4ctl arguments) for the current state: install vN, activate vN, roll
        back (then vN is the previous image and the walk goes on with vN+1). Without
        `advance`, a prediction for after the next boot, which marks a trial good."""
        state = self.state()
        if not advance and state["trial"]:
            state["active"], state["previous"] = state["trial"], state["active"]
        digests = {r["version"]: d for d, r in state["images"].items()}
        n = self.n
        while (d := digests.get(f"1.{n - 1}.0")) and state["previous"] == d != state["active"]:
            n += 1
        if advance:
            self.n = n
        version = f"1.{n - 1}.0"
        if version not in digests:
            return "install", ["image", "install", str(self.image(n))]
        if state["active"] != digests[version]:
            return "activate", ["image", "activate", version]
        return "rollback", ["image", "rollback"]

    def start(self, crash_after: int | None = None) -> DaemonProcess:
        env = hooks_env(M4D_TEST_STORE_CRASH_AFTER_READY=str(crash_after)) if crash_after else {}
        for sock in ("app.sock", "admin.sock"):  # a killed daemon leaves them behind
            (self.run / sock).unlink(missing_ok=True)
        d: DaemonProcess = start_store_daemon(self.images[1], self.run, self.state_dir,
                                              self.keys, env=env)
        return d


def m4ctl_popen(d: DaemonProcess, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "m4ctl", *args], cwd=ROOT, env=d.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check(world: World, d: DaemonProcess, allowed: set[str | None], what: str) -> str:
    """The invariants after a fault; returns the active digest."""
    state = assert_store_clean(world.state_dir)
    assert state["active"] in allowed, (what, state["active"], allowed)
    with AdminClient(d.admin_address, timeout=30) as admin:
        status = admin.status()
    assert status.state == "READY" and status.image_digest == state["active"], (what, status)
    keyring = Keyring(world.keys)
    for digest in state["images"]:
        image = verify_image(world.state_dir / "images" / digest, keyring=keyring,
                             expected_compatible="m4-cpu-v1")
        assert image.digest == digest
    return str(state["active"])


def expected_after(world: World, op: str) -> set[str | None]:
    """The active images allowed once `op` (about to run) died somewhere: old or new."""
    state = world.state()
    allowed: set[str | None] = {state["active"]}
    if op == "rollback":
        allowed.add(state["previous"])
    if op == "activate":
        version = f"1.{world.n - 1}.0"
        allowed |= {d for d, r in state["images"].items() if r["version"] == version}
    return allowed


def calibrate(world: World) -> tuple[dict[str, int], dict[str, float]]:
    """Durable store steps and wall time of one install, activate and rollback."""
    d = world.start(crash_after=10**9)  # armed, never fires: the daemon logs its step count
    seconds: dict[str, float] = {}
    try:
        for _ in range(3):
            op, args = world.next_op()
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "m4ctl", *args], cwd=ROOT, env=d.env(),
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            seconds[op] = time.monotonic() - started
    finally:
        d.stop()
    counts = [json.loads(line) for line in d.logs().splitlines()
              if "durable store steps since ready" in line]
    total = {c["operation"]: c["steps"] for c in counts}
    steps = {"install": total["install"], "activate": total["activate"] - total["install"],
             "rollback": total["rollback"] - total["activate"]}
    return steps, seconds


@pytest.mark.slow
def test_kill_9_during_install_activate_rollback(text_image: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("M4_FAULT_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    print(f"\nM4_FAULT_SEED={seed}")
    world = World(text_image, tmp_path)
    steps, seconds = calibrate(world)
    print(f"durable steps per operation {steps}, seconds {dict((k, round(v, 1)) for k, v in seconds.items())}")
    points: list[tuple[str, str, int | float, str]] = []

    # ---- the daemon dies at a random durable step of an operation -----------------------
    # The restart after each kill is armed with the next kill point: it must recover and
    # become ready first (the hook counts only steps after ready), then it is checked.
    allowed: set[str | None] = {world.state()["active"]}
    killed: tuple[str, int] | None = None  # the operation and step of the last kill
    cycle = ["install", "activate", "rollback"]
    for i in range(DAEMON_KILLS + 1):
        k = None
        if i < DAEMON_KILLS:  # aim at install, activate, rollback in turn: skip the steps
            at = cycle.index(world.next_op(advance=False)[0])  # of the operations before it
            skip = [cycle[j % 3] for j in range(at, at + (cycle.index(cycle[i % 3]) - at) % 3)]
            k = sum(steps[op] for op in skip) + rng.randint(1, steps[cycle[i % 3]])
        d = world.start(crash_after=k)
        try:
            active = check(world, d, allowed, f"after {killed}")
        except BaseException:
            d.stop()
            raise
        if killed is not None:
            points.append(("daemon", killed[0], killed[1],
                           world.version_of(world.state(), active) or "?"))
        if k is None:
            break
        while d.proc.poll() is None:  # operations until the store kills the daemon
            op, args = world.next_op()
            allowed = expected_after(world, op)
            m4ctl_popen(d, args).communicate(timeout=300)
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.proc.wait(timeout=3)
        assert d.proc.returncode == -9, d.logs()[-3000:]
        killed = (op, k)

    # ---- the client dies at a random moment of its call ----------------------------------
    try:
        for i in range(CLI_KILLS):
            op, args = world.next_op()
            while op != cycle[i % 3]:  # aim at install, activate, rollback in turn
                done = subprocess.run([sys.executable, "-m", "m4ctl", *args], cwd=ROOT,
                                      env=d.env(), capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, done.stderr
                op, args = world.next_op()
            allowed = expected_after(world, op)
            at = rng.uniform(0.3, seconds[op] + 0.3)
            client = m4ctl_popen(d, args)
            try:
                client.wait(timeout=at)
            except subprocess.TimeoutExpired:
                client.kill()
            client.communicate()
            settle(world, d)
            active = check(world, d, allowed, f"client kill {i}: {op} at {at:.2f} s")
            points.append(("client", op, round(at, 2), world.version_of(world.state(), active)
                           or "?"))
            prune(world, d)
    finally:
        assert d.stop() == 0
    assert len(points) >= 50
    ops = {op for _, op, _, _ in points}
    assert ops == {"install", "activate", "rollback"}, points
    for p in points:
        print("kill -9", *p)


def settle(world: World, d: DaemonProcess, timeout: float = 120) -> None:
    """Waits until the daemon has finished (or abandoned) the killed client's operation."""
    deadline = time.monotonic() + timeout
    with AdminClient(d.admin_address, timeout=30) as admin:
        while True:
            busy = admin.status().image_operation
            staging = os.listdir(world.state_dir / "staging")
            if not busy and not staging:
                return
            assert time.monotonic() < deadline, (busy, staging, d.logs()[-3000:])
            time.sleep(0.1)


def prune(world: World, d: DaemonProcess) -> None:
    """Removes images that are merely installed and not the walk's next one (disk space)."""
    keep = f"1.{world.n - 1}.0"
    with AdminClient(d.admin_address, timeout=60) as admin:
        for image in admin.list_images().images:
            if image.state == "installed" and image.version != keep:
                admin.remove_image(image.digest)
