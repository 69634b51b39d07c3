"""Benchmark scoring (outside the serving pipeline): the metrics of bench_tasks.py, pure.

Answer containment (an accepted answer occurs in the reply as whole words, case folded),
top-k accuracy of word predictions, recall@1 of paired vectors, detection accuracy of
keywords, corpus character accuracy and latency percentiles. No model, no daemon: plain
values in, a number out (tests/unit/test_bench_tasks.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence


def words(text: str) -> list[str]:
    """Lower-case words and numbers: punctuation is a space, except a point or comma inside
    a number ("42.50", "1,000" -> "1000") and a hyphen inside a word or number ("2024-07")."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.casefold())
    return re.findall(r"[\w]+(?:[.\-][\w]+)*", text)


def contains_answer(reply: str, accepted: Iterable[str]) -> bool:
    """Whether any accepted answer occurs in `reply` as a run of whole words ("Paris." holds
    "paris"; "Parisian" does not)."""
    got = words(reply)
    for answer in accepted:
        want = words(answer)
        if want and any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1)):
            return True
    return False


def share(flags: Iterable[bool]) -> float:
    """The fraction of true flags; 0.0 for none."""
    values = list(flags)
    return sum(values) / len(values) if values else 0.0


def top_k_hit(predictions: Sequence[str], expected: str, k: int) -> bool:
    """Whether `expected` is among the first k predicted words (as `words` reads them)."""
    want = words(expected)
    return any(words(p) == want for p in predictions[:k])


def recall_at_1(queries: Sequence[Sequence[float]], keys: Sequence[Sequence[float]]) -> float:
    """The share of queries whose most cosine-similar key is their own partner (query i's is
    key i), among all len(keys) keys; ties count against the query."""
    if len(queries) != len(keys):
        raise ValueError(f"{len(queries)} queries but {len(keys)} keys")
    if not queries:
        return 0.0
    units = [_unit(k) for k in keys]
    hits = 0
    for i, query in enumerate(queries):
        q = _unit(query)
        sims = [sum(a * b for a, b in zip(q, k, strict=True)) for k in units]
        hits += all(sims[i] > s for j, s in enumerate(sims) if j != i)
    return hits / len(queries)


def _unit(v: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm else list(v)


def detection_accuracy(decisions: Iterable[tuple[bool, bool]]) -> float:
    """The share of (said, detected) decisions where detected equals said: a keyword that was
    said must be detected, one that was not must not be."""
    return share(said == detected for said, detected in decisions)


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two sequences (insert, delete, substitute cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def char_accuracy(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character accuracy: 1 - (character edits summed over pairs) / (reference
    characters); lines are compared joined by a newline. Below 0 for very wrong output."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    chars = sum(len(r) for r in refs)
    if chars == 0:
        raise ValueError("references contain no characters")
    return 1.0 - sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / chars


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
