"""M4's own CPU kernels (``csrc/``): batched GEMMs over GGUF-style weight blocks, decode
attention and a whole decode step (with per-row LoRA adapters), one variant per instruction
set, chosen at load.

Layout (as ggml's CPU backend): ISA-neutral code (``ops.cpp``: the drivers; ``pool.h``: the
thread pool; ``dispatch.cpp``: CPU features and the choice of variant; ``torch_ops.cpp``: the
torch operators) compiled for the baseline ISA, and one translation unit per variant
(``variant_*.cpp``: ``kernels_impl.h`` over that ISA's ``simd_*.h``) compiled with its own
flags. Every variant computes the same numbers, bit for bit (``kernels_impl.h`` says why);
the scalar one is the reference the others are tested against.

The op schemas are declared here, so TorchScript resolves ``torch.ops.m4.*`` whether or not
the library loaded; callers check :func:`available` first.

The library is compiled with the system C++ compiler against the installed torch, once, at
install time: ``python -m m4d.model.kernels build`` (``make setup`` and systemd/install.sh
run it). Its file name carries a hash of the sources, the flags and the torch version, so a
stale build is never loaded. The daemon never compiles: :func:`load` looks in
``$M4_KERNEL_DIR`` and ``_build``; without a build :func:`available` is False and the model
keeps torch's kernels. Which variant runs: the best this CPU supports, unless
``M4_KERNEL_VARIANT`` (or the daemon's ``kernel_variant`` setting, via :func:`select`) names
another one it can run.
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
COMMON_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-pthread",
                "-ffp-contract=off", "-fno-fast-math"]


@dataclass(frozen=True)
class Variant:
    name: str
    arch: str  # platform.machine() it is built for
    flags: tuple[str, ...]


# best first, per architecture (dispatch.cpp ranks them the same way)
VARIANTS = (
    Variant("avx512vnni", "x86_64", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                     "-mavx512vnni", "-mfma", "-mf16c")),
    Variant("avxvnni", "x86_64", ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")),
    Variant("avx2", "x86_64", ("-mavx2", "-mfma", "-mf16c")),
    Variant("neon_i8mm", "aarch64", ("-march=armv8.2-a+dotprod+i8mm",)),
    Variant("neon_dotprod", "aarch64", ("-march=armv8.2-a+dotprod",)),
    Variant("scalar", "any", ()),
)
NEUTRAL_SOURCES = ("dispatch.cpp", "ops.cpp")
TORCH_SOURCES = ("torch_ops.cpp",)
WEIGHT_KINDS = {"q4_f16": 0, "q4_f32": 1, "q8_f16": 2, "q8_f32": 3, "q8_f32_g16": 4, "q8u_f32": 5,
                "q8u_f32_g16": 6, "q5_f16": 7}  # csrc/variant.h: Kind

ATTENTION_HEAD_DIMS = (32, 64, 128)  # what decode_attention is compiled for
# decode_layers' per-row LoRA adapters (Punica's BGMV: the base GEMMs shared by the batch):
# `lora` holds LORA_TENSORS contiguous tensors per (adapter, layer), adapter-major, (A^T
# [k_in, r], B^T [r, n_out]) for each of LORA_LINEARS, both float32 or both bfloat16 (widened
# as read: a bf16 pair gives the bits of the float32 pair of its values), the scaling folded
# into B^T, two empty tensors where an adapter leaves a linear alone. Any pair may be followed
# by an int32 tensor, B^T's row spans: [r, 2], row j zero outside columns [start, stop), not
# read there (a fused linear's parts), or empty: whole rows. `adapters` [B] int: row b's
# adapter, -1 (or None for all rows) for none. Row b adds (u @ A^T) @ B^T to the linear's
# output u -> y right after the base linear (before RoPE and the KV write, SiLU, the residuals).
LORA_LINEARS = ("qkv", "o", "w13", "w2")  # [d] -> [q + 2 kv], [q] -> [d], [d] -> [2 ffn], [ffn] -> [d]
LORA_TENSORS = 2 * len(LORA_LINEARS)
LORA_MAX_RANK = 256  # csrc/ops.h: kLoraMaxRank
_lib = torch.library.Library("m4", "DEF")  # type: ignore[no-untyped-call]
SCHEMAS = (
    "block_linear(Tensor x, Tensor w, Tensor sc, int kind, int n, int k, ScalarType out_dtype) "
    "-> Tensor",
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor pos, "
    "float scale) -> Tensor",
    "decode_layers(Tensor x, Tensor[] layers, int[] kinds, Tensor rows, Tensor pos, Tensor cos, "
    "Tensor sin, int n_heads, int n_kv_heads, float eps, float scale, Tensor[] lora, "
    "Tensor? adapters) -> Tensor",
    "set_threads(int n) -> ()",
    "get_threads() -> int",
    "compiled_variants() -> str[]",
    "runnable_variants() -> str[]",
    "set_variant(str name) -> bool",
    "get_variant() -> str",
    "cpu_features() -> str[]",
)
for _schema in SCHEMAS:
    _lib.define(_schema)  # type: ignore[no-untyped-call]

_state: dict[str, bool] = {}
_lock = threading.Lock()


def arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def variants_for(target: str) -> list[Variant]:
    """The variants built for an architecture, best first (scalar last)."""
    return [v for v in VARIANTS if v.arch in (target, "any")]


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cpp")) + sorted(SOURCE_DIR.glob("*.h"))


def _torch_paths() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension
    return cpp_extension.include_paths(), cpp_extension.library_paths()


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def library_name() -> str:
    h = hashlib.sha256()
    for path in sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for v in variants_for(arch()):
        h.update(" ".join((v.name, *v.flags)).encode())
    h.update(" ".join(COMMON_FLAGS).encode())
    h.update(torch.__version__.encode())
    return f"m4_kernels-{h.hexdigest()[:16]}.so"


BUILD_DIR = Path(__file__).with_name("_build")


def _candidate_dirs() -> list[Path]:
    dirs = [Path(os.environ["M4_KERNEL_DIR"])] if os.environ.get("M4_KERNEL_DIR") else []
    return [*dirs, BUILD_DIR]


def find_library() -> Path | None:
    name = library_name()
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    return None


def _compile_all(jobs: Sequence[tuple[Path, list[str], Path]], compiler: str) -> None:
    """Compiles (source, flags, object) jobs, as many at once as there are CPUs."""
    pending = list(jobs)
    running: list[tuple[Path, subprocess.Popen[str]]] = []
    width = max(1, os.cpu_count() or 1)
    errors: list[str] = []
    while pending or running:
        while pending and len(running) < width:
            src, flags, obj = pending.pop(0)
            cmd = [compiler, *COMMON_FLAGS, *flags, "-c", str(src), "-o", str(obj)]
            running.append((src, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
        src, proc = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"compiling {src.name} failed:\n{err[-4000:]}")
    if errors:
        raise RuntimeError("\n".join(errors))


def _variant_jobs(target: str, tmp: Path, extra: Sequence[str] = ()) -> list[tuple[Path, list[str], Path]]:
    """The torch-free part: every variant with its own flags, and the neutral drivers."""
    jobs = [(SOURCE_DIR / f"variant_{v.name}.cpp", [*extra, *v.flags], tmp / f"variant_{v.name}.o")
            for v in variants_for(target)]
    jobs += [(SOURCE_DIR / name, list(extra), tmp / name.replace(".cpp", ".o"))
             for name in NEUTRAL_SOURCES]
    return jobs


def build(out_dir: Path = BUILD_DIR) -> Path:
    """Compiles the library for this machine's architecture into ``out_dir``: every variant
    of the architecture (the dispatcher picks one at load), whatever this CPU runs. The file
    appears whole or not at all (linked to a temporary name, then renamed)."""
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    out_dir.mkdir(parents=True, exist_ok=True)
    includes, libdirs = _torch_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    with tempfile.TemporaryDirectory(prefix="m4_kernels-") as tmp_name:
        tmp = Path(tmp_name)
        jobs = _variant_jobs(arch(), tmp, [abi])
        jobs += [(SOURCE_DIR / name, [abi, *(f"-I{p}" for p in includes)],
                  tmp / name.replace(".cpp", ".o")) for name in TORCH_SOURCES]
        _compile_all(jobs, compiler)
        fd, partial = tempfile.mkstemp(prefix=".m4_kernels-", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            cmd = [compiler, "-shared", "-pthread", *(str(obj) for _, _, obj in jobs), "-o", partial]
            cmd += [f"-L{p}" for p in libdirs] + ["-lc10", "-ltorch_cpu"]
            cmd += [f"-Wl,-rpath,{p}" for p in libdirs]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"linking the m4 kernels failed:\n{proc.stderr[-4000:]}")
            target = out_dir / library_name()
            os.chmod(partial, 0o755)  # mkstemp's 0600: the daemon's own user must load it
            os.replace(partial, target)
            return target
        finally:
            if os.path.exists(partial):
                os.unlink(partial)


def build_test_program(target: str, compiler: str, output: Path, link_flags: Sequence[str] = ()) -> Path:
    """The standalone kernel test (csrc/kernel_test.cpp, no torch) for `target` ("x86_64" or
    "aarch64"): every variant of that architecture against the scalar one. With a cross
    compiler and ``-static`` it runs under qemu-user."""
    with tempfile.TemporaryDirectory(prefix="m4_kernel_test-") as tmp_name:
        tmp = Path(tmp_name)
        jobs = _variant_jobs(target, tmp)
        jobs.append((SOURCE_DIR / "kernel_test.cpp", [], tmp / "kernel_test.o"))
        _compile_all(jobs, compiler)
        cmd = [compiler, "-pthread", *(str(obj) for _, _, obj in jobs), "-o", str(output), *link_flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"linking the kernel test failed:\n{proc.stderr[-4000:]}")
    return output


def load() -> bool:
    """Loads the prebuilt library once and picks its variant; returns :func:`available`."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok = False
        if os.environ.get("M4_KERNELS", "1") == "0":
            log.info("m4 kernels disabled by M4_KERNELS=0")
        else:  # any architecture: at least the scalar variant is built for it
            path = find_library()
            if path is None:
                log.warning("m4 kernels not built for this source and torch (%s); using torch's "
                            "kernels: run 'python -m m4d.model.kernels build'", library_name())
            else:
                try:
                    torch.ops.load_library(str(path))  # type: ignore[no-untyped-call]
                    ok = True
                except Exception as exc:  # a corrupt or foreign file: run without
                    log.warning("m4 kernels did not load from %s, using torch's kernels: %s",
                                path, exc)
        _state["ok"] = ok
    if ok and os.environ.get("M4_KERNEL_VARIANT"):
        select(os.environ["M4_KERNEL_VARIANT"])
    return ok


