"""The decoder's KV cache, in memory that costs RAM only where it is written (model stage).

A KV cache is addressed as [row, head, position, dim] so every kernel reads it in place, but
a row holds as many positions as its sequence has, not the maximum. `LazyZeros` reserves
the whole address range as private anonymous memory: the kernel gives it a page (zeros) the
first time it is written and `discard` hands a range back, after which it reads as zeros
again (reading a position never written maps the kernel's shared zero page: no RAM
either). The MMU's page table is the cache's block table: with 4 KiB pages a float32 head of
64 dims takes a page per 16 positions, the scheduler's KV block. This is how vAttention
(Prabhu et al., 2024) pages a contiguous KV cache without changing the attention kernels.
"""

import mmap

import torch
from torch import nn

PAGE = mmap.PAGESIZE


class LazyZeros:
    """A tensor of zeros whose pages are committed on first write and can be given back."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        numel = 1
        for n in shape:
            numel *= n
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._map = mmap.mmap(-1, max(self.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a 2 MiB page would commit 128 blocks at once
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=self.nbytes) if self.nbytes \
            else torch.empty(0, dtype=torch.uint8)
        self.tensor = flat.view(dtype).view(shape)

    def discard(self, start: int, end: int) -> None:
        """Gives the whole pages inside bytes [start, end) back to the kernel; they read as
        zeros afterwards. Partial pages at either end keep their contents."""
        first = -(-start // PAGE) * PAGE
        last = min(end, self.nbytes) // PAGE * PAGE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


class KVCache(nn.Module):
    """Per-layer cache. Row = slot (one sequence); positions written in place. On the CPU
    its memory is committed as positions are written and given back by `discard` (see
    `LazyZeros`): a row costs what its sequence holds, not max_seq."""

    k: torch.Tensor  # [n_slots, n_kv_heads, max_seq, head_dim]
    v: torch.Tensor  # [n_slots, n_kv_heads, max_seq, head_dim]

    def __init__(self, n_slots: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        super().__init__()
        shape = (n_slots, n_kv_heads, max_seq, head_dim)
        self._memory: list[LazyZeros] = []
        if torch.device(device).type == "cpu":
            self._memory = [LazyZeros(shape, dtype), LazyZeros(shape, dtype)]
            k, v = (m.tensor for m in self._memory)
        else:
            k, v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def discard(self, row: int) -> None:
        """Row `row` holds no sequence any more: its memory goes back to the system."""
        row_bytes = self.k[0].numel() * self.k.element_size()
        for memory in self._memory:
            memory.discard(row * row_bytes, (row + 1) * row_bytes)

    def row_bytes(self, positions: int) -> int:
        """RAM a row takes once positions [0, positions) are written: whole pages of each
        head's keys and values (all of it off the CPU)."""
        head = self.k.shape[2] * self.k.shape[3] * self.k.element_size()
        if not self._memory:
            return 2 * self.k.shape[1] * head
        used = positions * self.k.shape[3] * self.k.element_size()
        return 2 * self.k.shape[1] * min(head, -(-used // PAGE) * PAGE)

    def write(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
              rows: torch.Tensor | None) -> torch.Tensor:
        """Write k/v [B, Hkv, S, Dh] at input_pos [B, S] of the rows; returns the rows [B]."""
        row_idx = rows if rows is not None else torch.arange(k.shape[0], device=k.device)
        self.k[row_idx[:, None], :, input_pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[row_idx[:, None], :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
        return row_idx

    def save(self, row: int, end: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of positions [start, end) of a row: k, v [Hkv, end - start, Dh]."""
        return self.k[row, :, start:end].clone(), self.v[row, :, start:end].clone()

    def load(self, row: int, saved: tuple[torch.Tensor, torch.Tensor], start: int = 0) -> None:
        """Puts a copy made by `save` back into `row`, from position `start`."""
        k, v = saved
        self.k[row, :, start:start + k.shape[1]].copy_(k)
        self.v[row, :, start:start + v.shape[1]].copy_(v)

    def update(self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
               rows: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, S, Dh] at input_pos [B, S]; return [B, Hkv, length, Dh] views."""
        b = k.shape[0]
        self.write(k, v, input_pos, rows)
        if rows is None:  # fast path: compact rows 0..B-1, a view
            return self.k[:b, :, :length], self.v[:b, :, :length]
        return self.k[rows, :, :length], self.v[rows, :, :length]


class KVRows:
    """A model's KV caches (one per layer) row by row, as the runtime uses them: the
    positions each row has written since its memory was last given back, so what the KV
    cache holds in RAM is known without asking the kernel page by page."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self._written: dict[int, int] = {}  # row -> positions [0, n) written

    def wrote(self, row: int, positions: int) -> None:
        """Row `row` holds KV at positions [0, positions) (at least)."""
        if positions > self._written.get(row, 0):
            self._written[row] = positions

    def discard(self, rows: list[int]) -> None:
        """The rows hold no sequence: their memory goes back to the system."""
        for cache in self.caches:
            for row in rows:
                cache.discard(row)
        for row in rows:
            self._written.pop(row, None)

    def resident_bytes(self) -> int:
        return sum(c.row_bytes(n) for c in self.caches for n in list(self._written.values()))

    def reserved_bytes(self) -> int:
        return sum(2 * c.k.numel() * c.k.element_size() for c in self.caches)

    def token_bytes(self) -> int:
        """Bytes one token's keys and values take in every layer."""
        return sum(2 * c.k[0, :, 0].numel() * c.k.element_size() for c in self.caches)
