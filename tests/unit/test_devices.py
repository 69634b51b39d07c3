"""The device registry, placement and thread budget, on machines described by fake probes
(no GPU needed), and the engine's routing of encoder work to its device's executor."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from m4d.config import Config, ConfigError, load_config
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.executor.devices import (
    DeviceRegistry,
    cpu_threads,
    describe,
    discover,
    place,
    read_cpuinfo,
)
from m4d.requests import Caller, Embeddings, EmbedRequest, Priority

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile

processor\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile
"""
IMAGE = {"backbone": "llama", "text_encoder": "bert"}


def machine(tmp_path: Path, gpus: int = 0, xpu: int = 0, mps: bool = False,
            cores: int = 8) -> DeviceRegistry:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)

    def probe(kind: str) -> list[tuple[str, int]]:
        if kind == "cuda":
            return [(f"Fake GPU {i}", (i + 1) * 8 << 30) for i in range(gpus)]
        if kind == "xpu":
            return [("Fake XPU", 16 << 30)] * xpu
        return [("Apple GPU", 32 << 30)] if mps and kind == "mps" else []

    return discover(probe, str(cpuinfo), cores=cores)


def test_cpu_flags_and_cores_from_cpuinfo(tmp_path: Path) -> None:
    reg = machine(tmp_path)
    assert reg.names() == ["cpu"]
    cpu = reg.cpu
    assert cpu.description == "Test CPU 9000" and cpu.cores == 8
    assert set(cpu.flags) == {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile"}
    assert "sse2" not in cpu.flags  # only the flags that matter here
    assert "avx512_bf16" in cpu.summary() and "8 cores" in cpu.summary()


def test_real_machine_has_a_cpu_and_what_torch_reports() -> None:
    reg = discover()
    assert reg.devices[0].name == "cpu" and reg.cpu.cores >= 1
    assert sum(d.kind == "cuda" for d in reg.devices) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0)
    real_flags = read_cpuinfo()[1]
    assert reg.cpu.flags == real_flags


def test_accelerators_are_listed_with_names_and_memory(tmp_path: Path) -> None:
    reg = machine(tmp_path, gpus=2, xpu=1, mps=True)
    assert reg.names() == ["cpu", "cuda:0", "cuda:1", "xpu:0", "mps"]
    cuda1 = reg.get("cuda:1")
    assert cuda1 is not None and cuda1.description == "Fake GPU 1"
    assert cuda1.memory_bytes == 16 << 30
    assert reg.get("cuda") is reg.get("cuda:0")  # no index means 0
    assert reg.get("cuda:2") is None


def test_a_broken_driver_leaves_the_cpu(tmp_path: Path) -> None:
    def probe(kind: str) -> list[tuple[str, int]]:
        raise RuntimeError("driver exploded")

    assert discover(probe, str(tmp_path / "missing")).names() == ["cpu"]


def test_default_placement_is_cpu(tmp_path: Path) -> None:
    reg = machine(tmp_path, gpus=1)
    p = place(Config().placement, IMAGE, reg)
    assert p.components == {"backbone": "cpu", "text_encoder": "cpu"}
    assert p.devices_in_use() == ["cpu"]


def test_name_beats_kind_beats_default(tmp_path: Path) -> None:
    reg = machine(tmp_path, gpus=2)
    p = place({"backbone": "cuda:1", "bert": "cuda:0", "default": "cpu"},
              {**IMAGE, "vision": "vit"}, reg)
    assert p.components == {"backbone": "cuda:1", "text_encoder": "cuda:0", "vision": "cpu"}
    assert p.devices_in_use() == ["cuda:1", "cuda:0", "cpu"]


def test_auto_prefers_cuda_then_xpu_then_mps_then_cpu(tmp_path: Path) -> None:
    assert place({"default": "auto"}, IMAGE, machine(tmp_path, gpus=1, xpu=1)).device_for(
        "backbone") == "cuda:0"
    assert place({"default": "auto"}, IMAGE, machine(tmp_path, xpu=1, mps=True)).device_for(
        "backbone") == "xpu:0"
    assert place({"default": "auto"}, IMAGE, machine(tmp_path, mps=True)).device_for(
        "backbone") == "mps"
    assert place({"default": "auto"}, IMAGE, machine(tmp_path)).device_for("backbone") == "cpu"


def test_missing_device_names_the_key_and_lists_devices(tmp_path: Path) -> None:
    reg = machine(tmp_path, gpus=1)
    with pytest.raises(ConfigError) as e:
        place({"backbone": "cuda:1", "default": "cpu"}, IMAGE, reg)
    message = str(e.value)
    assert "placement.backbone" in message and "cuda:1" in message
    assert "devices found: cpu, cuda:0" in message


