"""Add-ons through the admin socket, end to end: a real m4d booting from its store (a signed copy
of the default image's text part), add-ons packed by the real `m4ctl adapter pack` from a
LoRA made on the real backbone (random B, no training) and from a task head, installed,
called, listed and removed with the real m4ctl while apps are served.

One daemon serves the module; each test leaves it with no add-on installed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from m4client import AdminClient, Client, M4Error
from m4image.addon_io import iter_addon_tar
from m4image.keys import Keyring
from m4image.sign import generate_keypair

from tests.conftest import DaemonProcess
from tests.hooks.m4d_test_hooks import hooks_env
from tests.integration.imagetools import (
    dev_keys,
    flip_byte,
    m4ctl,
    random_lora,
    start_store_daemon,
    variant,
)

PROMPT = "Two days in Rome"


def _lora_folder(image: Path, out: Path, seed: int) -> Path:
    return random_lora(image, out, "backbone", ["q_proj", "v_proj", "o_proj"], rank=8, seed=seed)


def _head_folder(out: Path) -> Path:
    from m4d.adapters.heads import Head, write_head

    gen = torch.Generator().manual_seed(3)
    write_head(out, Head(["lights_off", "lights_on", "weather"], torch.randn(3, 384, generator=gen),
                         torch.zeros(3)))
    return out


def _pack(kit: dict[str, Any], out: Path, *args: str, key: Path | None = None,
          base: Path | None = None) -> Path:
    done = m4ctl("adapter", "pack", "--base-image", str(base or kit["v1"]),
                 "--key", str(key or kit["key"]), "--out", str(out), *args)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def kit(text_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The signed base image, vendor keys (one trusted, one unknown, one revoked), and the
    add-ons the tests install: good ones and every kind that must be refused."""
    root = tmp_path_factory.mktemp("addons")
    key = dev_keys(root / "dev")
    keys = root / "dev" / "keys"
    stranger = generate_keypair(root / "stranger")
    leaked = generate_keypair(root / "leaked")
    Keyring(keys).add(leaked.public_key)
    v1 = variant(text_image, root / "v1", key, version="1.0.0")
    v2 = variant(text_image, root / "v2", key, version="1.1.0")
    kit: dict[str, Any] = {"root": root, "keys": keys, "key": key, "v1": v1, "v2": v2}
    peft1 = _lora_folder(v1, root / "peft1", seed=1)
    (peft1 / "metrics.json").write_text(json.dumps({"eval": {"adapter": {"exact_match": 0.5}}}))
    peft2 = _lora_folder(v1, root / "peft2", seed=2)
    travel = ("--name", "travel", "--peft", str(peft1), "--task-id", "travel-plan",
              "--prompt-template", "{prompt}", "--description", "Plans trips.")
    kit["travel"] = _pack(kit, root / "travel.tar", *travel)
    kit["travel-dir"] = _pack(kit, root / "travel", *travel)
    kit["travel-2"] = _pack(kit, root / "travel-2.tar", "--name", "travel", "--version", "2.0.0",
                            "--peft", str(peft2), "--task-id", "travel-plan",
                            "--prompt-template", "{prompt}")
    kit["lights"] = _pack(kit, root / "lights.tar", "--name", "lights",
                          "--head", str(_head_folder(root / "head")), "--task-id", "lights")
    refused = {
        "other base": _pack(kit, root / "other.tar", *travel, base=v2),
        "unsigned": root / "unsigned",
        "unknown key": _pack(kit, root / "stranger.tar", *travel, key=stranger.private_key),
        "revoked key": _pack(kit, root / "revoked.tar", *travel, key=leaked.private_key),
        "tampered file": root / "tampered",
        "task id clash": _pack(kit, root / "clash.tar", "--name", "clash", "--peft", str(peft1),
                               "--task-id", "generate"),
    }
    from m4d.adapters.pack import pack_addon  # m4ctl always signs: an unsigned one by hand

    pack_addon(v1, refused["unsigned"], name="travel", version="1.0.0", key=None, peft=peft1)
    shutil.copytree(kit["travel-dir"], refused["tampered file"])
    flip_byte(refused["tampered file"] / "adapters/travel-lora/adapter_model.safetensors", 999)
    Keyring(keys).revoke(leaked.key_id, reason="test: a leaked vendor key")
    kit["refused"] = refused
    return kit


