"""Issue 15, through the real daemon: one app cannot starve another. App A (this test, as
root) floods the foreground class with long streams, more than there are KV slots; app B
(a real client as nobody, uid 65534) asks for 8 tokens in the same class and gets them
promptly, because the fair share takes a slot back from A (preemption, resumed later by
recompute). Before the fix B waited for A's streams to finish (90 s and more measured).

uid_max_running is lifted to every slot, so A can hold all of them and only the fair-share
preemption can give B one (the default cap, a quarter of the slots less, would leave B a
free slot anyway), and so is uid_max_tokens_in_flight (A's flood asks for 18,000 tokens).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4client import AdminClient, Client

from tests.conftest import DaemonProcess, start_daemon
from tests.integration.test_identity_uid import NOBODY, as_nobody, usage

SLOTS, FLOOD = 8, 12


@pytest.fixture(scope="module")
def daemon(text_image: Path) -> Iterator[DaemonProcess]:
    assert os.geteuid() == 0, "this test runs as root: it starts a client as uid 65534"
    run = Path(tempfile.mkdtemp(prefix="m4-fair-", dir="/tmp"))
    run.chmod(0o755)  # nobody must reach app.sock (0666) inside
    d = start_daemon(text_image, run, "--kv-slots", str(SLOTS),
                     env={"M4D_UID_MAX_RUNNING": str(SLOTS), "M4D_UID_MAX_TOKENS_IN_FLIGHT": "0"})
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(run, ignore_errors=True)


def test_a_short_request_completes_promptly_while_another_app_floods(
        daemon: DaemonProcess) -> None:
    channel = grpc.insecure_channel(daemon.address)
    stub = pb_grpc.InferenceStub(channel)
    calls: list[grpc.Future] = []
    tokens = [0] * FLOOD
    errors: list[str] = []
    started = threading.Barrier(FLOOD + 1)

    def flood(i: int) -> None:  # A reads its streams: backpressure does not pause them
        call = stub.Generate(pb.GenerateRequest(
            task="complete", prompt=f"Write a very long story about ship number {i}.",
            priority=pb.PRIORITY_FOREGROUND,
            sampling=pb.SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)),
            timeout=600)
        calls.append(call)
        started.wait()
        try:
            for msg in call:
                tokens[i] += len(msg.token_ids)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"stream {i}: {exc.code().name} {exc.details()}")

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(FLOOD)]
    for t in threads:
        t.start()
    started.wait()
    try:
        deadline = time.monotonic() + 120
        while min(sorted(tokens)[-SLOTS:]) < 40:  # A holds every slot, and has run a while
            assert time.monotonic() < deadline and not errors, (tokens, errors)
            time.sleep(0.2)
        with AdminClient(daemon.admin_address, timeout=30) as admin:
            before = admin.status()
        assert usage(before, 0).running == SLOTS and usage(before, 0).queued >= FLOOD - SLOTS
        b = as_nobody(daemon, "app-b", "foreground", 1)
        with AdminClient(daemon.admin_address, timeout=30) as admin:
            after = admin.status()
    finally:
        for call in calls:
            call.cancel()
        for t in threads:
            t.join(timeout=60)
        channel.close()
    assert not errors, errors
    assert b["completion_tokens"] == 8
    # 16 tokens of minimum run for the victim, then 8 steps of B, at the flood's step time
    # (a few hundred ms at most on 2 cores): seconds, where waiting for A took minutes
    assert b["seconds"] < 20, b
    assert usage(after, 0).preempted >= 1, "B's slot came from A by preemption"
    assert usage(after, NOBODY).requests_ok == 1
    assert all(n < 1500 for n in tokens), "A's streams were still running when B finished"


def test_a_stream_the_app_stops_reading_pauses_and_resumes_to_the_same_tokens(
        daemon: DaemonProcess) -> None:
    """Backpressure through the real transport: the Python client's small stream window
    (m4client STREAM_WINDOW_BYTES) lets the daemon see that the app stopped reading, so the
    sequence pauses after stream_pause_tokens (256) + a window's worth of tokens instead of
    decoding to the end into gRPC's buffers; reading again resumes it, and the tokens are
    the ones it gives read straight through."""
    prompt, n = "Write a very long story about a lighthouse keeper.", 900
    options = dict(task="complete", max_tokens=n, temperature=0.0, ignore_eos=True)
    with Client(daemon.address, timeout=300) as client:
        straight = [t for chunk in client.generate(prompt, **options) for t in chunk.token_ids]
        assert len(straight) == n
        with AdminClient(daemon.admin_address, timeout=30) as admin:
            before = usage(admin.status(), 0).tokens_out
            stream = iter(client.generate(prompt, **options))
            got = list(next(stream).token_ids)  # the call runs; then the app reads nothing
            deadline = time.monotonic() + 60
            while True:
                status = admin.status()
                assert status.load is not None
                if status.load.paused_sequences == 1:
                    break
                assert time.monotonic() < deadline, "the unread stream never paused"
                time.sleep(0.2)
            time.sleep(2.0)  # paused: it decodes no more
            held = usage(admin.status(), 0).tokens_out - before
            assert held < 256 + 400, f"{held} tokens decoded for a reader that took one"
            assert held == usage(admin.status(), 0).tokens_out - before, "still decoding"
        for chunk in stream:
            got += chunk.token_ids
    assert got == straight
