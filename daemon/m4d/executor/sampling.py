"""Token sampling for a batch of sequences, each with its own parameters.

Runs on the executor thread right after the model step. Greedy rows take the argmax;
sampled rows apply temperature, top-k and top-p (nucleus) and draw from their own
seeded generator, so a seed reproduces its output whatever else shares the batch.
"""

from __future__ import annotations

import torch

from m4d.requests import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-sequence generator; None for greedy sequences."""
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    for b, p in enumerate(params):
        if p.greedy:
            continue
        tokens[b] = _sample_row(logits[b], p, generators[b])
    return [int(t) for t in tokens]


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    # row: [V] float32
    row = row.float() / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = cumulative - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    choice = torch.multinomial(probs, 1, generator=gen)
    return int(choice.item())
