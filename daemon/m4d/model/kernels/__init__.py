"""M4's own CPU kernels (``m4_kernels.cpp``): batched W4A8/W8A8 GEMMs and decode attention.

The op schemas are declared here, so TorchScript can resolve ``torch.ops.m4.*`` whether or
not the compiled library loaded; callers check :func:`available` before using them.

The library is compiled with the system C++ compiler against the installed torch, once, at
install time: ``python -m m4d.model.kernels build`` (``make setup`` and systemd/install.sh
run it; ~15 s) writes it into the package's ``_build`` directory. Its file name carries a
hash of the source, the compiler flags and the torch version, so a stale build is never
loaded. The daemon never compiles: :func:`load` looks in ``$M4_KERNEL_DIR`` and ``_build``,
and without a build (or without AVX-512 VNNI) :func:`available` is False and the model keeps
torch's kernels.
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
CXX_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread",
             "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
             "-mf16c", "-mfma"]

ATTENTION_HEAD_DIMS = (32, 64, 128)  # what decode_attention is compiled for
_lib = torch.library.Library("m4", "DEF")  # type: ignore[no-untyped-call]
SCHEMAS = (
    "q4_1_linear(Tensor x, Tensor w, Tensor dm, int n, int k, ScalarType out_dtype) -> Tensor",
    "q8_0_linear(Tensor x, Tensor w, Tensor d, int n, int k, ScalarType out_dtype) -> Tensor",
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor pos, "
    "float scale) -> Tensor",
    "decode_layers(Tensor x, Tensor[] layers, Tensor rows, Tensor pos, Tensor cos, Tensor sin, "
    "int n_heads, int n_kv_heads, float eps, float scale) -> Tensor",
    "set_threads(int n) -> ()",
    "get_threads() -> int",
)
for _schema in SCHEMAS:
    _lib.define(_schema)  # type: ignore[no-untyped-call]

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


BUILD_DIR = SOURCE.parent / "_build"


def _candidate_dirs() -> list[Path]:
    dirs = [Path(os.environ["M4_KERNEL_DIR"])] if os.environ.get("M4_KERNEL_DIR") else []
    return [*dirs, BUILD_DIR]


def find_library() -> Path | None:
    name = library_name()
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    return None


def build(out_dir: Path = BUILD_DIR) -> Path:
    """Compiles the library into ``out_dir``; the file appears whole or not at all
    (compiled to a temporary name, then renamed)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".m4_kernels-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        target = out_dir / library_name()
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> bool:
    """Loads the prebuilt library once; returns :func:`available`."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok = False
        if os.environ.get("M4_KERNELS", "1") == "0":
            log.info("m4 kernels disabled by M4_KERNELS=0")
        elif not cpu_supported():
            log.info("m4 kernels need AVX-512 with VNNI; using torch's kernels")
        else:
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
        return ok


def available() -> bool:
    """Whether the compiled ops can be called (loads them on first use)."""
    return load()


def set_threads(n: int) -> int:
    """Threads the kernels' loops use, the calling one included (their own pool, apart from
    torch's: see ``Pool`` in m4_kernels.cpp); 0 = one per CPU. Returns the count in effect
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
    if not cpu_supported():
        print("this CPU lacks AVX-512 VNNI: nothing to build; m4d uses torch's kernels")
        return 0
    out_dir = Path(args[1]) if len(args) > 1 else BUILD_DIR
    existing = out_dir / library_name()
    path = existing if existing.is_file() else build(out_dir)
    print(f"m4 kernels: {path}")
    return 0
