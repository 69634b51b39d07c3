"""Observability: the engine's counters in the Prometheus text format, over plain HTTP.

Off by default (`metrics_listen = ""`). `unix:/run/m4/metrics.sock` serves on a Unix
socket (what the hardened unit allows; a scraper reaches it through a socket proxy or
`curl --unix-socket`), `127.0.0.1:9464` on loopback TCP. Only `GET /metrics` is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
from collections.abc import Callable
from pathlib import Path

from m4d.engine.stats import TTFT_BUCKETS, EngineSnapshot

log = logging.getLogger(__name__)

Snapshot = Callable[[], EngineSnapshot | None]


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# (name, type, help, where in the snapshot): one sample each, in scrape order
_SCALARS = (
    ("m4_queue_depth", "gauge", "Requests waiting for a KV row or the encoder.", "waiting"),
    ("m4_requests_in_flight", "gauge", "Requests queued or running.", "stats.in_flight"),
    ("m4_active_sequences", "gauge", "Generation sequences holding a KV row.",
     "active_sequences"),
    ("m4_kv_slots", "gauge", "KV rows in all.", "kv_slots"),
    ("m4_decode_batch_size", "gauge", "Sequences in the last decode step.", "stats.last_batch"),
    ("m4_requests_total", "counter", "Requests finished, in any way.", "stats.total"),
    ("m4_requests_cancelled_total", "counter", "Requests cancelled or past deadline.",
     "stats.cancelled"),
    ("m4_requests_rejected_total", "counter", "Requests refused at admission.", "stats.rejected"),
    ("m4_sequences_preempted_total", "counter", "Sequences that lost their KV row.",
     "stats.preempted"),
    ("m4_tokens_generated_total", "counter", "Tokens generated.", "stats.tokens_generated"),
    ("m4_tokens_prompted_total", "counter", "Input tokens processed.", "stats.tokens_prompted"),
)
_PER_UID = (("requests", "Requests admitted, per caller uid."),
            ("rejected", "Requests refused, per caller uid."),
            ("tokens_prompted", "Input tokens, per caller uid."),
            ("tokens_generated", "Generated tokens, per caller uid."))


def render(s: EngineSnapshot, image: str = "") -> str:
    """One scrape, from an engine snapshot (Engine.snapshot())."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("m4_info", "gauge", "The firmware image being served.",
           [(f'{{image="{_label(image)}"}}', 1)])
    for name, kind, help_, where in _SCALARS:
        metric(name, kind, help_, [("", operator.attrgetter(where)(s))])
    cumulative, samples = 0, []
    for bound, count in zip(TTFT_BUCKETS, s.stats.ttft_counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        samples.append((f'{{le="{le}"}}', cumulative))
    out.append("# HELP m4_time_to_first_token_seconds From arrival to the first token.")
    out.append("# TYPE m4_time_to_first_token_seconds histogram")
    out.extend(f"m4_time_to_first_token_seconds_bucket{lab} {v}" for lab, v in samples)
    out.append(f"m4_time_to_first_token_seconds_sum {s.stats.ttft_sum:g}")
    out.append(f"m4_time_to_first_token_seconds_count {cumulative}")
    per_uid = sorted(s.stats.per_uid.items())
    for field, help_ in _PER_UID:
        metric(f"m4_uid_{field}_total", "counter", help_,
               [(f'{{uid="{uid}"}}', getattr(u, field)) for uid, u in per_uid])
    return "\n".join(out) + "\n"


class MetricsServer:
    def __init__(self, listen: str, snapshot: Snapshot, image: Callable[[], str]) -> None:
        self.listen = listen
        self.snapshot = snapshot
        self.image = image
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.listen.startswith("unix:"):
            path = Path(self.listen[len("unix:"):])
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._server = await asyncio.start_unix_server(self._handle, path=str(path))
            os.chmod(path, 0o660)
        else:
            host, _, port = self.listen.rpartition(":")
            self._server = await asyncio.start_server(self._handle, host or "127.0.0.1",
                                                      int(port))
        log.info("metrics listening", extra={"metrics": self.listen})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            first = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            snap = self.snapshot()
            if len(first) < 2 or first[0] != "GET" or first[1] != "/metrics":
                status, body = "404 Not Found", "only GET /metrics is served\n"
            elif snap is None:
                status, body = "503 Service Unavailable", "the model is loading\n"
            else:
                status, body = "200 OK", render(snap, self.image())
            data = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
