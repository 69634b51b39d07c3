"""Benchmark (outside the serving pipeline): the parts of bench_fairness.py (issue 15).

* `fairness.apps`: apps as child processes running as other uids;
* `fairness.jobs`: what an app does (flood, probes, burst, unread streams), in its process;
* `fairness.scenarios`: the four measurements, driving the apps from the bench process;
* `fairness.report`: what they measured, as one table with the issue's targets.
"""

from __future__ import annotations

# uids of the apps (the machine runs the bench as root; the children drop to these)
APP_A = 10001  # the flooder of scenario 1, and one of the equal apps of scenario 2
APP_B = 65534  # nobody: the short-request app of scenarios 1 and 4
EQUAL_APPS = (10001, 10002, 10003, 10004)  # scenario 2, and the burst's callers
HOLDERS = (10001, 10002, 10003, 10004, 10005, 10006)  # scenario 4: unread streams

PROBE_TOKENS = 16  # B's requests
FLOOD_STREAMS, FLOOD_UNREAD, FLOOD_TOKENS = 14, 4, 512  # A: 14 x 544 tokens fit 8192
EQUAL_STREAMS, EQUAL_TOKENS = 8, 256  # per equal app
WINDOW_S = 10.0  # Jain's index window
BURST_CALLS, BURST_DEADLINE_S, BURST_TOKENS, BURST_TEXTS = 64, 2.0, 64, 8
UNREAD_STREAMS, UNREAD_TOKENS = 24, 1984  # 4 per holder: 4 x (<=32 + 1984) fit 8192

TARGET_TTFT_RATIO = 2.0  # B's p99 under A's flood / idle, at most
TARGET_THROUGHPUT = 0.90  # A's decode rate with B / alone, at least
TARGET_JAIN = 0.95  # every window, at least
TARGET_REFUSAL_MS = 50.0  # a refused call is refused within
TARGET_LATE_STEPS = 1.0  # an accepted call misses its deadline by at most this many steps
TARGET_RSS_GROWTH = 0.05  # the daemon's RSS while unread streams are held, over its start
