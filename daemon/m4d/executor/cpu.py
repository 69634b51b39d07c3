"""What this CPU computes well, stage 0 of serving (beside `devices`): whether it has bf16
arithmetic, which decides what `compute_dtype = "auto"` means, whether the weight format
asked for computes correct numbers here, and which of m4's kernel variants runs.

bf16 is fast only where the CPU multiplies bf16 itself: x86 with AVX512_BF16 (or AMX), ARM
with the BF16 extension. Elsewhere torch and oneDNN emulate it through float32 and it is
slower than float32: a 512x384x1536 matmul took 3.6 ms in float32 and 11.8 ms in bf16 on
AVX-512 without bf16, and 351 ms in bf16 with torch and oneDNN held to AVX2; Embed ran 41
sentences/s in bf16 against 289 in float32 on an AVX2 machine (FACTS.md).

The answer follows torch's own switches, so a test (or an administrator) can make a machine
behave as a lesser one: `ATEN_CPU_CAPABILITY=avx2` (ATen's kernels; `default` too) and
`ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's GEMMs; any level below AVX512_CORE_BF16) both mean
"no bf16 arithmetic".

Exception: torch's int4/int8 weight-only kernels (weight formats int4 and int8, and w4a8
where it runs as int4) are fast only with bf16 activations, on every CPU: the SmolLM2
backbone in int4 decoded 45 tok/s with bf16 activations and 0.8 with float32 on AVX-512
without bf16 (57 against 1.4 with torch held to AVX2). "auto" gives those backbones bf16.
"""

from __future__ import annotations

import logging

from m4d.config import ConfigError
from m4d.model import kernels
from m4d.model.cpu import CpuFeatures, cpu_features, has_bf16_arithmetic

log = logging.getLogger(__name__)

# weight formats whose torch kernels need bf16 activations to be fast (see the docstring)
BF16_ACTIVATION_FORMATS = ("int4", "int8")
DENSE_FORMATS = ("bfloat16", "float32")  # compute in their own dtype


def resolve_compute_dtype(setting: str, weight_format: str | None = None,
                          features: CpuFeatures | None = None) -> str:
    """The dtype ("bfloat16" or "float32") that the `compute_dtype` setting means.

    Explicit values are kept. "auto" is bfloat16 where the CPU has bf16 arithmetic and
    float32 elsewhere, except for a backbone of `weight_format`: dense formats compute in
    their own dtype, int4/int8 in bfloat16 (their kernels are fast only with it).
    """
    if setting != "auto":
        return setting
    if weight_format in DENSE_FORMATS:
        return weight_format
    if weight_format in BF16_ACTIVATION_FORMATS:
        return "bfloat16"
    return "bfloat16" if has_bf16_arithmetic(features or cpu_features()) else "float32"


def check_weight_format(weight_format: str) -> None:
    """ConfigError when `weight_format` would compute wrong numbers on this CPU.

    w8a8's integer GEMM (oneDNN, or torch._int_mm) is checked once per process against
    exact sums (m4d.model.quant.int8_gemm_path); the others need no check here.
    """
    if weight_format != "w8a8":
        return
    from m4d.model.quant import Int8GemmError, int8_gemm_path

    try:
        int8_gemm_path()
    except Int8GemmError as exc:
        raise ConfigError(f"weight_format = \"w8a8\" cannot run on this CPU "
                          f"({cpu_features().describe()}): {exc}") from None


__all__ = ["CpuFeatures", "check_weight_format", "cpu_features", "has_bf16_arithmetic",
           "resolve_compute_dtype", "select_kernels"]


def select_kernels(setting: str) -> str:
    """Puts the kernel variant of `setting` ("auto" or a name) in use and logs it; returns
    its name ("" without the kernels, which is an error only for a forced variant)."""
    if not kernels.available():
        if setting != "auto":
            raise ConfigError(f"kernel_variant={setting}: m4's kernels are not built here "
                              "(run 'python -m m4d.model.kernels build')")
        return ""
    try:
        chosen = kernels.select(setting)
    except ValueError as exc:
        raise ConfigError(f"kernel_variant={setting}: {exc}") from exc
    log.info("kernels", extra={"variant": chosen, "setting": setting,
                               "runnable": kernels.runnable_variants(),
                               "cpu_features": kernels.cpu_features()})
    return chosen