@pytest.fixture(scope="module")
def daemon(kit: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[DaemonProcess]:
    d = start_store_daemon(kit["v1"], tmp_path_factory.mktemp("run"),
                           tmp_path_factory.mktemp("m4d") / "state", kit["keys"])
    yield d
    d.stop()


def _addons_dir(d: DaemonProcess) -> Path:
    return Path(d.extra_env["state_dir"]) / "addons"


def _task_ids(d: DaemonProcess) -> set[str]:
    with Client(d.address, timeout=30) as c:
        return {t.id for t in c.list_tasks()}


def _answer(d: DaemonProcess, task: str, max_tokens: int = 12) -> str:
    with Client(d.address, timeout=60) as c:
        return c.complete(PROMPT, task=task, max_tokens=max_tokens, temperature=0).text


def _wait_store_clean(d: DaemonProcess, timeout: float = 60) -> dict[str, Any]:
    """Once the calls still running through removed add-ons have ended, installed/ holds
    exactly what state.json names and staging/ is empty."""
    root, deadline = _addons_dir(d), time.monotonic() + timeout
    while True:
        state = json.loads((root / "state.json").read_bytes())
        named = sorted(a["digest"] for a in state["addons"].values())
        if sorted(os.listdir(root / "installed")) == named and not os.listdir(root / "staging"):
            return dict(state)
        assert time.monotonic() < deadline, (os.listdir(root / "installed"), named)
        time.sleep(0.2)


# ---- install, call, list, remove ------------------------------------------------------------


def test_pack_install_call_list_remove_with_m4ctl(daemon: DaemonProcess,
                                                  kit: dict[str, Any]) -> None:
    env = daemon.env()
    base = _answer(daemon, "complete")
    done = m4ctl("adapter", "install", str(kit["travel"]), env=env)
    assert done.returncode == 0, done.stderr
    assert "installed add-on travel 1.0.0" in done.stdout
    assert "tasks served now: travel-plan" in done.stdout
    assert "travel-plan" in m4ctl("tasks", "-q", env=env).stdout.split()  # at once
    adapted = _answer(daemon, "travel-plan")
    assert adapted and adapted != base  # the same prompt, through the add-on's adapter

    listing = json.loads(m4ctl("--json", "adapter", "list", env=env).stdout)
    (addon,) = listing["addons"]
    assert addon["applies"] and addon["baseDigest"] == listing["imageDigest"]
    assert addon["version"] == "1.0.0" and addon["tasks"][0]["id"] == "travel-plan"
    comp = addon["components"][0]
    assert (comp["name"], comp["kind"], comp["rank"]) == ("travel-lora", "lora", 8)
    assert comp["metrics"] == {"adapter.exact_match": 0.5}
    assert comp["servedAs"] == f"travel/travel-lora@{addon['digest'][:12]}"
    with Client(daemon.address) as c:
        table = {t.id: t for t in c.list_tasks()}
    assert table["travel-plan"].adapter == comp["servedAs"]
    assert "travel  1.0.0    yes" in m4ctl("adapter", "list", env=env).stdout
    assert m4ctl("-q", "adapter", "list", env=env).stdout == "travel 1.0.0 applies\n"

    done = m4ctl("adapter", "remove", "travel", env=env)
    assert done.returncode == 0 and "removed add-on travel 1.0.0" in done.stdout
    assert "travel-plan" not in _task_ids(daemon)
    with pytest.raises(M4Error) as e:
        _answer(daemon, "travel-plan")
    assert e.value.code == "INVALID_ARGUMENT" and "unknown task 'travel-plan'" in e.value.message
    done = m4ctl("adapter", "remove", "travel", env=env)
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    assert _wait_store_clean(daemon)["addons"] == {}


def test_a_task_head_addon_classifies(daemon: DaemonProcess, kit: dict[str, Any]) -> None:
    with AdminClient(daemon.admin_address) as admin:
        change = admin.install_addon(iter([kit["lights"].read_bytes()]))
    assert change.addon.components[0].kind == "head"
    with Client(daemon.address) as c:
        result = c.classify("switch the lamp on please", task="lights")
    assert {s.label for s in result.labels} == {"lights_off", "lights_on", "weather"}
    assert abs(sum(s.score for s in result.labels) - 1) < 1e-3
    with AdminClient(daemon.admin_address) as admin:
        admin.remove_addon("lights")
    assert "lights" not in _task_ids(daemon)


# ---- refusals -------------------------------------------------------------------------------

REASONS = {
    "other base": "is built for the image",
    "unsigned": "the add-on has no addon.sig",
    "unknown key": "not in the keyring",
    "revoked key": "which is revoked",
    "tampered file": "(corrupted in transfer or tampered)",
    "task id clash": "task id 'generate' is already served by the image",
}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_bad_addons_are_refused_with_the_reason(daemon: DaemonProcess, kit: dict[str, Any],
                                                case: str) -> None:
    path = kit["refused"][case]
    chunks = iter_addon_tar(path) if path.is_dir() else iter([path.read_bytes()])
    with AdminClient(daemon.admin_address) as admin, pytest.raises(M4Error) as e:
        admin.install_addon(chunks)
    assert e.value.code == "FAILED_PRECONDITION", e.value
    assert REASONS[case] in e.value.message, e.value.message
    assert _wait_store_clean(daemon)["addons"] == {}
    assert "travel-plan" not in _task_ids(daemon) and "generate" in _task_ids(daemon)


# ---- under load ---------------------------------------------------------------------------


class Load:
    """Threads calling the daemon until stopped; every failure is kept. A call of an add-on's
    task may be refused with "unknown task" once the add-on is gone: that is no failure."""

    def __init__(self, d: DaemonProcess, calls: list[tuple[str, str, int]]) -> None:
        self.d, self.stop = d, threading.Event()
        self.ok: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.failures: list[str] = []
        self.lock = threading.Condition()
        self.threads = [threading.Thread(target=self.run, args=call, daemon=True)
                        for call in calls]

    def run(self, kind: str, task: str, max_tokens: int) -> None:
        with Client(self.d.address, timeout=120) as c:
            while not self.stop.is_set():
                try:
                    if kind == "classify":
                        c.classify("switch the lamp on", task=task)
                    else:
                        c.complete(PROMPT, task=task, max_tokens=max_tokens, temperature=0)
                    outcome, counts = task, self.ok
                except M4Error as e:
                    unknown = e.code == "INVALID_ARGUMENT" and "unknown task" in e.message
                    if not unknown or task in ("complete", "generate", "understand"):
                        self.failures.append(f"{task}: {e.code}: {e.message}")
                    outcome, counts = task, self.refused
                    self.stop.wait(0.05)  # the add-on is not installed (yet, or any more)
                with self.lock:
                    counts[outcome] = counts.get(outcome, 0) + 1
                    self.lock.notify_all()

    def wait_ok(self, task: str, more: int, timeout: float = 120) -> None:
        """Until `more` further calls of `task` have succeeded."""
        with self.lock:
            goal = self.ok.get(task, 0) + more
            assert self.lock.wait_for(lambda: self.ok.get(task, 0) >= goal, timeout), \
                (task, self.ok, self.failures)


def test_install_and_remove_under_load_fail_no_call(daemon: DaemonProcess,
                                                    kit: dict[str, Any]) -> None:
    """8 threads keep calling the image's tasks and the add-ons' while the add-ons are
    installed, replaced and removed, three times over: no call fails."""
    calls = [("generate", "complete", 8), ("generate", "complete", 8),
             ("generate", "travel-plan", 24), ("generate", "travel-plan", 24),
             ("generate", "travel-plan", 24), ("classify", "lights", 0),
             ("classify", "lights", 0)]
    base_tasks = _task_ids(daemon)
    calls.append(("generate", "understand" if "understand" in base_tasks else "complete", 16))
    load = Load(daemon, calls)
    for t in load.threads:
        t.start()
    installs: list[float] = []
    finishing = 0
    try:
        with AdminClient(daemon.admin_address, timeout=120) as admin:
            for _ in range(3):
                load.wait_ok("complete", 2)
                for name in ("travel", "lights"):
                    started = time.monotonic()
                    admin.install_addon(iter([kit[name].read_bytes()]))
                    installs.append(time.monotonic() - started)
                load.wait_ok("travel-plan", 3)
                load.wait_ok("lights", 3)
                finishing += admin.install_addon(iter([kit["travel-2"].read_bytes()])
                                                 ).calls_finishing
                load.wait_ok("travel-plan", 3)
                finishing += admin.remove_addon("travel").calls_finishing
                finishing += admin.remove_addon("lights").calls_finishing
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(timeout=120)
    assert load.failures == []
    assert finishing > 0  # calls were running through add-ons as they were replaced or removed
    assert load.refused.get("travel-plan", 0) > 0  # and new calls found the task gone
    print(f"\ninstall while serving (8 callers): {[round(s, 3) for s in installs]} s; "
          f"ok {load.ok}; refused after removal {load.refused}; calls finishing on removed "
          f"or replaced adapters {finishing}")
    assert _wait_store_clean(daemon)["addons"] == {}


# ---- hot swap ---------------------------------------------------------------------------------


def test_an_addon_follows_its_image_across_a_hot_swap(daemon: DaemonProcess,
                                                      kit: dict[str, Any]) -> None:
    env = daemon.env()
    assert m4ctl("adapter", "install", str(kit["travel-dir"]), env=env).returncode == 0
    assert m4ctl("image", "install", str(kit["v2"]), env=env).returncode == 0
    done = m4ctl("image", "activate", "1.1.0", env=env)
    assert done.returncode == 0, done.stderr
    assert "travel-plan" not in _task_ids(daemon)  # pinned to 1.0.0: not applied to 1.1.0
    with AdminClient(daemon.admin_address) as admin:
        (addon,) = admin.list_addons().addons
    assert not addon.applies and "built for the image" in addon.reason
    assert "m4-default 1.1.0" in addon.reason
    done = m4ctl("image", "rollback", env=env)
    assert done.returncode == 0, done.stderr
    assert "travel-plan" in _task_ids(daemon) and _answer(daemon, "travel-plan")
    assert m4ctl("adapter", "remove", "travel", env=env).returncode == 0
    _wait_store_clean(daemon)


# ---- kill -9 ------------------------------------------------------------------------------


def _install_steps(kit: dict[str, Any], root: Path) -> int:
    """The durable steps an install of the travel add-on takes (the store's own count)."""
    from m4image.addon_store import AddonStore
    from m4image.durable import crashpoints_passed

    store = AddonStore(root)
    before = crashpoints_passed()
    store.install_stream(iter_addon_tar(kit["travel-dir"]), Keyring(kit["keys"]), lambda m: None)
    return crashpoints_passed() - before


def test_kill_9_during_an_install_leaves_no_half_addon(kit: dict[str, Any],
                                                       tmp_path_factory: pytest.TempPathFactory,
                                                       ) -> None:
    """m4d killed by SIGKILL at the K-th durable step of an add-on install (the test hooks'
    crash point, as the image faults test does), then started again: the add-on store holds
    the add-on whole (verified, its task served) or not at all, and nothing else."""
    total = _install_steps(kit, tmp_path_factory.mktemp("count"))
    seen = set()
    for k in (total // 2, total - 1, total):  # writing files; before and after the state
        run, state = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("m4d") / "state"
        d = start_store_daemon(kit["v1"], run, state, kit["keys"],
                               env=hooks_env(M4D_TEST_STORE_CRASH_AFTER_READY=str(k)))
        try:
            done = m4ctl("adapter", "install", str(kit["travel"]), env=d.env())
            assert d.proc.wait(timeout=60) == -9, (k, done.stdout, done.stderr)
        finally:
            d.stop()
        for sock in ("app.sock", "admin.sock"):
            (run / sock).unlink(missing_ok=True)
        d = start_store_daemon(kit["v1"], run, state, kit["keys"])
        try:
            addons = _wait_store_clean(d, timeout=5)["addons"]
            seen.add(tuple(addons))
            served = "travel-plan" in _task_ids(d)
            assert served == ("travel" in addons), (k, addons)
            if served:
                assert _answer(d, "travel-plan")
                with AdminClient(d.admin_address) as admin:
                    assert admin.list_addons().get("travel").applies  # type: ignore[union-attr]
        finally:
            d.stop()
    assert seen == {(), ("travel",)}  # the state file's rename is the moment it is installed
