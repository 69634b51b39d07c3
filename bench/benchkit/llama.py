"""Benchmark helpers (outside the serving pipeline): llama-cpp-python, the decoder reference.

llama-cpp-python is an optional extra. `--llama-cpp DIR` (see `use_llama_cpp`) loads the
build installed in DIR with `pip install --no-deps --target DIR <wheel>` instead, e.g. one
built for another instruction set; `load_llama` labels the model with its file type and the
build's SIMD level. `llama_generate` does the work of a greedy generation the way m4d does it
(one batch for the prompt, then one eval and one argmax per token).
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchkit.cpu import OtherCpuMeter
from benchkit.imports import serve_from, top_level_names
from benchkit.streams import GenSample

LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
LLAMA_RUNS_PER_ROUND = 3


def use_llama_cpp(path: Path | None) -> None:
    """Makes `import llama_cpp` load the build installed in `path` (a directory holding the
    llama_cpp package and its dependencies, as `pip install --no-deps --target DIR <wheel>`
    leaves it); None keeps the installed one. Must run before anything imports llama_cpp."""
    if path is None:
        return
    if not (path / "llama_cpp" / "__init__.py").is_file():
        raise SystemExit(f"--llama-cpp {path}: no llama_cpp package in that directory")
    if "llama_cpp" in sys.modules:
        raise RuntimeError("llama_cpp was imported before --llama-cpp could choose the build")
    serve_from(path, top_level_names(path))


def llama_build(llama_cpp: Any) -> str:
    """Which build of llama.cpp is loaded: its x86 SIMD level from llama_print_system_info
    (the flags it was compiled with) and where it was loaded from."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    on = set(re.findall(r"(\w+) = 1", info))
    isa = next((name for name in ("AVX512_VNNI", "AVX512", "AVX_VNNI", "AVX2", "AVX", "NEON")
                if name in on), "no SIMD")
    return f"{isa.replace('_', '-')} build in {Path(llama_cpp.__file__).parent.parent}"


def gguf_file_type(gguf: Path) -> str:
    """The GGUF's file type as llama.cpp names it (Q4_1, Q4_K_M, ...), from its metadata."""
    import gguf as gguf_py

    field = gguf_py.GGUFReader(str(gguf)).fields.get("general.file_type")
    if field is None:
        return "GGUF"
    code = int(field.parts[field.data[0]][0])
    return str(gguf_py.LlamaFileType(code).name).removeprefix("MOSTLY_")


def load_llama(gguf: Path, threads: int) -> tuple[Any, str]:
    """(Llama, label) or (None, why not) — llama-cpp-python is an optional extra."""
    try:
        import llama_cpp
    except ImportError:
        return None, f"llama.cpp: not installed (pip install {LLAMA_CPP_PIN})"
    if not gguf.is_file():
        return None, f"llama.cpp: GGUF not found at {gguf}"
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                          n_batch=512, n_ctx=2048, logits_all=False, verbose=False)
    return llm, (f"llama.cpp {llama_cpp.__version__} {gguf_file_type(gguf)}, {threads} threads, "
                 f"{llama_build(llama_cpp)}")


def llama_generate(llm: Any, prompt_ids: list[int], new_tokens: int) -> GenSample:
    """Greedy generation with llama-cpp-python's eval(): one batch for the prompt, then one
    eval per token; the argmax of the last logits is part of each step's time."""
    import llama_cpp

    n_vocab = llm.n_vocab()

    def greedy() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    llm.reset()  # the next eval() starts at position 0 and drops the old KV cells
    start = time.perf_counter()
    llm.eval(prompt_ids)
    token = greedy()
    first = time.perf_counter()
    ids = [token]
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = greedy()
        ids.append(token)
    last = time.perf_counter()
    return GenSample(
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(ids),
        prefill_tps=len(prompt_ids) / (first - start),
        decode_tps=(len(ids) - 1) / (last - first),
        client_ttft_ms=(first - start) * 1e3,
        token_ids=ids,
    )


@dataclass
class LlamaRun:
    """Back-to-back llama.cpp generations; llama.cpp's spinning threads collapse (to a tenth
    of their speed) while another process takes a core, so each run's contention is kept
    and the round's value is the median run."""

    decode_tps: float  # the median run's
    runs_tps: list[float]
    runs_other_cpu: list[float]
    token_ids: list[int]


def llama_round(llm: Any, prompt_ids: list[int], pids: list[int], new_tokens: int,
                runs: int = LLAMA_RUNS_PER_ROUND) -> LlamaRun:
    """`runs` generations of `new_tokens`, each with the share of the CPUs that processes
    other than `pids` used meanwhile."""
    rates, others = [], []
    ids: list[int] = []
    for _ in range(runs):
        meter = OtherCpuMeter(pids)
        sample = llama_generate(llm, prompt_ids, new_tokens)
        others.append(meter.other_share())
        rates.append(sample.decode_tps)
        ids = sample.token_ids
    return LlamaRun(statistics.median(rates), rates, others, ids)
