"""Firmware image, store directory: the layout the image store keeps under its state directory,
one writer at a time, ``state.json`` read and written atomically, and recovery after a crash.

Layout under the state directory (default ``/var/lib/m4``)::

    state.json               which image is active / previous / on trial (m4image.state)
    images/<digest>/         one verified image, named by sha256 of its manifest.json bytes
    staging/                 0700, store-owned: installs in progress, and trash being deleted
    lock                     flock(2): one writer at a time, across processes

Every write of ``state.json`` is tmp -> fsync -> rename -> fsync(dir), each step a crash point
(``m4image.durable``). The store owns only the digest-named entries of ``images/``: anything
else there (``images/default``, the factory image systemd's tmpfiles.d copies in) is never
deleted, moved or counted as installed. Opening recovers from a crash at any point: staging
and temporary files are deleted, image directories that ``state.json`` does not list
(published just before the crash, never acknowledged) are deleted. A ``state.json`` that does
not parse is an error with the fix; it is never reset silently.

The add-on store (``m4image.addon_store``) keeps the same layout in its own directory, with its
own state file: a ``StoreDir`` is generic over its state, which only needs a history, canonical
bytes, and the digests it lists (``StoreState``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from m4image.durable import atomic_write, crashpoint, fsync_dir_step
from m4image.fsutil import fsync_dir
from m4image.state import DIGEST, INSTALL_HINT, StateMissingError, StoreError, now_text

__all__ = ["StoreDir", "StoreState"]


class StoreState(Protocol):
    """What the directory needs of a store's state: its history, its bytes, what it lists."""

    history: list[dict[str, Any]]

    def to_bytes(self) -> bytes: ...

    def digests(self) -> set[str]: ...


S = TypeVar("S", bound=StoreState)


class StoreDir(Generic[S]):
    """The state directory of an image store, opened (created, or recovered after a crash);
    its lock is safe across threads and processes (flock). ``entries`` names the folder of
    the digest-named directories ("images"); ``new_state`` and ``parse_state`` make and read
    the state (``m4image.state.State`` for images)."""

    def __init__(self, state_dir: str | Path, *, history_limit: int,
                 clock: Callable[[], float], entries: str,
                 new_state: Callable[[], S], parse_state: Callable[[bytes, Path], S]) -> None:
        self.root = Path(state_dir)
        self.entries_dir = self.root / entries
        self.new_state = new_state
        self.parse_state = parse_state
        self.staging_dir = self.root / "staging"
        self.state_path = self.root / "state.json"
        self.history_limit = history_limit
        self.clock = clock
        self.recovered: list[str] = []  # what opening the store cleaned up after a crash
        self.foreign: list[str] = []  # entries not named by a digest (images/default): not ours
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._depth = 0
        self._open()

    # ---- locking, loading, saving -----------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    def _load(self) -> S:
        try:
            with open(self.state_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StateMissingError(
                f"{self.state_path} is missing; reopen the store to re-create it"
            ) from None
        return self.parse_state(data, self.state_path)

    def _save(self, state: S) -> None:
        del state.history[: max(0, len(state.history) - self.history_limit)]
        atomic_write(self.state_path, state.to_bytes())

    def _event(self, state: S, event: str, digest: str | None, detail: str = "") -> None:
        state.history.append({"time": now_text(self.clock), "event": event, "digest": digest, "detail": detail})

    def _mkdir(self, path: Path, mode: int) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, mode)
            fsync_dir(path.parent)
            return
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{path} is not a directory; move it aside and reopen the store")
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)

    def _publish_entry(self, staging: Path, digest: str) -> Path:
        """Renames a complete, fsynced staging directory to ``<entries>/<digest>`` (debris
        of an unrecorded one is removed first); the caller records it in the state after."""
        target = self.entries_dir / digest
        if os.path.lexists(target):  # not in the state: debris; recovery removes it on open
            self._discard(target)
        fsync_dir_step(staging)
        crashpoint()
        os.chmod(staging, 0o755)
        crashpoint()
        os.rename(staging, target)
        fsync_dir_step(self.entries_dir)
        fsync_dir_step(self.staging_dir)
        return target

    def _discard(self, path: Path) -> None:
        """Remove a tree from view at once (rename into staging/), then delete it."""
        trash = self.staging_dir / f"trash-{secrets.token_hex(8)}"
        crashpoint()
        os.rename(path, trash)
        fsync_dir_step(path.parent)
        crashpoint()
        shutil.rmtree(trash)

    def _open(self) -> None:
        """Create the layout, or recover it after a crash (see the module docstring)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._mkdir(self.entries_dir, 0o755)
            self._mkdir(self.staging_dir, 0o700)
            # Only digest-named entries are the store's; anything else (the factory image that
            # tmpfiles.d copies to images/default) is left alone, never deleted or adopted.
            names = sorted(os.listdir(self.entries_dir))
            installed = [n for n in names if DIGEST.match(n)]
            self.foreign = [n for n in names if not DIGEST.match(n)]
            if not self.state_path.exists():
                if installed:
                    raise StateMissingError(
                        f"{self.state_path} is missing but {self.entries_dir} holds "
                        f"{len(installed)} entries; restore state.json from a backup, or move "
                        f"{self.entries_dir} aside to start an empty store, then {INSTALL_HINT}"
                    )
                self._save(self.new_state())
            state = self._load()
            cleaned: list[str] = []
            for name in sorted(os.listdir(self.root)):
                if name.startswith(".state.json.tmp-"):
                    os.unlink(self.root / name)
                    cleaned.append(name)
            for name in sorted(os.listdir(self.staging_dir)):
                p = self.staging_dir / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                cleaned.append(f"staging/{name}")
            listed = state.digests()
            for name in installed:
                if name not in listed:
                    self._discard(self.entries_dir / name)
                    cleaned.append(f"{self.entries_dir.name}/{name}")
            if cleaned:
                fsync_dir(self.root)
                fsync_dir(self.staging_dir)
                self.recovered = cleaned
                self._event(state, "recover", None, "removed after an interrupted operation: " + ", ".join(cleaned))
                self._save(state)