def test_placement_syntax_is_checked_at_config_time(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"placement\.backbone must be .*'gpu7'"):
        Config(placement={"backbone": "gpu7"})
    with pytest.raises(ConfigError, match="placement must not be empty"):
        Config(placement={})
    toml = tmp_path / "m4d.toml"
    toml.write_text('placement = { backbone = "cuda:0", default = "cpu" }\n')
    assert load_config(toml, env={}).placement == {"backbone": "cuda:0", "default": "cpu"}
    toml.write_text('placement = "auto"\n')
    assert load_config(toml, env={}).placement == {"default": "auto"}
    env = {"M4D_PLACEMENT": "backbone=xpu:0, default=cpu"}
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert load_config(empty, env=env).placement == {"backbone": "xpu:0", "default": "cpu"}
    toml.write_text("placement = 3\n")
    with pytest.raises(ConfigError, match="placement must be a table"):
        load_config(toml, env={})


def test_uid_max_class_setting(tmp_path: Path) -> None:
    toml = tmp_path / "m4d.toml"
    toml.write_text('uid_max_class = { 65534 = "background", root = "system" }\n')
    cfg = load_config(toml, env={})
    assert cfg.class_caps() == {65534: 2, 0: 0}
    with pytest.raises(ConfigError, match=r"uid_max_class\.65534 must be one of"):
        Config(uid_max_class={"65534": "urgent"})
    with pytest.raises(ConfigError, match="no user named"):
        Config(uid_max_class={"no-such-user-here": "background"})


def test_cpu_thread_budget(tmp_path: Path) -> None:
    reg = machine(tmp_path, gpus=2, cores=8)
    on_cpu = place({"default": "cpu"}, IMAGE, reg)
    split = place({"backbone": "cuda:0", "text_encoder": "cuda:1", "default": "cpu"},
                  {**IMAGE, "vision": "vit"}, reg)
    assert cpu_threads(0, reg, on_cpu) == 7  # a core for the event loop
    assert cpu_threads(0, reg, split) == 5  # and one to feed each GPU
    assert cpu_threads(3, reg, split) == 3  # `threads` set: taken as it is
    tiny = machine(tmp_path, gpus=1, cores=1)
    assert cpu_threads(0, tiny, place({"default": "cuda:0"}, IMAGE, tiny)) == 1


def test_describe_lists_components_per_device(tmp_path: Path) -> None:
    reg = machine(tmp_path, gpus=1)
    rows = describe(reg, place({"backbone": "cuda:0"}, IMAGE, reg))
    assert [(r["name"], r["components"]) for r in rows] == [
        ("cpu", ["text_encoder"]), ("cuda:0", ["backbone"])]


# ---- one executor per device --------------------------------------------------------


class _Placement:
    def __init__(self, components: dict[str, str]) -> None:
        self.components = components

    def devices_in_use(self) -> list[str]:
        return list(dict.fromkeys(self.components.values()))


class EncoderRuntime:
    """Records which thread ran each encoder batch."""

    tokenizer = None
    max_context = 64

    def __init__(self, encoder_device: str) -> None:
        self.device = "cpu"
        self.encoder_device = encoder_device
        self.placement = _Placement({"backbone": "cpu", "text_encoder": encoder_device})
        self.threads: list[str] = []

    def embed(self, texts: list[str], loras: list[str] | None = None) -> tuple[torch.Tensor, list[int]]:
        self.threads.append(threading.current_thread().name)
        return torch.ones(len(texts), 4), [len(t) for t in texts]


@pytest.mark.parametrize("encoder_device", ["cpu", "cuda:0"])
def test_encoder_work_runs_on_its_devices_executor(encoder_device: str) -> None:
    runtime = EncoderRuntime(encoder_device)
    engine = Engine(runtime, EngineConfig(  # type: ignore[arg-type]
        kv_slots=2, token_budget=64, prefill_chunk=32, max_queue=8, max_batch_texts=8))
    assert sorted(engine.executors) == ([] if encoder_device == "cpu" else ["cuda:0"])
    engine.start()

    async def embed_all() -> list[object]:
        streams = [engine.submit(EmbedRequest(task="embed", priority=Priority.FOREGROUND,
                                              caller=Caller(uid=1000, pid=1),
                                              texts=[f"text {i}"]))
                   for i in range(5)]
        return [await s.result() for s in streams]

    try:
        results = asyncio.run(embed_all())
    finally:
        engine.stop()
    assert all(isinstance(r, Embeddings) for r in results)
    assert runtime.threads and set(runtime.threads) == {f"m4-executor-{encoder_device}"}
    assert engine.stats.in_flight == 0 and engine.stats.total == 5
    assert engine.stats.per_uid[1000].tokens_prompted == sum(len(f"text {i}") for i in range(5))
