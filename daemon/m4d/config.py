"""Every setting of m4d and its default, in one place.

Sources, later ones winning: the defaults below, the TOML config file
(`/etc/m4/m4d.toml`, or `--config`), environment variables `M4D_<KEY>` (upper case), and
command-line flags. Every value is validated here; an error names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path("/etc/m4/m4d.toml")
RUNTIME_DIR = Path("/run/m4")
STATE_DIR = Path("/var/lib/m4")

WEIGHT_FORMATS = ("int4", "w4a8", "int8", "w8a8", "bfloat16", "float32")
# "auto" and the kernel variants m4d.model.kernels builds (VARIANTS there)
KERNEL_VARIANTS = ("auto", "avx512vnni", "avxvnni", "avx2", "neon_i8mm", "neon_dotprod", "scalar")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
SELF_TEST_MODES = ("strict", "warn", "off")
QUEUE_POLICIES = ("fair", "priority", "fcfs")
IMAGE_SOURCES = ("image", "store")
SWAP_MODES = ("overlap", "drain")


class ConfigError(ValueError):
    """A setting is wrong; the message names the key, the source and the fix."""


CLASS_NAMES = ("system", "foreground", "background")  # priority classes, most urgent first
_TABLE_KEY = re.compile(r"[a-z0-9_][a-z0-9_\-]*")
DEVICE_NAME = re.compile(r"^(cpu|mps|cuda|xpu)(?::(\d+))?$")


def check_placement(placement: dict[str, str]) -> None:
    """Placement keys are component names or kinds (or `default`), values device names or
    "auto"; whether the device exists is checked when the image loads (m4d.executor.devices)."""
    if not placement:
        raise ConfigError('placement must not be empty; use { default = "cpu" }')
    for key, value in placement.items():
        if not _TABLE_KEY.fullmatch(key):
            raise ConfigError(f"placement: {key!r} is not a component name or kind "
                              "(lower-case letters, digits, '_' and '-')")
        if not isinstance(value, str) or (value != "auto" and not DEVICE_NAME.match(value)):
            raise ConfigError(
                f"placement.{key} must be \"auto\" or a device name such as \"cpu\", "
                f"\"cuda:0\", \"xpu:0\" or \"mps\" (got {value!r})")


def resolve_uid(key: str) -> int:
    """A uid table key: a number, or a user name looked up now."""
    if key.isdigit():
        return int(key)
    try:
        return pwd.getpwnam(key).pw_uid
    except KeyError:
        raise ConfigError(f"uid_max_class: no user named {key!r} (use a uid number or an "
                          "existing user name)") from None


@dataclass(frozen=True)
class Config:
    """The daemon's settings. Field comments are the documentation of each key."""

    # Unix socket for apps (the Inference service, health, reflection).
    app_socket: Path = RUNTIME_DIR / "app.sock"
    # Unix socket for administrators (the Admin service). Separate from the app socket.
    admin_socket: Path = RUNTIME_DIR / "admin.sock"
    # File mode of the app socket: every local app may connect.
    app_socket_mode: int = 0o666
    # File mode of the admin socket: owner and admin group only.
    admin_socket_mode: int = 0o660
    # The firmware image directory to serve.
    image: Path = STATE_DIR / "images" / "default"
    # How backbone weights are held in memory. w4a8 keeps the checkpoint's GGUF blocks (Q4_0,
    # Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0) exactly as stored and runs m4's kernels, in the
    # variant for this CPU (activations quantized per block to two int8 digits inside each
    # GEMM, float32 between them, a bf16 KV cache): the fastest format and the closest to
    # float32 (bench/README.md). Without a kernel build it runs as int4: the same weights on
    # torch's int4 kernel, in compute_dtype. w8a8: int8 weights per channel (m4d.model.quant); refused at start
    # where the CPU's int8 GEMM is not exact (oneDNN without VNNI, e.g. AVX2-only CPUs).
    weight_format: str = "w4a8"
    # The dtype of activations (text encoder, media components, the KV cache, and backbone
    # formats other than w4a8). "auto": bfloat16 where the CPU has bf16 arithmetic
    # (AVX512_BF16 or AMX on x86, BF16 on ARM), float32 elsewhere (emulated bf16 is several
    # times slower than float32; m4d.executor.cpu), except that int4/int8 backbones get
    # bfloat16 (torch's int4/int8 kernels are 15-70x slower with float32 on any CPU) and
    # bfloat16/float32 backbones their own dtype. The log and `m4ctl status` show the result.
    compute_dtype: str = "auto"
    # Torch threads for the executor; 0 means one per CPU core but one (at least one),
    # which leaves a core to the event loop and gRPC: on 2 cores, 2 torch threads beside a
    # busy event loop decoded slower (20-28 tok/s) than 1 (30-34 tok/s). With components on
    # an accelerator, 0 also leaves a core to each accelerator's executor thread.
    threads: int = 0
    # Threads for m4's own kernels (w4a8 GEMMs, decode attention), the executor's included;
    # 0 means one per CPU core. Their helpers join a loop only when the OS gives them a core
    # and run at nice +10, so the event loop keeps priority (m4d/model/kernels).
    kernel_threads: int = 0
    # Which of m4's kernel variants runs (one per instruction set, all computing the same
    # numbers): "auto" picks the best this CPU supports (avx512vnni, avxvnni, avx2, scalar on
    # x86; neon_i8mm, neon_dotprod, scalar on ARM); a name forces that one, and a variant the
    # CPU cannot run stops the daemon with the list it can. M4_KERNEL_VARIANT does the same for any
    # process that loads the kernels. `m4ctl status` shows the variant in use.
    kernel_variant: str = "auto"
    # Where each component runs: a table from component name ("backbone", "text_encoder")
    # or kind ("llama", "bert") to a device ("cpu", "cuda:0", "xpu:0", "mps", or "auto": the
    # best accelerator found, else cpu), with `default` for the rest. A device this machine
    # does not have stops the daemon with an error listing the devices found.
    placement: dict[str, str] = field(default_factory=lambda: {"default": "cpu"})
    # Generation sequences that can run at once (KV cache rows).
    kv_slots: int = 16
    # Longest sequence (prompt + generated tokens) a request may use.
    max_context: int = 2048
    # Prompt tokens per prefill chunk; chunks start at multiples of this, whatever the load.
    prefill_chunk: int = 256
    # Tokens the model processes per scheduler step: a decode token per running sequence
    # plus prompt chunks. Must be at least prefill_chunk + kv_slots.
    step_token_budget: int = 512
    # Requests waiting for a KV slot before new ones are refused with UNAVAILABLE.
    max_queue: int = 64
    # Queue policy: "fair" (priority classes, weighted fair share per uid, aging),
    # "priority" (strict classes) or "fcfs".
    queue_policy: str = "fair"
    # Seconds a starved class waits before it is served as the next more urgent one.
    aging_seconds: float = 5.0
    # Fair share over KV slots (queue_policy "fair"): a uid waiting for a slot takes one from
    # the uid of its class furthest over its share (the sequence is preempted and later
    # recomputed from prompt + generated tokens, to the same greedy output), but only from a
    # sequence that has generated this many tokens since it last got its slot.
    min_run_tokens: int = 16
    # Backpressure: a generation stream holding this many tokens its client has not read yet
    # pauses (no decode work; its KV slot may go to others) until the client has read half
    # of them. 0 never pauses.
    stream_pause_tokens: int = 256
    # A paused stream whose client reads nothing for this many seconds is cancelled
    # (CANCELLED; counted as stalled in `m4ctl status`).
    stream_stall_seconds: float = 30.0
    # Requests one uid may have in flight; more get RESOURCE_EXHAUSTED.
    uid_max_concurrent: int = 32
    # Of those, requests one uid may have waiting to start; more get RESOURCE_EXHAUSTED with
    # a retry hint. 16 leaves room in max_queue (64) for four apps that queue all they may.
    uid_max_queued: int = 16
    # KV slots one uid's sequences may hold at once; its other requests wait while other
    # apps' requests start. 0 means kv_slots less a quarter of them (12 of 16), so a quarter of
    # the slots stays free for up to four other apps' first requests without a preemption.
    uid_max_running: int = 0
    # Tokens (prompt + max_tokens) of one uid's requests in flight, summed; a request that
    # would pass it gets RESOURCE_EXHAUSTED with a retry hint (a uid with nothing in flight
    # is always admitted). 8192 is a quarter of kv_slots * max_context: room for four apps.
    # 0 means no limit; otherwise at least max_context.
    uid_max_tokens_in_flight: int = 8192
    # Tokens (prompt + max_tokens) per second one uid may ask for; 0 means no limit.
    uid_tokens_per_second: float = 0.0
    # The most urgent priority class each listed uid (number or user name) may run as,
    # whatever it asks for, e.g. { 65534 = "background" }; others may ask for any class.
    uid_max_class: dict[str, str] = field(default_factory=dict)
    # KV cache tokens shared by all sequences (blocks of 16); 0 means kv_slots * max_context.
    kv_pool_tokens: int = 0
    # KV cache tokens of preempted sequences kept aside, so they resume without recomputing
    # (memory only while they wait: ~46 KB a token for a float32 cache); 0: recompute.
    kv_park_tokens: int = 8192
    # Prompt KV kept for reuse by later prompts with the same start (any app), in blocks of
    # 64 tokens, evicted least recently used; memory ~46 KB a token at float32.
    # 0: no prefix cache.
    prefix_cache_tokens: int = 4096
    # Memory for the task adapters (LoRA) kept loaded, in MiB, for the backbone's and again
    # for the text encoder's; beyond it the least recently used one is dropped (and read
    # again from the image on its next request).
    adapter_memory_mb: int = 64
    # Most texts in one Embed call, and most texts the encoder runs in one batch.
    max_batch_texts: int = 64
    # Longest text accepted in any field, in characters.
    max_text_chars: int = 32_768
    # Largest request message, in bytes; larger ones are refused by gRPC.
    max_message_bytes: int = 16 * 1024 * 1024
    # Largest encoded image accepted (PNG, JPEG, WebP), in bytes.
    max_image_bytes: int = 10 * 1024 * 1024
    # Most pixels (width * height) an image may declare; checked before decoding.
    max_image_pixels: int = 16_777_216
    # Longest audio accepted, in seconds (one Whisper window is 30 s).
    max_audio_seconds: float = 30.0
    # Most images or audio clips the media encoders run in one batch.
    max_batch_media: int = 8
    # max_tokens when a Generate call does not say (and the room a session's turn keeps for
    # its reply when it does not say).
    default_max_tokens: int = 256
    # Sessions one uid may hold at once (each is its transcript, a few KB; its KV lives in
    # the prefix cache, which evicts idle sessions' blocks first); more: RESOURCE_EXHAUSTED.
    sessions_per_uid: int = 256
    # Seconds in-flight calls get to finish after SIGTERM before they are cut off.
    drain_timeout: float = 30.0
    # Run the image's self-test at start: strict = refuse to serve when it fails.
    self_test: str = "strict"
    # Log lines as JSON objects (for journald and collectors) or as plain text.
    log_format: str = "json"
    # Least severe level that is logged.
    log_level: str = "info"
    # Prometheus text endpoint (GET /metrics): "" is off, "unix:/run/m4/metrics.sock" a
    # Unix socket, "127.0.0.1:9464" loopback TCP.
    metrics_listen: str = ""
    # Where the image comes from: "image" serves the `image` directory as it is (development:
    # hashes checked, signature not); "store" boots from the image store in state_dir (trial
    # attempts, self-test, fallback to the last good image) and seeds an empty store with the
    # `image` directory as the factory image.
    image_source: str = "image"
    # The image store: images/<digest>/, state.json (active, previous, trial, history).
    state_dir: Path = STATE_DIR
    # Trusted image-signing keys (*.pub) and revocations (revoked/<key id>).
    keys_dir: Path = Path("/etc/m4/keys")
    # Refuse to install or boot from the store an image whose signature does not verify
    # against keys_dir. false is for development only.
    require_signature: bool = True
    # This device's compatible string; images built for another device are refused.
    compatible: str = "m4-cpu-v1"
    # Boots a trial image gets before the daemon falls back to the last good image.
    max_boot_attempts: int = 3
    # Group (besides root and the daemon's own user) allowed to call the admin service.
    admin_group: str = "m4-admin"
    # Hot swap on activate/rollback: "overlap" loads the new image beside the old one (twice
    # the memory, no call refused); "drain" unloads the old one first (calls get UNAVAILABLE
    # with a retry hint until the new one serves: at most drain_timeout + load + self-test).
    swap_mode: str = "overlap"
    # The most resident memory (MiB) the daemon may hold during an "overlap" swap: when what
    # it holds now plus what the new image does not share with the loaded one (its weight
    # files of other content, and 64 MiB for its self-test) would pass this, that swap
    # drains the old image first instead. 0: no limit.
    swap_memory_mb: int = 0

    def __post_init__(self) -> None:
        _check_choice("weight_format", self.weight_format, WEIGHT_FORMATS)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("log_format", self.log_format, LOG_FORMATS)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        _check_choice("self_test", self.self_test, SELF_TEST_MODES)
        _check_choice("queue_policy", self.queue_policy, QUEUE_POLICIES)
        _check_choice("image_source", self.image_source, IMAGE_SOURCES)
        _check_choice("swap_mode", self.swap_mode, SWAP_MODES)
        check_placement(self.placement)
        for key, value in self.uid_max_class.items():
            if value not in CLASS_NAMES:
                raise ConfigError(f"uid_max_class.{key} must be one of "
                                  f"{', '.join(CLASS_NAMES)} (got {value!r})")
            resolve_uid(key)
        if self.max_boot_attempts < 1:
            raise ConfigError(f"max_boot_attempts must be >= 1 (got {self.max_boot_attempts})")
        if not self.admin_group or not self.compatible:
            raise ConfigError("admin_group and compatible must not be empty")
        if self.kernel_variant not in KERNEL_VARIANTS:
            raise ConfigError(f"kernel_variant must be one of {', '.join(KERNEL_VARIANTS)} "
                              f"(got {self.kernel_variant!r})")
        for key in ("aging_seconds", "uid_tokens_per_second", "kv_pool_tokens", "kv_park_tokens",
                    "prefix_cache_tokens", "adapter_memory_mb", "kernel_threads", "uid_max_running",
                    "uid_max_tokens_in_flight", "stream_pause_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (got {getattr(self, key)})")
        if self.weight_format in ("int4", "int8") and self.compute_dtype == "float32":
            raise ConfigError(
                f"weight_format={self.weight_format} needs compute_dtype=bfloat16 or auto "
                "(the CPU int4/int8 kernels take bfloat16 activations)"
            )
        if (self.weight_format in ("bfloat16", "float32")
                and self.compute_dtype not in (self.weight_format, "auto")):
            raise ConfigError(
                f"weight_format={self.weight_format} computes in {self.weight_format}; "
                f"set compute_dtype={self.weight_format} or auto")
        for key in ("kv_slots", "max_context", "prefill_chunk", "step_token_budget", "max_queue",
                    "max_batch_texts", "max_text_chars", "max_message_bytes", "uid_max_concurrent",
                    "default_max_tokens", "max_image_bytes", "max_image_pixels", "max_batch_media",
                    "min_run_tokens", "uid_max_queued", "sessions_per_uid"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0 (got {getattr(self, key)})")
        if self.step_token_budget < self.prefill_chunk + self.kv_slots:
            raise ConfigError(
                f"step_token_budget ({self.step_token_budget}) must be at least prefill_chunk "
                f"+ kv_slots ({self.prefill_chunk} + {self.kv_slots}) so a prompt chunk always "
                "fits beside every decoding sequence")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (got {self.threads}); 0 means all cores "
                              "but one")
        if not 0 < self.max_audio_seconds <= 30.0:
            raise ConfigError(f"max_audio_seconds must be in (0, 30] (got {self.max_audio_seconds}); "
                              "the speech model reads one 30-second window")
        if self.max_image_bytes > self.max_message_bytes:
            raise ConfigError(f"max_image_bytes ({self.max_image_bytes}) must not exceed "
                              f"max_message_bytes ({self.max_message_bytes})")
        if self.stream_stall_seconds <= 0:
            raise ConfigError(f"stream_stall_seconds must be > 0 (got {self.stream_stall_seconds})")
        if self.swap_memory_mb < 0:
            raise ConfigError(f"swap_memory_mb must be >= 0 (got {self.swap_memory_mb})")
        if self.drain_timeout < 0:
            raise ConfigError(f"drain_timeout must be >= 0 seconds (got {self.drain_timeout})")
        if 0 < self.uid_max_tokens_in_flight < self.max_context:
            raise ConfigError(
                f"uid_max_tokens_in_flight ({self.uid_max_tokens_in_flight}) must be 0 (no "
                f"limit) or at least max_context ({self.max_context}), or a long request could "
                "never be admitted")
        if self.default_max_tokens >= self.max_context:
            raise ConfigError(
                f"default_max_tokens ({self.default_max_tokens}) must be below "
                f"max_context ({self.max_context})"
            )

    def max_running(self) -> int:
        """uid_max_running with 0 resolved: kv_slots less a quarter of them, rounded down."""
        return self.uid_max_running or self.kv_slots - self.kv_slots // 4

    def class_caps(self) -> dict[int, int]:
        """uid_max_class as uid -> class number (0 system, 1 foreground, 2 background)."""
        return {resolve_uid(k): CLASS_NAMES.index(v) for k, v in self.uid_max_class.items()}


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)} (got {value!r})")


