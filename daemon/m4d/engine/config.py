"""The engine's settings: its limits and the policies it runs with. The daemon fills an
`EngineConfig` from its own settings (m4d.config); tests build small ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from m4d.engine.admission import AdmissionConfig
from m4d.engine.backpressure import BackpressureConfig
from m4d.engine.goodput import GoodputConfig
from m4d.engine.latency import LatencyConfig
from m4d.engine.policy import QueuePolicy


@dataclass(frozen=True)
class EngineConfig:
    kv_slots: int  # KV cache rows: sequences that generate at once
    token_budget: int  # tokens per model step
    prefill_chunk: int  # prompt tokens per chunk
    max_queue: int  # requests that cannot start now, beyond which submit() answers busy
    max_batch_texts: int  # texts per encoder batch
    max_batch_media: int = 8  # requests per media batch
    encoder_max_wait: float = 0.002  # seconds a partial encoder batch may wait for more
    kv_tokens: int | None = None  # a KV memory pool of this many tokens; None: rows limit
    kv_block: int = 16  # tokens per block of the pool
    policy: QueuePolicy | str = "fair"  # the order waiting generation gets KV rows in
    min_run_tokens: int = 16  # tokens a sequence generates before its own class may preempt it
    park_tokens: int = 0  # KV tokens of preempted sequences kept aside (0: they recompute)
    prefix_cache_tokens: int = 0  # prompt KV kept for reuse (0: off)
    prefix_block: int = 64  # tokens per block of the prefix cache
    admission: AdmissionConfig | None = None  # per-uid quotas, limits per priority
    latency: LatencyConfig = field(default_factory=LatencyConfig)  # background vs urgent
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)  # slow readers
    goodput: GoodputConfig = field(default_factory=GoodputConfig)  # deadline-aware admission
