"""The prefix cache: prompt blocks computed once, reused by every later prompt that starts
with the same tokens, whichever app sends it.

A prompt is cut into blocks of `block` tokens from its start; block i is keyed by its
tokens and the key of block i - 1, so a key names a whole prefix. When a sequence's prompt
has been computed, the engine copies the KV of its full blocks (those not cached yet) out
of its row (`insert`); when a new sequence arrives, `lookup` finds the longest cached chain
of its blocks (leaving at least its last prompt token to compute, whose logits give the
first token) and pins it; the engine copies those blocks into the row the sequence is given
(`restore`) and prefills only the rest. A copy of a block costs ~1 ms where computing it
costs ~0.1 s on a 2-core CPU.

A session's turn also keeps its last, partial block (`insert(..., tail=True)`): the next
turn's prompt starts with this turn's prompt and reply, which rarely end on a block
boundary, and without its tail the next turn would recompute up to a block of them. A tail
is found under its parent block when the new prompt starts with its tokens.

Memory is bounded by `budget` tokens; beyond it, unpinned blocks are evicted least recently
used, the deepest of equally recent ones first (so a chain loses its tail before its head).
The rest of the prompt is computed from the end of the restored prefix in the scheduler's
chunks; the model's rows are independent of the chunk they are computed in, so the tokens
are those computed without the cache (tests/model/test_prefix_cache.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Key = tuple[Any, tuple[int, ...]]  # (the previous block's key or None, this block's tokens)


@dataclass
class _Block:
    key: Key
    depth: int  # blocks before it in its chain
    kv: Any  # the runtime's copy of this block's KV
    used: int = 0  # LRU clock
    pins: int = 0

    @property
    def size(self) -> int:
        return len(self.key[1])  # the block size, or less for a tail


@dataclass
class Hit:
    """A cached prefix pinned for one sequence until `restore` or `release`."""

    tokens: int
    blocks: list[_Block] = field(default_factory=list)


class PrefixCache:
    def __init__(self, block: int, budget: int) -> None:
        self.block = block
        self.budget = budget  # tokens held at most
        self._blocks: dict[Key, _Block] = {}
        self._tails: dict[Any, set[Key]] = {}  # parent key -> its partial blocks' keys
        self._clock = itertools.count(1)
        self.hits = 0  # sequences that reused a prefix
        self.tokens_reused = 0  # prompt tokens they did not compute

    @property
    def enabled(self) -> bool:
        return self.block > 0 and self.budget >= self.block

    @property
    def tokens(self) -> int:
        return sum(b.size for b in self._blocks.values())

    def _keys(self, ids: Sequence[int], n_blocks: int, root: Any = None) -> list[Key]:
        keys: list[Key] = []
        parent: Any = root
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * self.block:(i + 1) * self.block]))
            keys.append(key)
            parent = key
        return keys

    def lookup(self, ids: Sequence[int], root: Any = None) -> Hit | None:
        """The longest cached prefix of a prompt, pinned; None when none is cached. `root`
        names what computed the KV besides the tokens (a task's adapter; None: the base)."""
        if not self.enabled:
            return None
        hit = Hit(0)
        now = next(self._clock)
        parent: Any = root
        for key in self._keys(ids, (len(ids) - 1) // self.block, root):
            found = self._blocks.get(key)
            if found is None:
                break
            hit.blocks.append(found)
            parent = key
        start = len(hit.blocks) * self.block
        rest = tuple(ids[start:len(ids) - 1])  # the last prompt token is always computed
        tails = [self._blocks[k] for k in self._tails.get(parent, ()) if rest[:len(k[1])] == k[1]]
        if tails:
            hit.blocks.append(max(tails, key=lambda b: b.size))
        if not hit.blocks:
            return None
        for found in hit.blocks:
            found.pins += 1
            found.used = now
        hit.tokens = start + (hit.blocks[-1].size if tails else 0)
        self.hits += 1
        self.tokens_reused += hit.tokens
        return hit

    def restore(self, hit: Hit, load: Callable[[Any, int], None]) -> None:
        """Copies a hit's blocks into place (`load(kv, start)`) and unpins them."""
        for i, found in enumerate(hit.blocks):
            load(found.kv, i * self.block)
        self.release(hit)

    def release(self, hit: Hit) -> None:
        for found in hit.blocks:
            found.pins -= 1
        hit.blocks = []

    def insert(self, ids: Sequence[int], save: Callable[[int, int], Any],
               tail: bool = False, root: Any = None) -> int:
        """Caches the full blocks of computed tokens that are not cached yet, and with
        `tail` the partial block after them, copying each with `save(start, end)` from the
        sequence's row; returns how many it added."""
        if not self.enabled:
            return 0
        now, added = next(self._clock), 0
        full = len(ids) // self.block
        keys = self._keys(ids, full, root)
        if tail and len(ids) > full * self.block:
            keys.append((keys[-1] if keys else root, tuple(ids[full * self.block:])))
        for depth, key in enumerate(keys):
            found = self._blocks.get(key)
            if found is not None:
                found.used = now
                continue
            size = len(key[1])
            if not self._make_room(size):
                break
            start = depth * self.block
            self._blocks[key] = _Block(key, depth, save(start, start + size), now)
            if size < self.block:
                self._tails.setdefault(key[0], set()).add(key)
            added += 1
        return added

    def _make_room(self, size: int) -> bool:
        """Evicts until `size` more tokens fit; False when every block is pinned."""
        while self.tokens + size > self.budget:
            free = [b for b in self._blocks.values() if b.pins == 0]
            if not free:
                return False
            victim = min(free, key=lambda b: (b.used, -b.depth))
            del self._blocks[victim.key]
            siblings = self._tails.get(victim.key[0])
            if siblings is not None:
                siblings.discard(victim.key)
                if not siblings:
                    del self._tails[victim.key[0]]
        return True


class KVCopier:
    """What the prefix cache needs of the runtime: copies of KV position ranges."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def save(self, row: int) -> Callable[[int, int], Any]:
        return lambda start, end: self.runtime.park(row, end, start)

    def load(self, row: int) -> Callable[[Any, int], None]:
        return lambda kv, start: self.runtime.restore(row, kv, start)


class Prefixes:
    """The engine's side of the prefix cache: a hit pinned per sequence from its arrival
    until its row holds the restored blocks."""

    def __init__(self, cache: PrefixCache, copier: KVCopier) -> None:
        self.cache = cache
        self.copier = copier
        self._hits: dict[int, Hit] = {}

    def arrived(self, seq_id: int, prompt_ids: Sequence[int], adapter: str = "") -> int:
        """Prompt tokens of a new sequence that the cache holds (restored when it gets a
        row; 0 when none); KV computed through an adapter is only reused with it."""
        hit = self.cache.lookup(prompt_ids, _root(adapter))
        if hit is None:
            return 0
        self._hits[seq_id] = hit
        return hit.tokens

    def admitted(self, seq_id: int, row: int) -> None:
        """The sequence got `row`: its cached blocks go in before its first chunk runs."""
        hit = self._hits.pop(seq_id, None)
        if hit is not None:
            self.cache.restore(hit, self.copier.load(row))

    def computed(self, ids: Sequence[int], row: int, tail: bool = False,
                 adapter: str = "") -> None:
        """Tokens (a prompt; with `tail` a session's prompt and reply, the partial last
        block too) have been computed in `row` (through `adapter`): their new blocks are
        cached."""
        self.cache.insert(ids, self.copier.save(row), tail, _root(adapter))

    def forget(self, seq_id: int) -> None:
        """The sequence ended before it got a row: its hit is unpinned."""
        hit = self._hits.pop(seq_id, None)
        if hit is not None:
            self.cache.release(hit)


def _root(adapter: str) -> Any:
    """Where a prompt's chain of blocks starts: the base model's KV, or an adapter's."""
    return ("adapter", adapter) if adapter else None
