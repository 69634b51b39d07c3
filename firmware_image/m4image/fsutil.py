"""Firmware image, storage primitives: atomic file writes, atomic directory publish, hashing.

Every write follows tmp -> fsync -> rename -> fsync(parent), so a crash leaves either the old
content or the new one, never a torn file; a directory is built under ``<dir>.tmp-XXXX`` and
renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (tmp in the same directory, fsync, rename, fsync dir)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, 2-space indent, UTF-8, trailing newline: the same object gives the same bytes."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@contextlib.contextmanager
def atomic_file(path: str | Path, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it into place.

    For writers that want a file name (e.g. ``safetensors.torch.save_file``).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every regular file and directory under ``root`` (not following links)."""
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


@contextlib.contextmanager
def publish_dir(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a directory atomically.

    Yields a fresh staging directory ``<target>.tmp-XXXX`` (same filesystem). When the block
    exits normally the tree is fsynced and renamed to ``target``, then the parent is fsynced;
    when it raises, the staging directory is removed. ``target`` is never half-built.

    With ``replace=True`` an existing ``target`` is moved aside and removed after the new one is
    in place (there is a short window in which ``target`` is absent, never one in which it is
    partial). Without it, an existing ``target`` raises ``FileExistsError`` before any work.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if (target.exists() or target.is_symlink()) and not replace:
        raise FileExistsError(f"{target} already exists; remove it or pass force/replace")
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        fsync_tree(staging)
        old: Path | None = None
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} appeared while building; not overwriting it")
            old = Path(tempfile.mkdtemp(prefix=f"{target.name}.old-", dir=parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(staging, target)
        fsync_dir(parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: str | Path, *, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_fd(fd: int, *, chunk: int = CHUNK) -> tuple[str, int]:
    """Hex sha256 and byte count of an open file descriptor, read from offset 0."""
    h = hashlib.sha256()
    n = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, chunk):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n
