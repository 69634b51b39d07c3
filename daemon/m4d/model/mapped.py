"""Safetensors files mapped, not read (model-loading stage).

A tensor used as stored (a token table kept in its blocks, a float32 weight served in
float32) is a view of the file's pages, mapped copy-on-write: nothing is copied at load,
the pages are the page cache's (shared with any other process that maps the file, dropped
and read again under memory pressure instead of swapped), and a file is mapped once per
process: a second image that holds the same file (the same content digest, or the same
inode) gets the same pages, so a hot swap between images that share a backbone adds nothing
for it. safetensors' own reader copies each tensor out of its map.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from pathlib import Path

import torch

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
          "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
          "F32": torch.float32, "F64": torch.float64}

# content key -> the file's map, while any tensor of it is alive (a tensor holds its map)
_maps: weakref.WeakValueDictionary[object, mmap.mmap] = weakref.WeakValueDictionary()
# content key -> (the path it was mapped from, the map's address span); dropped with the map
_spans: dict[object, tuple[Path, int, int]] = {}


def _map(path: Path, digest: str | None) -> mmap.mmap:
    st = path.stat()
    key: object = ("sha256", digest) if digest else (st.st_dev, st.st_ino, st.st_size,
                                                     st.st_mtime_ns)
    mapped = _maps.get(key)
    if mapped is None:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        _maps[key] = mapped
        base = torch.frombuffer(mapped, dtype=torch.uint8, count=1).data_ptr() if len(mapped) else 0
        _spans[key] = (path.resolve(), base, base + len(mapped))
        weakref.finalize(mapped, _spans.pop, key, None)
    return mapped


def mapped_digests() -> set[str]:
    """The content digests of the files mapped now (those mapped with one)."""
    return {key[1] for key in list(_maps.keys())
            if isinstance(key, tuple) and len(key) == 2 and key[0] == "sha256"}


def mapped_paths() -> list[Path]:
    """The files mapped now (the path each was first mapped from)."""
    return [path for path, _, _ in list(_spans.values())]


class MappedSafetensors:
    """One safetensors file's tensors as views of its mapped pages."""

    def __init__(self, path: str | Path, digest: str | None = None) -> None:
        self.path = Path(path)
        size = os.path.getsize(self.path)
        if size < 8:
            raise ValueError(f"{self.path} is not a safetensors file ({size} bytes)")
        self._map = _map(self.path, digest)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if 8 + header_len > size:
            raise ValueError(f"{self.path}: header of {header_len} bytes past the file's end")
        try:
            header = json.loads(self._map[8:8 + header_len])
        except ValueError as exc:
            raise ValueError(f"{self.path}: unreadable safetensors header: {exc}") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, e in header.items():
            dtype = DTYPES.get(e.get("dtype"))
            begin, end = e["data_offsets"]
            if dtype is None:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {e.get('dtype')!r}")
            numel = 1
            for n in e["shape"]:
                numel *= n
            if end - begin != numel * dtype.itemsize or self._start + end > size or begin < 0:
                raise ValueError(f"{self.path}: tensor {name!r} does not fit its bytes "
                                 f"[{begin}, {end}) in a {size}-byte file")
            self._entries[name] = (dtype, list(e["shape"]), begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> list[int]:
        return list(self._entries[name][1])

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a view of the mapped file (copy-on-write: writing it copies a page)."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin,
                                offset=self._start + begin)
        return flat.view(dtype).view(shape)


def release_pages() -> None:
    """Takes every mapped file's pages out of this process's resident set (madvise
    DONTNEED): those a tensor still reads come back from the page cache on first touch, the
    rest (the blocks a load only read to convert) stop counting. Nothing is lost: the maps
    are private and never written, so their pages are the files'."""
    for mapped in list(_maps.values()):
        if len(mapped):
            mapped.madvise(mmap.MADV_DONTNEED)


def is_mapped(t: torch.Tensor) -> bool:
    """Whether `t` lies in a file this module mapped."""
    ptr = t.untyped_storage().data_ptr()
    return any(start <= ptr < end for _, start, end in list(_spans.values()))
