"""M4's own CPU kernels (``m4_kernels.cpp``): batched W4A8/W8A8 GEMMs and decode attention.

The op schemas are declared here, so TorchScript can resolve ``torch.ops.m4.*`` whether or
not the compiled library loaded; callers check :func:`available` before using them.

The library is compiled with the system C++ compiler against the installed torch, once, by
``python -m m4d.model.kernels build`` (``make setup`` runs it). Its file name carries a hash
of the source, the compiler flags and the torch version, so a stale build is never loaded.
If no build is found, :func:`load` compiles one into the first writable of ``$M4_KERNEL_DIR``,
the package's ``_build`` directory and ``~/.cache/m4d/kernels`` (about a minute). The kernels
need AVX-512 with VNNI; on other CPUs :func:`available` is False and the model keeps torch's
kernels.
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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("m4_kernels.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")
CXX_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
             "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
             "-mf16c", "-mfma"]

_lib = torch.library.Library("m4", "DEF")
_lib.define("q4_1_linear(Tensor x, Tensor w, Tensor dm, int n, int k, ScalarType out_dtype) -> Tensor")
_lib.define("q8_0_linear(Tensor x, Tensor w, Tensor d, int n, int k, ScalarType out_dtype) -> Tensor")
_lib.define("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor pos, "
            "float scale) -> Tensor")

_state: dict[str, bool] = {}
_lock = threading.Lock()


def cpu_supported() -> bool:
    """Whether this CPU has every instruction set the library is compiled for (x86-64 Linux)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return all(f in have for f in CPU_FLAGS)
    return False


def _torch_paths() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension
    return cpp_extension.include_paths(), cpp_extension.library_paths()


def _compile_command(output: Path) -> list[str]:
    includes, libdirs = _torch_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX", "c++"), *CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in includes]
    cmd += [str(SOURCE), "-o", str(output)]
    cmd += [f"-L{p}" for p in libdirs] + ["-lc10", "-ltorch_cpu"]
    cmd += [f"-Wl,-rpath,{p}" for p in libdirs]
    return cmd


def library_name() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CXX_FLAGS).encode())
    h.update(torch.__version__.encode())
    return f"m4_kernels-{h.hexdigest()[:16]}.so"


def _candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("M4_KERNEL_DIR"):
        dirs.append(Path(os.environ["M4_KERNEL_DIR"]))
    dirs.append(SOURCE.parent / "_build")
    dirs.append(Path.home() / ".cache" / "m4d" / "kernels")
    return dirs


def find_library() -> Path | None:
    name = library_name()
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    return None


def build(out_dir: Path | None = None) -> Path:
    """Compiles the library into ``out_dir`` (or the first writable candidate); the file
    appears whole or not at all (compiled to a temporary name, then renamed)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    dirs = [out_dir] if out_dir is not None else _candidate_dirs()
    errors = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".m4_kernels-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as exc:
            errors.append(f"{d}: {exc}")
            continue
        try:
            proc = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
            target = d / library_name()
            os.replace(tmp, target)
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no writable directory for the kernel library: " + "; ".join(errors))


def load() -> bool:
    """Loads (building if needed) the library once; returns :func:`available`."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok = False
        if os.environ.get("M4_KERNELS", "1") == "0":
            log.info("m4 kernels disabled by M4_KERNELS=0")
        elif not cpu_supported():
            log.info("m4 kernels need AVX-512 with VNNI; using torch's kernels")
        else:
            try:
                path = find_library() or build()
                torch.ops.load_library(str(path))
                ok = True
            except Exception as exc:  # no compiler, no headers, no writable dir: run without
                log.warning("m4 kernels unavailable, using torch's kernels: %s", exc)
        _state["ok"] = ok
        return ok


def available() -> bool:
    """Whether the compiled ops can be called (loads them on first use)."""
    return load()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["build"]:
        print("usage: python -m m4d.model.kernels build [DIR]", file=sys.stderr)
        return 2
    if not cpu_supported():
        print("this CPU lacks AVX-512 VNNI: nothing to build; m4d uses torch's kernels")
        return 0
    existing = find_library() if len(args) < 2 else None
    path = existing or build(Path(args[1]) if len(args) > 1 else None)
    print(f"m4 kernels: {path}")
    return 0
