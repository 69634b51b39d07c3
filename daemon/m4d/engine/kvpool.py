"""KV cache memory as a pool of fixed-size blocks: the scheduler's memory accounting.

Pure bookkeeping, no tensors: how many blocks each sequence holds (enough for the tokens it
has in the cache, growing as it decodes) and how many are free. The scheduler asks before it
plans a prefill chunk or a decode step, so the pool is never exceeded; a paged runtime can
later hand out real block ids from the same counts.
"""

from __future__ import annotations


class KVCapacityError(ValueError):
    """A sequence could never fit in the KV pool, however idle the device is."""


class KVPool:
    def __init__(self, total_tokens: int, block_size: int = 16) -> None:
        if block_size < 1 or total_tokens < block_size:
            raise ValueError(
                f"a KV pool of {total_tokens} tokens cannot hold one block of {block_size}")
        self.block_size = block_size
        self.num_blocks = total_tokens // block_size
        self.used = 0
        self._held: dict[int, int] = {}  # seq_id -> blocks

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @property
    def free(self) -> int:
        return self.num_blocks - self.used

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def held(self, seq_id: int) -> int:
        return self._held.get(seq_id, 0)

    def needed(self, seq_id: int, tokens: int) -> int:
        """Blocks `seq_id` still needs so that the cache holds `tokens` of its tokens."""
        return max(0, self.blocks_for(tokens) - self.held(seq_id))

    def check_fits(self, seq_id: int, tokens: int) -> None:
        """Raises KVCapacityError when `tokens` could never fit, even in an empty pool."""
        if self.blocks_for(tokens) > self.num_blocks:
            raise KVCapacityError(
                f"request {seq_id} needs KV cache for {tokens} tokens but the device holds "
                f"{self.capacity}; shorten the prompt or lower max_tokens")

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Holds enough blocks for `tokens`; False (and nothing taken) when too few are free."""
        need = self.needed(seq_id, tokens)
        if need > self.free:
            return False
        if need:
            self._held[seq_id] = self.held(seq_id) + need
            self.used += need
        return True

    def release(self, seq_id: int) -> int:
        """Frees every block of `seq_id`; returns how many."""
        blocks = self._held.pop(seq_id, 0)
        self.used -= blocks
        return blocks