_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "Path": "a non-empty path string",
             "dict[str, str]": 'a table of strings, e.g. { default = "cpu" }'}


def _table(key: str, raw: Any) -> dict[str, str]:
    """A table setting from TOML (a table, or a bare string meaning { default = it }) or
    from the environment or a flag ("name=value,name=value", or one bare value)."""
    if isinstance(raw, dict):
        if not all(isinstance(v, str) for v in raw.values()):
            raise TypeError(_EXPECTED["dict[str, str]"])
        return {str(k): v for k, v in raw.items()}
    if not isinstance(raw, str):
        raise TypeError(_EXPECTED["dict[str, str]"])
    table: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            if key != "placement":
                raise TypeError(f"name=value pairs separated by commas (got {item!r})")
            name, value = "default", item
        table[name.strip()] = value.strip().strip('"')
    return table


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _coerce(key: str, raw: Any, source: str) -> Any:
    """Turns a raw value (TOML value or environment string) into the field's type."""
    kind = str(_fields()[key].type)
    try:
        if kind == "dict[str, str]":
            return _table(key, raw)
        if kind == "Path":
            if not isinstance(raw, str) or not raw:
                raise TypeError("a non-empty path string")
            return Path(raw)
        if kind == "int":
            if isinstance(raw, bool):
                raise TypeError("an integer")
            if isinstance(raw, str):
                return int(raw, 0)  # accepts 0o660 for socket modes
            if not isinstance(raw, int):
                raise TypeError("an integer")
            return raw
        if kind == "float":
            if isinstance(raw, bool):
                raise TypeError("a number")
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
                return raw.lower() in ("true", "1", "yes")
            raise TypeError("true or false")
        if kind == "str":
            if not isinstance(raw, str):
                raise TypeError("a string")
            return raw
    except (TypeError, ValueError) as exc:
        expected = exc.args[0] if isinstance(exc, TypeError) else _EXPECTED[kind]
        raise ConfigError(f"{source}: {key} must be {expected} (got {raw!r})") from None
    raise AssertionError(f"unhandled config type {kind} for {key}")


def load_config(
    config_file: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Builds the Config from file, environment and flag overrides (in that order)."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    fields = _fields()

    path = config_file
    if path is None and env.get("M4D_CONFIG"):
        path = Path(env["M4D_CONFIG"])
    explicit = path is not None
    path = path or DEFAULT_CONFIG_FILE
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for key, raw in data.items():
            if key not in fields:
                raise ConfigError(
                    f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(fields))}"
                )
            values[key] = _coerce(key, raw, str(path))
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")

    for key in fields:
        name = f"M4D_{key.upper()}"
        if name in env:
            values[key] = _coerce(key, env[name], f"environment {name}")

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = raw if not isinstance(raw, str) else _coerce(key, raw, f"--{key}")

    try:
        return Config(**values)
    except ConfigError as exc:
        source = str(path) if path.exists() else "settings"
        raise ConfigError(f"{source}: {exc}") from None


def describe_defaults() -> list[tuple[str, Any]]:
    """(key, default) pairs, for `m4d --print-config` and documentation."""
    cfg = Config()
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(Config)]


__all__ = ["Config", "ConfigError", "describe_defaults", "load_config"]
