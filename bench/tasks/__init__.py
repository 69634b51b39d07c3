"""Benchmark (outside the serving pipeline): the parts of bench_tasks.py (issue 16, part 5).

* `tasks.data`: the offline datasets, written out here (questions with known answers,
  common phrases, paraphrase pairs, topic texts, spoken sentences with questions, signs
  with questions, coloured shapes), nothing downloaded;
* `tasks.scoring`: the pure metrics (answer containment, top-k, recall@1, detection
  accuracy, character accuracy, latency percentiles), unit-tested;
* `tasks.suites`: per task of the image, its items, the one timed call that runs an item
  through the daemon and how the answers are scored; the base (no adapter, no head) a task
  with an adapter is compared with; latency-only inputs for a task without a dataset.
"""

from __future__ import annotations
