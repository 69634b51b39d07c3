"""What this CPU computes well (model stage, under the runtime and the adapter trainer):
whether it has bf16 arithmetic.

bf16 is fast only where the CPU multiplies bf16 itself: x86 with AVX512_BF16 (or AMX), ARM
with the BF16 extension. Elsewhere torch and oneDNN emulate it through float32 and it is
slower than float32: a 512x384x1536 matmul took 3.6 ms in float32 and 11.8 ms in bf16 on
AVX-512 without bf16, and 351 ms in bf16 with torch and oneDNN held to AVX2 (FACTS.md).

The answer follows torch's own switches, so a test (or an administrator) can make a machine
behave as a lesser one: `ATEN_CPU_CAPABILITY=avx2` (ATen's kernels; `default` too) and
`ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's GEMMs; any level below AVX512_CORE_BF16) both mean
"no bf16 arithmetic". What the serving runtime makes of it: m4d.executor.cpu.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

__all__ = ["BF16_FLAGS", "ONEDNN_NO_BF16", "CpuFeatures", "cpu_features", "has_bf16_arithmetic"]

# CPU flags (torch.cpu.get_capabilities() names) that mean bf16 multiply-adds in hardware
BF16_FLAGS = {"x86_64": ("avx512_bf16", "amx_bf16"), "arm64": ("bf16", "sve_bf16")}
# ONEDNN_MAX_CPU_ISA levels below AVX512_CORE_BF16: oneDNN emulates bf16 under them
ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                  "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class CpuFeatures:
    """What torch reports about the CPU it runs on."""

    architecture: str  # "x86_64", "arm64", ...
    flags: frozenset[str]  # the true entries of torch.cpu.get_capabilities()
    aten_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...
    onednn_max_isa: str = ""  # the ONEDNN_MAX_CPU_ISA environment setting, upper case

    def describe(self) -> str:
        """One line for logs and errors: `x86_64, torch AVX2, oneDNN AVX2, no bf16`."""
        parts = [self.architecture, f"torch {self.aten_capability}"]
        if self.onednn_max_isa:
            parts.append(f"oneDNN {self.onednn_max_isa}")
        parts += [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "bf16")
                  if f in self.flags]
        return ", ".join(parts) + ("" if has_bf16_arithmetic(self) else ", no bf16 arithmetic")


@functools.cache
def cpu_features() -> CpuFeatures:
    """This process's CPU as torch sees it (read once: torch fixes its choice at start)."""
    import torch

    caps = torch.cpu.get_capabilities()
    arch = str(caps.get("architecture", "")).lower()
    arch = {"amd64": "x86_64", "aarch64": "arm64"}.get(arch, arch)
    return CpuFeatures(arch, frozenset(k for k, v in caps.items() if v is True),
                       torch.backends.cpu.get_cpu_capability(),
                       os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper())


def has_bf16_arithmetic(features: CpuFeatures | None = None) -> bool:
    """True where bf16 matmuls run in hardware, faster than float32."""
    f = features or cpu_features()
    if not any(flag in f.flags for flag in BF16_FLAGS.get(f.architecture, ())):
        return False
    if f.architecture == "x86_64":  # held to a lesser ISA by torch's switches
        return f.aten_capability == "AVX512" and f.onednn_max_isa not in ONEDNN_NO_BF16
    return True
