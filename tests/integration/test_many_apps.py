"""Many callers on one real model: continuous batching keeps every greedy answer exact while
others come, go and cancel; a flood beyond the queue limit is refused at once."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4d.config import Config
from m4d.executor.runtime import backbone_plan
from m4d.model.llama import LlamaConfig, greedy_generate, load_llama
from m4d.prepare.tokenizer import TextTokenizer
from m4image.verify import verify_image

from tests.conftest import DaemonProcess, start_daemon

SUBJECTS = ["cats", "the sea", "winter", "trains", "bread", "music", "rain", "a city",
            "mountains", "books", "coffee", "the moon", "gardens", "bicycles", "friendship",
            "clocks", "rivers", "snow", "birds", "the desert", "a library", "tea", "forests",
            "the wind", "old maps", "lighthouses", "honey", "storms", "bridges", "candles"]


@pytest.fixture(scope="module")
def busy_daemon(text_image: Path, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("many")
    d = start_daemon(text_image, run,
                     # one uid plays fifty apps here: lift its per-app caps (issue 15)
                     env={"M4D_UID_MAX_CONCURRENT": "100", "M4D_MAX_QUEUE": "100",
                          "M4D_UID_MAX_QUEUED": "100", "M4D_UID_MAX_RUNNING": "64",
                          "M4D_UID_MAX_TOKENS_IN_FLIGHT": "0",
                          "M4D_METRICS_LISTEN": f"unix:{run}/metrics.sock"})
    yield d
    d.stop()


@pytest.fixture(scope="module")
def solo(text_image: Path):
    image = verify_image(text_image)
    spec = image.manifest.components["backbone"]
    cfg = LlamaConfig.from_dict(spec["config"])
    # the daemon's default format, activation and KV cache dtypes (w4a8 in float32 here)
    fmt, dtype, kv_dtype = backbone_plan(Config(), torch.device("cpu"))
    model = load_llama(image.path / spec["weights"], cfg, weight_format=fmt, compute_dtype=dtype)
    model.setup_caches(1, 512, kv_dtype)
    tok = TextTokenizer.from_file(image.path / spec["tokenizer"], bos_id=cfg.bos_id,
                                  eos_id=cfg.eos_id)

    def run(prompt: str, n: int) -> list[int]:
        with torch.inference_mode():
            return greedy_generate(model, tok.encode(prompt), n, None)

    return run


def status(d: DaemonProcess) -> admin_pb2.StatusResponse:
    with grpc.insecure_channel(d.admin_address) as channel:
        return admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=10)


def test_fifty_streams_with_twenty_cancelled_leave_the_rest_exact(busy_daemon, solo) -> None:
    d = busy_daemon
    channel = grpc.insecure_channel(d.address)
    stub = pb_grpc.InferenceStub(channel)
    results: dict[int, list[int]] = {}
    errors: list[str] = []
    start = threading.Barrier(50)

    def greedy(prompt: str, n: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(task="complete", prompt=prompt, sampling=pb.SamplingParams(
            max_tokens=n, temperature=0.0, ignore_eos=True))

    def keeper(i: int) -> None:
        start.wait()
        ids: list[int] = []
        try:
            for msg in stub.Generate(greedy(f"A short poem about {SUBJECTS[i]}:", 20),
                                     timeout=600):
                ids.extend(msg.token_ids)
            results[i] = ids
        except grpc.RpcError as exc:
            errors.append(f"stream {i}: {exc.code().name} {exc.details()}")

    def cancel_in_decode(i: int) -> None:
        start.wait()
        call = stub.Generate(greedy(f"Tell me everything about {SUBJECTS[i % 30]}.", 400))
        for n, _ in enumerate(call):
            if n == 2:
                call.cancel()
                break

    def cancel_in_prefill(i: int) -> None:
        start.wait()
        call = stub.Generate(greedy("word " * 1500, 50))
        time.sleep(0.05)
        call.cancel()

    threads = ([threading.Thread(target=keeper, args=(i,)) for i in range(30)]
               + [threading.Thread(target=cancel_in_decode, args=(i,)) for i in range(10)]
               + [threading.Thread(target=cancel_in_prefill, args=(i,)) for i in range(10)])
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    channel.close()
    assert not errors, errors
    assert len(results) == 30
    for i, ids in results.items():
        assert ids == solo(f"A short poem about {SUBJECTS[i]}:", 20), f"stream {i} differs"
    deadline = time.monotonic() + 10
    while (s := status(d)).requests_in_flight or s.active_sequences:
        assert time.monotonic() < deadline, f"work left behind: {s}"
        time.sleep(0.1)
    # the ten cancelled mid-decode surely reached the engine; a prefill cancel may beat the
    # request to the daemon, and then there is nothing to count
    assert s.requests_cancelled >= 10


def scrape(path: Path) -> dict[str, float]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200"), head
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_the_work_per_uid(busy_daemon) -> None:
    m = scrape(busy_daemon.runtime_dir / "metrics.sock")
    uid = os.getuid()
    assert m["m4_requests_total"] >= 40
    assert m[f'm4_uid_tokens_generated_total{{uid="{uid}"}}'] >= 30 * 20
    assert m["m4_time_to_first_token_seconds_count"] >= 30
    assert m['m4_time_to_first_token_seconds_bucket{le="+Inf"}'] == (
        m["m4_time_to_first_token_seconds_count"])
    assert m["m4_requests_in_flight"] == 0


def test_flood_beyond_the_queue_is_refused_at_once(text_image: Path, tmp_path: Path) -> None:
    q, slots = 4, 2
    d = start_daemon(text_image, tmp_path / "run", "--max-queue", str(q),
                     "--kv-slots", str(slots))
    callers = 2 * q + 10
    outcome: dict[int, tuple[str, float]] = {}
    start = threading.Barrier(callers + 1)
    channel = grpc.insecure_channel(d.address)
    stub = pb_grpc.InferenceStub(channel)
    channel_ready = grpc.channel_ready_future(channel)
    channel_ready.result(timeout=30)

    def caller(i: int) -> None:
        start.wait()
        began = time.monotonic()
        try:
            list(stub.Generate(pb.GenerateRequest(
                task="complete", prompt=f"Count slowly from {i}:",
                sampling=pb.SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)),
                timeout=600))
            outcome[i] = ("ok", time.monotonic() - began)
        except grpc.RpcError as exc:
            outcome[i] = (exc.code().name, time.monotonic() - began)

    health_ok = []
    stop_health = threading.Event()

    def health_probe() -> None:
        with grpc.insecure_channel(d.address) as ch:
            hs = health_pb2_grpc.HealthStub(ch)
            while not stop_health.is_set():
                reply = hs.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                health_ok.append(reply.status == health_pb2.HealthCheckResponse.SERVING)
                time.sleep(0.05)

    probe = threading.Thread(target=health_probe)
    probe.start()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(timeout=900)
    stop_health.set()
    probe.join()
    channel.close()
    d.stop()
    refused = [(code, dt) for code, dt in outcome.values() if code != "ok"]
    served = [dt for code, dt in outcome.values() if code == "ok"]
    assert len(outcome) == callers
    assert {code for code, _ in refused} == {"UNAVAILABLE"}
    assert len(served) == q + slots, outcome  # the rows plus the queue, no more, no fewer
    assert max(dt for _, dt in refused) < 0.05, sorted(dt for _, dt in refused)
    assert health_ok and all(health_ok)
