"""What the daemon's memory holds, by part (Admin Status, `m4ctl status`).

Weights are *mapped* (views of the image's files, the page cache's pages) or *converted* at
load (packed for the kernels, cast to the compute dtype: private memory); the KV cache is
*resident* as far as sequences have written it and *reserved* (address space, no RAM) for
every slot at the longest context; the rest of the resident set is the runtime: Python,
torch, gRPC, activations, parked and prefix-cached KV.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m4d.model.block_linear import BlockEmbedding
from m4d.model.kv_cache import LazyZeros
from m4d.model.mapped import is_mapped, mapped_paths


@dataclass(frozen=True)
class MemoryUsage:
    rss: int
    weights_mapped: int  # bytes of weights used in place from mapped files
    weights_mapped_resident: int  # pages of those files in this process's resident set now
    weights_converted: int
    kv_resident: int
    kv_reserved: int
    kv_budget: int  # the most KV the scheduler lets sequences hold

    @property
    def runtime(self) -> int:
        return max(0, self.rss - self.weights_mapped_resident - self.weights_converted
                   - self.kv_resident)


def weight_bytes(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(mapped, converted) bytes of `tensors`, each storage counted once."""
    seen: set[int] = set()
    mapped = converted = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(storage.data_ptr())
        if is_mapped(t):
            mapped += storage.nbytes()
        else:
            converted += storage.nbytes()
    return mapped, converted


def module_tensors(obj: Any, skip: set[int], depth: int = 2) -> Iterator[torch.Tensor]:
    """The parameters and buffers of the modules in `obj` (a module, a tuple or dict of
    them, or an object holding modules as attributes, `depth` levels down), except the
    storages in `skip` (KV caches)."""
    if isinstance(obj, nn.Module):
        for t in [*obj.parameters(), *obj.buffers()]:
            if t.untyped_storage().data_ptr() not in skip:
                yield t
        for m in obj.modules():
            if isinstance(m, BlockEmbedding):
                yield from m.blocks
    elif depth > 0 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from module_tensors(item, skip, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from module_tensors(item, skip, depth - 1)
    elif depth > 0 and hasattr(obj, "__dict__") and not isinstance(obj, (type, Path)):
        for item in vars(obj).values():
            if isinstance(item, (nn.Module, tuple, list, dict)):
                yield from module_tensors(item, skip, depth - 1)


def mapped_resident_bytes() -> int:
    """Resident bytes of this process's mappings of the files `m4d.model.mapped` mapped
    (/proc/self/smaps; 0 where there is none)."""
    paths = {str(p) for p in mapped_paths()}
    if not paths:
        return 0
    total, counting = 0, False
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                head = line.split(None, 5)
                if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's line
                    counting = len(head) == 6 and head[5].strip() in paths
                elif counting and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def rss_bytes() -> int:
    """Resident memory of this process, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_heap() -> None:
    """Hands the C heap's free pages back to the system (glibc's malloc_trim over every
    arena; a no-op elsewhere): after a burst of work, activations freed by the worker
    threads stop counting as the daemon's memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def own_mapping(module: nn.Module) -> int:
    """Moves the converted weights of `module` (those not mapped from a file) into one
    anonymous mapping of their own; returns its bytes. Loading interleaves them with the
    conversion's temporaries on the C heap, whose holes glibc cannot give back while any
    weight sits between them; in their own mapping they leave the heap to the temporaries
    (trimmed after load) and go back to the system at once when the model is dropped (an
    image swapped out). Run before anything keeps references to the old tensors."""
    slots: list[tuple[dict[str, Any], str, torch.Tensor, int]] = []  # ..., its storage
    for m in module.modules():
        tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
        for table in tables:
            for name, t in table.items():
                if (t is not None and t.device.type == "cpu" and t.is_contiguous()
                        and t.storage_offset() == 0 and not is_mapped(t)
                        and t.untyped_storage().nbytes() == t.nbytes and t.nbytes >= 4096):
                    slots.append((table, name, t, t.untyped_storage().data_ptr()))
    unique: dict[int, torch.Tensor] = {}
    for _, _, t, ptr in slots:
        unique.setdefault(ptr, t)
    total = sum(-(-t.nbytes // 64) * 64 for t in unique.values())
    if not total:
        return 0
    arena = LazyZeros((total,), torch.uint8).tensor
    moved: dict[int, torch.Tensor] = {}
    offset = 0
    for ptr, t in unique.items():
        view = arena[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        moved[ptr] = view
        offset += -(-t.nbytes // 64) * 64
    with torch.no_grad():
        for table, name, t, ptr in slots:  # a tied weight is in two modules' tables
            new = moved[ptr]
            if isinstance(t, nn.Parameter):
                t.data = new
            else:
                table[name] = new
    return total
