"""compute_dtype = "auto" follows the CPU (m4d.executor.cpu), and the runtime reports and
uses what it resolved to; weight formats that compute wrong numbers here are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from m4d.config import Config, ConfigError
from m4d.executor import cpu
from m4d.executor.cpu import CpuFeatures, has_bf16_arithmetic, resolve_compute_dtype
from m4d.executor.devices import Device, DeviceRegistry
from m4d.executor.runtime import Runtime, backbone_plan
from m4d.model import kernels, quant

SAPPHIRE_RAPIDS = CpuFeatures("x86_64", frozenset({"avx2", "avx512_f", "avx512_vnni",
                                                   "avx512_bf16", "amx_bf16"}), "AVX512")
ICE_LAKE = CpuFeatures("x86_64", frozenset({"avx2", "avx512_f", "avx512_vnni"}), "AVX512")
ZEN2 = CpuFeatures("x86_64", frozenset({"avx2", "fma3"}), "AVX2")
GRAVITON3 = CpuFeatures("arm64", frozenset({"neon", "dot", "bf16", "i8mm"}), "SVE256")
GRAVITON2 = CpuFeatures("arm64", frozenset({"neon", "dot"}), "DEFAULT")


@pytest.mark.parametrize(("features", "bf16"), [
    (SAPPHIRE_RAPIDS, True), (ICE_LAKE, False), (ZEN2, False), (GRAVITON3, True),
    (GRAVITON2, False),
    (CpuFeatures("x86_64", frozenset({"avx512_bf16"}), "AVX512"), True),
    (CpuFeatures("x86_64", frozenset({"amx_bf16"}), "AVX512"), True),
    (CpuFeatures("x86_64", frozenset({"avx_ne_convert", "avx2"}), "AVX2"), False),  # converts only
])
def test_bf16_arithmetic_from_cpu_flags(features: CpuFeatures, bf16: bool) -> None:
    assert has_bf16_arithmetic(features) is bf16
    assert resolve_compute_dtype("auto", features=features) == ("bfloat16" if bf16 else "float32")
    assert ("no bf16 arithmetic" in features.describe()) is not bf16


@pytest.mark.parametrize(("aten", "onednn", "bf16"), [
    ("AVX512", "", True), ("AVX2", "", False), ("DEFAULT", "", False),
    ("AVX512", "AVX2", False), ("AVX512", "AVX512_CORE_VNNI", False),
    ("AVX512", "AVX512_CORE_BF16", True), ("AVX512", "AVX512_CORE_AMX", True),
])
def test_torch_switches_make_a_bf16_cpu_a_lesser_one(aten: str, onednn: str, bf16: bool) -> None:
    """ATEN_CPU_CAPABILITY (as torch reports it) and ONEDNN_MAX_CPU_ISA hold the choice down."""
    f = CpuFeatures("x86_64", SAPPHIRE_RAPIDS.flags, aten, onednn)
    assert has_bf16_arithmetic(f) is bf16
    assert resolve_compute_dtype("auto", "w4a8", f) == ("bfloat16" if bf16 else "float32")


@pytest.mark.parametrize("features", [SAPPHIRE_RAPIDS, ZEN2])
def test_explicit_values_and_formats_that_fix_the_dtype(features: CpuFeatures) -> None:
    for setting in ("bfloat16", "float32"):  # explicit: honoured whatever the CPU and format
        for fmt in (None, "w4a8", "w8a8", "int4", "float32"):
            assert resolve_compute_dtype(setting, fmt, features) == setting
    # auto: torch's int4/int8 kernels want bf16 on any CPU; dense weights their own dtype
    assert resolve_compute_dtype("auto", "int4", features) == "bfloat16"
    assert resolve_compute_dtype("auto", "int8", features) == "bfloat16"
    assert resolve_compute_dtype("auto", "float32", features) == "float32"
    assert resolve_compute_dtype("auto", "bfloat16", features) == "bfloat16"
    hw = "bfloat16" if features is SAPPHIRE_RAPIDS else "float32"
    assert resolve_compute_dtype("auto", "w8a8", features) == hw


def test_auto_is_the_default_and_the_config_rules_allow_it() -> None:
    assert Config().compute_dtype == "auto"
    for fmt in ("w4a8", "int4", "int8", "w8a8", "bfloat16", "float32"):
        Config(weight_format=fmt)  # auto fits every format
    with pytest.raises(ConfigError, match="needs compute_dtype=bfloat16 or auto"):
        Config(weight_format="int8", compute_dtype="float32")
    with pytest.raises(ConfigError, match="set compute_dtype=float32 or auto"):
        Config(weight_format="float32", compute_dtype="bfloat16")


@pytest.fixture
def cpu_is(monkeypatch: pytest.MonkeyPatch):
    """Makes this process's CPU look like the given features to m4d (not to torch)."""
    def use(features: CpuFeatures, kernels_built: bool = True) -> None:
        monkeypatch.setattr(cpu, "cpu_features", lambda: features)
        monkeypatch.setattr(kernels, "available", lambda: kernels_built)
    return use


