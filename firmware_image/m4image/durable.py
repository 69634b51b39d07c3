"""Firmware image, durable steps of the image store, each one a point a test can crash at.

The store's writes are the usual tmp -> fsync -> rename -> fsync(dir) sequence (the same as
``fsutil.atomic_write_bytes``), spelled out here so every step first calls ``crashpoint()``.
With ``M4_STORE_CRASH_AFTER=N`` in the environment, the N-th step SIGKILLs the process: the
fault-injection tests run a real install / activate / rollback in a subprocess and kill it at
many points, as OSTree's tests do, with no monkeypatching of the OS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

from m4image.fsutil import fsync_dir

__all__ = ["CRASH_ENV", "atomic_write", "crashpoint", "crashpoints_passed", "fsync_dir_step", "write_all"]

CRASH_ENV = "M4_STORE_CRASH_AFTER"

_count = 0


def crashpoint() -> None:
    """Count one durable step; SIGKILL this process at step N when M4_STORE_CRASH_AFTER=N."""
    global _count
    _count += 1
    limit = os.environ.get(CRASH_ENV)
    if limit and _count >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def crashpoints_passed() -> int:
    """Durable steps taken by this process so far (tests choose crash points from it)."""
    return _count


def fsync_dir_step(path: Path) -> None:
    crashpoint()
    fsync_dir(path)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written, a crash point before each call."""
    view = memoryview(data)
    while view:
        crashpoint()
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """tmp (``.NAME.tmp-*``) -> write -> fsync -> rename -> fsync(dir), a crash point before each."""
    crashpoint()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        crashpoint()
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        crashpoint()
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir_step(path.parent)
