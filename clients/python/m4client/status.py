"""What the Admin service reports (`AdminClient.status()`): the daemon's state, its image's
components, the engine's load, each caller uid's use and the machine's devices. Small
dataclasses, no protobuf; also importable from `m4client.types`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ComponentStatus:
    """One module of the loaded image."""

    name: str
    kind: str
    parameters: int
    weight_format: str
    compute_dtype: str
    device: str
    kernels: str = ""  # the m4 CPU kernel variant, e.g. "avx2" ("" = torch's kernels)


@dataclass(frozen=True)
class UidUsage:
    """What one caller uid has asked of the daemon (the uid is the kernel's; apps are labels)."""

    uid: int
    user: str  # "" when the uid has no user name
    apps: list[str]
    requests_ok: int
    requests_failed: int
    requests_rejected: int
    tokens_in: int
    tokens_out: int
    tokens_per_second: float  # generated, over the recent window
    in_flight: int
    queued: int
    priority_class: str  # class of its latest request after caps; "" before any
    running: int = 0  # KV slots it holds now
    tokens_in_flight: int = 0  # prompt + max_tokens of its requests in flight
    preempted: int = 0  # times its sequences lost a KV slot and resumed later
    stalled: int = 0  # its streams cancelled because it read nothing for too long


@dataclass(frozen=True)
class UidLimits:
    """The caps every caller uid runs under; 0 means no limit."""

    max_in_flight: int = 0
    max_queued: int = 0
    max_running: int = 0  # KV slots
    max_tokens_in_flight: int = 0


@dataclass(frozen=True)
class MemoryUsage:
    """What the daemon's resident memory holds (bytes). rss = weights_mapped_resident +
    weights_converted + kv_resident + runtime."""

    rss_bytes: int
    weights_mapped_bytes: int  # weights used in place from the image's mapped files
    weights_mapped_resident_bytes: int  # of their pages, resident in the daemon now
    weights_converted_bytes: int  # weights converted at load (private memory)
    kv_resident_bytes: int  # KV cache in RAM now; grows and shrinks with the sequences
    kv_reserved_bytes: int  # KV address space for every slot at the longest context
    kv_budget_bytes: int  # the most KV sequences may hold at once
    runtime_bytes: int  # Python, torch, gRPC, activations, parked and prefix-cached KV


@dataclass(frozen=True)
class EngineLoad:
    """The engine's load right now, and rates over a recent window."""

    queues: dict[str, int]  # priority class -> requests waiting to start
    running_sequences: int
    decode_batch_size: int
    kv_blocks_used: int
    kv_blocks_total: int
    decode_tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_samples: int
    window_seconds: float
    uid_limits: UidLimits = UidLimits()
    paused_sequences: int = 0  # waiting for their clients to read (backpressure)


@dataclass(frozen=True)
class DeviceStatus:
    """A device the daemon's machine has, and the components placed on it."""

    name: str
    kind: str
    description: str
    memory_bytes: int
    cores: int
    flags: list[str]
    components: list[str]
    executor: str  # the executor thread running its work, "" when unused


@dataclass(frozen=True)
class DaemonStatus:
    """What the daemon is running and how busy it is (AdminClient.status)."""

    image_name: str
    image_version: str
    image_digest: str
    daemon_version: str
    state: str
    uptime_seconds: float
    memory_rss_bytes: int
    requests_in_flight: int
    requests_total: int
    requests_cancelled: int
    requests_rejected: int
    tokens_generated: int
    tokens_prompted: int
    active_sequences: int
    kv_slots: int
    components: list[ComponentStatus]
    threads: int
    image_operation: str = ""  # the image operation in progress ("" when none)
    load: EngineLoad | None = None  # None while the model loads
    uids: list[UidUsage] = field(default_factory=list)  # lowest uid first
    devices: list[DeviceStatus] = field(default_factory=list)  # cpu first
    requests_stalled: int = 0  # of requests_cancelled: their clients stopped reading
    prefix_cache_tokens: int = 0  # prompt tokens whose KV the prefix cache holds now
    prefix_tokens_reused: int = 0  # prompt tokens taken from it since start
    memory: MemoryUsage | None = None  # by part; None while no image is loaded
    raw: Any = field(default=None, repr=False, compare=False)