@pytest.mark.parametrize(("features", "kernels_built", "plan"), [
    # w4a8 computes in float32 and stores its KV cache in bf16 on every CPU (m4's attention
    # widens it as it reads: no bf16 arithmetic, half the memory)
    (SAPPHIRE_RAPIDS, True, ("w4a8", torch.float32, torch.bfloat16)),
    (ICE_LAKE, True, ("w4a8", torch.float32, torch.bfloat16)),
    (ZEN2, True, ("w4a8", torch.float32, torch.bfloat16)),
    # w4a8 without m4's kernels runs as int4, whose kernel wants bf16 activations everywhere
    (ZEN2, False, ("int4", torch.bfloat16, torch.bfloat16)),
])
def test_backbone_plan_of_the_default_format(cpu_is, features: CpuFeatures, kernels_built: bool,
                                             plan: tuple[str, torch.dtype, torch.dtype]) -> None:
    cpu_is(features, kernels_built)
    assert backbone_plan(Config(), torch.device("cpu")) == plan


def test_backbone_plan_of_other_formats(cpu_is) -> None:
    cpu_is(ZEN2, kernels_built=False)
    dev = torch.device("cpu")
    assert backbone_plan(Config(weight_format="w8a8"), dev) == ("w8a8", torch.float32, torch.float32)
    assert backbone_plan(Config(weight_format="float32"), dev) == ("float32",) + (torch.float32,) * 2
    assert backbone_plan(Config(weight_format="bfloat16"), dev) == ("bfloat16",) + (torch.bfloat16,) * 2
    # explicit compute_dtype: as before "auto" existed (int4 with float32 is slow but asked for)
    assert backbone_plan(Config(compute_dtype="float32"), dev) == ("int4",) + (torch.float32,) * 2


def _runtime(config: Config, kinds: dict[str, str]) -> Runtime:
    image = SimpleNamespace(path="/nonexistent", manifest=SimpleNamespace(
        components={name: {"kind": kind} for name, kind in kinds.items()}))
    return Runtime(image, config, DeviceRegistry((Device("cpu", "cpu", cores=2),)))  # type: ignore[arg-type]


def test_runtime_resolves_auto_for_its_components(cpu_is) -> None:
    cpu_is(ZEN2)
    rt = _runtime(Config(), {"text_encoder": "bert"})
    assert (rt.compute_dtype_name, rt.compute_dtype) == ("float32", torch.float32)
    assert rt.media.compute_dtype == torch.float32
    cpu_is(SAPPHIRE_RAPIDS)
    assert _runtime(Config(), {"text_encoder": "bert"}).compute_dtype == torch.bfloat16
    assert _runtime(Config(compute_dtype="float32"), {}).compute_dtype == torch.float32


def test_runtime_refuses_w8a8_where_its_gemm_is_wrong(cpu_is, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_is(ZEN2)

    def wrong(packed: bool | None = None) -> bool:
        raise quant.Int8GemmError("the w8a8 int8 GEMM gives wrong sums on this CPU")

    monkeypatch.setattr(quant, "int8_gemm_path", wrong)
    with pytest.raises(ConfigError, match=r'w8a8" cannot run on this CPU \(x86_64, torch AVX2'):
        _runtime(Config(weight_format="w8a8"), {"backbone": "llama"})
    _runtime(Config(), {"backbone": "llama"})  # other formats are not affected


def test_torch_environment_switches_reach_the_real_detection() -> None:
    """ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 are read by torch and oneDNN at
    start: in such a process m4d sees no bf16 arithmetic, whatever this machine has."""
    code = ("import json, torch; from m4d.executor import cpu; f = cpu.cpu_features(); "
            "print(json.dumps([f.aten_capability, f.onednn_max_isa, cpu.has_bf16_arithmetic(), "
            "cpu.resolve_compute_dtype('auto'), torch.backends.cpu.get_cpu_capability()]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent, check=True)
    aten, onednn, bf16, dtype, torch_says = json.loads(out.stdout.splitlines()[-1])
    if torch_says != "AVX2":  # e.g. an ARM machine: the x86 switch does not apply
        pytest.skip(f"torch's CPU capability here is {torch_says}")
    assert (aten, onednn, bf16, dtype) == ("AVX2", "AVX2", False, "float32")
