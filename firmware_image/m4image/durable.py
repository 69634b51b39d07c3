"""Firmware image, durable steps of the image store, each one a point a test can crash at.

The store's writes are the usual tmp -> fsync -> rename -> fsync(dir) sequence (the same as
``fsutil.atomic_write_bytes``), spelled out here so every step first calls ``crashpoint()``,
which counts it. The fault-injection tests wrap ``crashpoint`` (tests/hooks) to SIGKILL a real
install / activate / rollback in a subprocess at its N-th step, for many N, as OSTree's tests
do, with no monkeypatching of the OS.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from m4image.fsutil import fsync_dir

__all__ = ["atomic_write", "crashpoint", "crashpoints_passed", "fsync_dir_step", "write_all"]

_count = 0


def crashpoint() -> None:
    """Counts one durable step (the step a fault-injection test may kill the process at)."""
    global _count
    _count += 1


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
