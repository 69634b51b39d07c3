"""The daemon's memory by part, through a real daemon on the default image: KV memory grows
with the tokens sequences hold and goes back when they end (Admin Status and the process's
own RSS agree), weights are mapped or converted as Status says, and the start-up phases are
in the `ready` log line."""

from __future__ import annotations

import ast
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from m4client import AdminClient, Client, InvalidArgumentError, MemoryUsage

from tests.conftest import DaemonProcess, start_daemon
from tests.integration.imagetools import m4ctl

SLOTS = 4
MiB = 1 << 20


@pytest.fixture(scope="module")
def small(default_image: Path, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[DaemonProcess]:
    d = start_daemon(default_image, tmp_path_factory.mktemp("memory"), "--kv-slots", str(SLOTS),
                     "--prefix-cache-tokens", "0")
    yield d
    d.stop()


def memory(d: DaemonProcess) -> MemoryUsage:
    with AdminClient(d.admin_address, timeout=30) as admin:
        m = admin.status().memory
    assert m is not None
    return m


def per_token(m: MemoryUsage) -> int:
    """KV bytes per token: every slot holds 2048 tokens."""
    return m.kv_reserved_bytes // (SLOTS * 2048)


def proc_rss(d: DaemonProcess) -> int:
    """The daemon's private resident memory (the KV cache is; mapped weights are not)."""
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def settled(d: DaemonProcess, timeout: float = 30) -> MemoryUsage:
    """Status once no KV is held and RSS stopped moving (the daemon settles after ready)."""
    deadline, last = time.monotonic() + timeout, -1
    while True:
        m = memory(d)
        if m.kv_resident_bytes == 0 and abs(m.rss_bytes - last) < 2 * MiB:
            return m
        assert time.monotonic() < deadline, f"memory never settled: {m}"
        last = m.rss_bytes
        time.sleep(0.5)


def test_parts_at_idle(small: DaemonProcess) -> None:
    m = settled(small)
    # the token table stays in its stored Q8_0 blocks, mapped from the image (~30 MB)
    assert m.weights_mapped_bytes > 25 * MiB
    assert m.weights_converted_bytes > 50 * MiB  # the layers packed for the kernels, at least
    # layers x (k, v) x kv heads x head dim, float32 or bfloat16 (the CPU's choice)
    assert per_token(m) in (30 * 2 * 3 * 64 * 4, 30 * 2 * 3 * 64 * 2)
    assert m.kv_budget_bytes == m.kv_reserved_bytes == SLOTS * 2048 * per_token(m)
    assert m.kv_resident_bytes == 0
    assert m.rss_bytes == (m.weights_mapped_resident_bytes + m.weights_converted_bytes
                           + m.kv_resident_bytes + m.runtime_bytes)
    assert m.rss_bytes < 1200 * MiB, "the KV cache must not be committed at idle"


def test_kv_memory_follows_the_sequences(small: DaemonProcess) -> None:
    idle = settled(small)
    idle_rss = proc_rss(small)
    held: list[MemoryUsage] = []
    peak_rss = [idle_rss]
    reading = threading.Event()
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            with Client(small.address, timeout=300) as m4:
                gen = m4.generate(f"Story {i}: once upon a time", max_tokens=400, ignore_eos=True)
                with gen:
                    for n, _ in enumerate(gen):
                        if n == 300:
                            reading.wait(120)  # hold the row while the test looks
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(held) < 3 and time.monotonic() < deadline:
        m = memory(small)
        peak_rss.append(proc_rss(small))
        if m.kv_resident_bytes > SLOTS * 300 * per_token(m):  # all past 300 tokens
            held.append(m)
        time.sleep(0.2)
    reading.set()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert held, "the streams never held 300 tokens each"
    kv = max(m.kv_resident_bytes for m in held)
    assert kv <= held[-1].kv_budget_bytes
    # the process really holds it: its RSS grew by (about) the KV in use
    assert max(peak_rss) - idle_rss > 0.8 * kv, (max(peak_rss) - idle_rss, kv)
    deadline = time.monotonic() + 30
    while (m := memory(small)).kv_resident_bytes and time.monotonic() < deadline:
        time.sleep(0.2)
    assert m.kv_resident_bytes == 0, "the rows' memory did not go back when they ended"
    time.sleep(1)
    after = proc_rss(small)
    assert after - idle_rss < 0.25 * (max(peak_rss) - idle_rss), (idle_rss, max(peak_rss), after)
    assert idle.kv_resident_bytes == 0


def test_ready_line_has_the_start_up_phases(small: DaemonProcess) -> None:
    line = next(x for x in small.logs().splitlines() if '"msg": "ready"' in x or ": ready " in x)
    since = re.search(r'"since_exec": ([\d.]+)', line) or re.search(r"since_exec=([\d.]+)", line)
    assert since is not None and 0 < float(since.group(1)) < 120, line
    phases = re.search(r'"phases": (\{.*?\})', line) or re.search(r"phases=(\{.*?\})", line)
    assert phases is not None, line
    parts = ast.literal_eval(phases.group(1))
    for part in ("verify", "backbone.weights", "backbone.caches", "backbone", "text_encoder",
                 "self_test"):
        assert part in parts and parts[part] >= 0, (part, parts)


def test_m4ctl_status_shows_memory_by_part(small: DaemonProcess) -> None:
    done = m4ctl("--admin-address", small.admin_address, "status", env=small.env())
    assert done.returncode == 0, done.stderr
    assert re.search(r"weights: .* mapped from the image \(.* resident\), .* converted",
                     done.stdout), done.stdout
    assert re.search(r"kv cache: .* in use, budget .*reserved", done.stdout), done.stdout


@pytest.fixture(scope="module")
def tight(default_image: Path, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[DaemonProcess]:
    """4 slots but KV memory for 1024 tokens: less than 4 streams of ~330 tokens want."""
    d = start_daemon(default_image, tmp_path_factory.mktemp("tight"), "--kv-slots", "4",
                     "--prefix-cache-tokens", "0", env={"M4D_KV_POOL_TOKENS": "1024"})
    yield d
    d.stop()


def greedy(d: DaemonProcess, prompt: str, n: int) -> list[int]:
    with Client(d.address, timeout=300) as m4:
        ids: list[int] = []
        for chunk in m4.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True):
            ids += chunk.token_ids
        return ids


def test_a_kv_budget_below_the_demand_queues_and_preempts_to_the_same_tokens(
        tight: DaemonProcess) -> None:
    prompts = [f"Write the story of robot number {i}:" for i in range(4)]
    alone = [greedy(tight, p, 320) for p in prompts[:2]]
    results: dict[int, list[int]] = {}
    peak = [0]

    def run(i: int) -> None:
        results[i] = greedy(tight, prompts[i], 320)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        m = memory(tight)
        peak[0] = max(peak[0], m.kv_resident_bytes)
        assert m.kv_budget_bytes == 1024 * per_token_of(m)
        time.sleep(0.1)
    assert sorted(results) == [0, 1, 2, 3] and all(len(r) == 320 for r in results.values())
    assert results[0] == alone[0] and results[1] == alone[1]  # waiting or preempted: same tokens
    assert 0 < peak[0] <= memory(tight).kv_budget_bytes + 4 * 30 * 2 * 3 * 4096  # + a page a head


def test_a_request_larger_than_the_kv_budget_is_refused_clearly(tight: DaemonProcess) -> None:
    with Client(tight.address, timeout=60) as m4, pytest.raises(InvalidArgumentError,
                                                                match="KV cache for"):
        m4.complete("Hello", max_tokens=1500)
    assert greedy(tight, "Still serving?", 4)  # and the daemon serves on


def per_token_of(m: MemoryUsage) -> int:
    return m.kv_reserved_bytes // (4 * 2048)
