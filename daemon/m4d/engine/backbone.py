"""One-call work on the backbone beside generation: next-word predictions (PredictNext) and
teacher-forced scoring of a reference (Score, the self-test's tie check).

Each request runs in one call on the step loop's thread, when `Batcher.next_backbone`
hands it out: a Score only while no sequence holds a KV row, since it borrows row 0.
"""

from __future__ import annotations

import time

from m4d.executor.runtime import Runtime
from m4d.requests import (
    Predictions,
    PredictNextRequest,
    Scored,
    ScoreRequest,
    Timings,
    Usage,
    WordPrediction,
)


def run_backbone(runtime: Runtime, request: PredictNextRequest | ScoreRequest,
                 ) -> Predictions | Scored:
    if isinstance(request, ScoreRequest):
        return Scored(runtime.reference_gaps(request.prompt_ids, request.reference, row=0))
    started = time.monotonic()
    words = runtime.next_words(request.prompt_ids, request.num_predictions)
    end = time.monotonic()
    timings = Timings(queue_ms=(started - request.arrival) * 1e3,
                      prefill_ms=(end - started) * 1e3,
                      total_ms=(end - request.arrival) * 1e3)
    return Predictions([WordPrediction(w, p) for w, p in words],
                       Usage(prompt_tokens=len(request.prompt_ids)), timings)
