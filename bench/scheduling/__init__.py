"""Benchmark (outside the serving pipeline): the sections of bench_scheduling.py.

* `scheduling.batching`: 1. continuous batching, aggregate decode rate at N streams against
  one stream and against llama.cpp's single stream;
* `scheduling.priorities`: 2. foreground time to first token, idle and under a background
  load that runs in another process;
* `scheduling.embed`: 3. dynamic encoder batching, single-sentence Embed calls in flight;
* `scheduling.report`: what the three measured, summarised into one table and its notes.

The workload of section 1 (prompt and generation lengths, KV slots) is the shared
`benchkit.streams` N-stream measurement; the settings only this bench has are here.
"""

from __future__ import annotations

STREAM_COUNTS = (1, 4, 16, 32)
FG_NEW_TOKENS = 8  # tokens of each foreground probe
TARGET_VS_LLAMA = 5.0  # 16-stream aggregate / llama.cpp single stream, at least
TARGET_TTFT_P99 = 2.0  # loaded / idle foreground p99 time to first token, at most