def available() -> bool:
    """Whether the compiled ops can be called (loads them on first use)."""
    return load()


def select(name: str) -> str:
    """Makes `name` the variant in use ("auto": the best this CPU runs); returns the one in
    effect. ValueError if this CPU cannot run it or it is not compiled in."""
    if not available():
        raise ValueError("m4's kernels are not available (not built, or disabled by M4_KERNELS=0)")
    runnable = list(torch.ops.m4.runnable_variants())
    choice = runnable[0] if name == "auto" else name
    if not torch.ops.m4.set_variant(choice):
        raise ValueError(f"kernel variant {name!r} cannot run on this CPU (it runs: "
                         f"{', '.join(runnable)}; compiled in: "
                         f"{', '.join(torch.ops.m4.compiled_variants())})")
    return variant()


def variant() -> str:
    """The variant in use, or "" without the kernels."""
    return str(torch.ops.m4.get_variant()) if available() else ""


def runnable_variants() -> list[str]:
    """The variants this CPU runs, best first ([] without the kernels)."""
    return list(torch.ops.m4.runnable_variants()) if available() else []


def cpu_features() -> list[str]:
    """The CPU features the dispatcher saw (CPUID / the auxiliary vector)."""
    return list(torch.ops.m4.cpu_features()) if available() else []


def set_threads(n: int) -> int:
    """Threads the kernels' loops use, the calling one included (their own pool, apart from
    torch's: see ``Pool`` in csrc/pool.h); 0 = one per CPU. Returns the count in effect
    (1 when the kernels are not available)."""
    if not available():
        return 1
    torch.ops.m4.set_threads(n if n > 0 else (os.cpu_count() or 1))
    return int(torch.ops.m4.get_threads())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["build"]:
        print("usage: python -m m4d.model.kernels build [DIR]", file=sys.stderr)
        return 2
    out_dir = Path(args[1]) if len(args) > 1 else BUILD_DIR
    existing = out_dir / library_name()
    path = existing if existing.is_file() else build(out_dir)
    print(f"m4 kernels: {path} (variants: "
          f"{', '.join(v.name for v in variants_for(arch()))})")
    return 0
