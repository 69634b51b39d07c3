"""The self-test's scoring on the real model: `Runtime.reference_gaps` runs the served path
(chunked prefill, then decode) teacher-forced, so the daemon's own greedy output scores 0
at every token and a token the model does not pick scores what it is below the top."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from m4d.config import Config
from m4d.executor.runtime import Runtime
from m4image.verify import verify_image

PROMPT = "The capital of Japan is Tokyo, and the capital of Italy is"


@pytest.fixture(scope="module")
def runtime(text_image: Path) -> Runtime:
    # a small prefill chunk, so the prompt's prefill spans several chunks
    rt = Runtime(verify_image(text_image), Config(image=text_image, kv_slots=2, prefill_chunk=4,
                                                  step_token_budget=8))
    rt.load()
    return rt


def greedy(rt: Runtime, ids: list[int], n: int, row: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens after ids in KV row `row` (one prefill, then decode); their logits."""
    logits = rt.prefill(row, ids, 0)
    out, seen = [], []
    for i in range(n):
        seen.append(logits.float().log_softmax(-1))
        out.append(int(logits.argmax()))
        logits = rt.decode([row], [out[-1]], [len(ids) + i])[0]
    return out, seen


def test_the_models_own_greedy_output_scores_zero_everywhere(runtime: Runtime) -> None:
    assert runtime.tokenizer is not None
    ids = runtime.tokenizer.encode(PROMPT)
    tokens, _ = greedy(runtime, ids, 10, row=1)
    assert runtime.reference_gaps(ids, tokens, row=0) == [0.0] * 10


def test_a_token_the_model_does_not_pick_scores_its_distance_from_the_top(runtime: Runtime) -> None:
    assert runtime.tokenizer is not None
    ids = runtime.tokenizer.encode(PROMPT)
    tokens, logps = greedy(runtime, ids, 6, row=1)
    wrong = int(logps[3].argsort()[-50])  # the model's 50th choice at token 3
    gaps = runtime.reference_gaps(ids, [*tokens[:3], wrong, *tokens[4:]], row=0)
    assert gaps[:3] == [0.0, 0.0, 0.0]
    # (greedy() prefills in one chunk, reference_gaps in chunks of 4: rounding differs)
    assert gaps[3] == pytest.approx(float(logps[3].max() - logps[3][wrong]), rel=0.01)
    assert gaps[3] > 2.0
