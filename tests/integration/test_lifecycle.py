"""Life cycle of a real daemon: graceful shutdown on SIGTERM, stale and live sockets."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc
import pytest
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc

from tests.conftest import start_daemon


def test_sigterm_lets_in_flight_streams_finish_and_refuses_new_calls(
        text_image: Path, tmp_path: Path) -> None:
    d = start_daemon(text_image, tmp_path / "run")
    channel = grpc.insecure_channel(d.address)
    stub = pb_grpc.InferenceStub(channel)
    stream = stub.Generate(pb.GenerateRequest(
        prompt="Tell me a long story.",
        sampling=pb.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)))
    first = next(stream)
    assert first.text or first.token_ids
    d.proc.send_signal(signal.SIGTERM)
    refused = threading.Event()

    def new_call() -> None:
        # the server keeps accepting during the drain and answers UNAVAILABLE
        try:
            stub.Embed(pb.EmbedRequest(texts=["hello"]), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.details():
                refused.set()

    rest = []
    for i, msg in enumerate(stream):
        rest.append(msg)
        if i == 5:
            new_call()
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == 120
    assert refused.is_set()
    assert d.proc.wait(timeout=60) == 0
    channel.close()
    assert not d.app_socket.exists() and not d.admin_socket.exists()


def test_a_live_socket_is_not_stolen(text_image: Path, daemon, tmp_path: Path) -> None:
    second = start_daemon(text_image, daemon.runtime_dir, wait=False)
    assert second.proc.wait(timeout=120) != 0
    assert "in use by a running daemon" in second.logs()
    with grpc.insecure_channel(daemon.address) as channel:
        reply = pb_grpc.InferenceStub(channel).ListTasks(pb.ListTasksRequest(), timeout=10)
    assert reply.tasks


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "m4d.toml"
    cfg.write_text("kv_slots = -1\n")
    out = subprocess.run([sys.executable, "-m", "m4d", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "kv_slots must be > 0" in out.stderr and str(cfg) in out.stderr


@pytest.mark.parametrize("flag", ["--weight-format=int3", "--self-test=maybe"])
def test_bad_flag_value_exits_2(flag: str) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "m4d", "--config", "/dev/null", flag],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "must be one of" in out.stderr
