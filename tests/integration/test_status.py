"""The Admin Status RPC's load, per-uid usage and devices, through a real daemon under load.

One KV row (--kv-slots 1) so a second generation must queue; a per-uid limit of 3 requests
so a fourth is refused; a stream cancelled mid-decode counts as failed. Everything is read
back through m4client's AdminClient, the same path `m4ctl status` and `m4ctl top` use.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from m4client import AdminClient, Client, DaemonStatus, ResourceExhaustedError, UidUsage

from tests.conftest import DaemonProcess, start_daemon

UID = os.geteuid()


@pytest.fixture(scope="module")
def loaded(default_image: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[DaemonProcess]:
    d = start_daemon(default_image, tmp_path_factory.mktemp("status"), "--kv-slots", "1",
                     env={"M4D_UID_MAX_CONCURRENT": "3",
                          "M4D_PLACEMENT": "backbone=cpu,text_encoder=cpu,default=cpu"})
    yield d
    d.stop()


def status(d: DaemonProcess) -> DaemonStatus:
    with AdminClient(d.admin_address, timeout=30) as admin:
        return admin.status()


def mine(s: DaemonStatus) -> UidUsage:
    return next(u for u in s.uids if u.uid == UID)


def wait_for(d: DaemonProcess, what: Callable[[DaemonStatus], bool], timeout: float = 60,
             ) -> DaemonStatus:
    deadline = time.monotonic() + timeout
    while True:
        s = status(d)
        if what(s):
            return s
        assert time.monotonic() < deadline, f"status never matched; last: {s}"
        time.sleep(0.05)


def test_devices_and_placement(loaded: DaemonProcess) -> None:
    s = status(loaded)
    assert s.devices and s.devices[0].name == "cpu"
    cpu = s.devices[0]
    assert cpu.cores == os.cpu_count() and cpu.memory_bytes > 0
    assert sorted(cpu.components) == ["backbone", "ocr", "speech", "text_encoder"]
    assert cpu.executor == "m4-executor-cpu"
    assert {c.name: c.device for c in s.components} == {
        "backbone": "cpu", "text_encoder": "cpu", "speech": "cpu", "ocr": "cpu"}
    assert s.load is not None and s.load.kv_blocks_total == 2048 // 16  # 1 row x 2048 tokens
    assert set(s.load.queues) == {"system", "foreground", "background"}


def test_load_and_usage_under_generation(loaded: DaemonProcess) -> None:
    d = loaded
    before = mine(status(d))
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def generate(max_tokens: int) -> None:
        try:
            with Client(d.address, app_name="status-test", timeout=120) as c:
                r = c.complete("Write a long story about a lighthouse keeper.",
                               max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                               priority="background")
            results.append((r.usage.prompt_tokens, r.usage.completion_tokens))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=generate, args=(n,)) for n in (48, 24)]
    for t in threads:
        t.start()
    # one row: one runs, the other waits in the background queue
    busy = wait_for(d, lambda s: s.load is not None and s.load.running_sequences == 1
                    and s.load.queues["background"] >= 1 and s.load.kv_blocks_used > 0)
    me = mine(busy)
    assert me.in_flight == 2 and me.queued >= 1
    assert me.priority_class == "background" and "status-test" in me.apps
    assert busy.load is not None and busy.load.kv_blocks_used <= busy.load.kv_blocks_total

    # a third in flight is allowed (limit 3), a fourth is refused at once and counted
    with Client(d.address, app_name="status-test", timeout=120) as c:
        third = c.generate("Count to one hundred:", max_tokens=200, ignore_eos=True)
        next(iter(third))  # running or queued: the stream has started answering
        wait_for(d, lambda s: mine(s).in_flight == 3)
        with pytest.raises(ResourceExhaustedError):
            c.complete("one too many", max_tokens=4)
        third.cancel()  # counted as failed
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    after = wait_for(d, lambda s: mine(s).in_flight == 0)
    me = mine(after)
    assert me.requests_ok == before.requests_ok + 2
    assert me.requests_failed == before.requests_failed + 1
    assert me.requests_rejected == before.requests_rejected + 1
    assert me.tokens_out >= before.tokens_out + sum(c for _, c in results)
    assert me.tokens_in >= before.tokens_in + sum(p for p, _ in results)
    assert me.queued == 0
    load = after.load
    assert load is not None
    assert load.decode_tokens_per_second > 0 and me.tokens_per_second > 0
    assert load.ttft_samples >= 3  # self-test generations + these
    assert 0 < load.ttft_p50_ms <= load.ttft_p99_ms
    assert sum(load.queues.values()) == 0 and load.running_sequences == 0
    assert load.kv_blocks_used == 0


def test_a_device_the_machine_lacks_stops_the_daemon(default_image: Path,
                                                     tmp_path: Path) -> None:
    """placement naming cuda:1 on this machine: a configuration error (exit 2) before
    anything loads, naming the key and the devices it found."""
    from m4d.executor.devices import discover

    assert "cuda:1" not in discover().names()
    d = start_daemon(default_image, tmp_path, wait=False,
                     env={"M4D_PLACEMENT": "backbone=cuda:1,default=cpu"})
    try:
        assert d.proc.wait(timeout=120) == 2
    finally:
        d.stop()
    log = d.logs()
    assert "placement.backbone = 'cuda:1'" in log
    assert "devices found: " + ", ".join(discover().names()) in log
