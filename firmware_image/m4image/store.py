"""Firmware image, store: installed images, which one boots, and the way back.

Layout under the state directory (default ``/var/lib/m4``)::

    state.json               which image is active / previous / on trial (m4image.state)
    images/<digest>/         one verified image, named by sha256 of its manifest.json bytes
    staging/                 0700, store-owned: installs in progress, and trash being deleted
    lock                     flock(2): one writer at a time, across processes

``state.json`` (schema ``m4-store/1``: see ``m4image.state``) records which image is active,
previous and on trial, the trial's boot attempts, the anti-rollback floor
(``max_security_version``), every installed image and the recent history.

Every write of ``state.json`` and of an image is tmp -> fsync -> rename -> fsync(dir); an
image is published by one rename of a complete, fsynced staging directory. The store owns only
the digest-named entries of ``images/``: anything else there (``images/default``, the factory
image systemd's tmpfiles.d copies in) is never deleted, moved or counted as installed.
Opening a store recovers from a crash at any point: staging and temporary files are deleted,
image directories that ``state.json`` does not list (published just before the crash, never
acknowledged) are deleted. A ``state.json`` that does not parse is an error with the fix; it
is never reset silently.

Installing verifies before it writes (``m4image.install``): the signature over the exact
manifest bytes, then the manifest (compatible, min_daemon_version, anti-rollback), then each
file is hashed while it is written into the staging directory, so the bytes checked are the
bytes installed. One writer at a time: an install holds the store's lock until it is done.

Boot protocol (RAUC-like): ``activate`` makes an image the trial; at start the daemon calls
``select_for_boot(max_attempts)``, which counts the attempt durably BEFORE the image is
loaded, and falls back to the active image once the trial has had its attempts; after the
self-test passes the daemon calls ``mark_good`` (or ``mark_bad`` when it fails).

Fault injection: with ``M4_STORE_CRASH_AFTER=N`` in the environment the process kills itself
with SIGKILL at the N-th durable step (write, fsync, rename, mkdir, delete) the store takes
(``m4image.durable``); the tests crash a real install/activate/rollback at many points.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m4image.durable import atomic_write, crashpoint, crashpoints_passed, fsync_dir_step
from m4image.fsutil import fsync_dir
from m4image.install import (
    DuplicateEntryError,
    ImageTooLargeError,
    InsufficientSpaceError,
    Staging,
    UnexpectedEntryError,
    fill_from_dir,
    fill_from_tar,
)
from m4image.keys import Keyring
from m4image.manifest import ImageError, ManifestError
from m4image.state import (
    DIGEST,
    INSTALL_HINT,
    STATE_FORMAT,
    ImageRecord,
    State,
    StateCorruptError,
    StateMissingError,
    StoreError,
    now_text,
)
from m4image.tarstream import ArchiveError
from m4image.verify import VerifiedImage, verify_image

__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_FORMAT",
    "AlreadyActiveError",
    "AmbiguousReferenceError",
    "BootSelection",
    "DowngradeError",
    "DuplicateEntryError",
    "ImageEntry",
    "ImageInUseError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "InsufficientSpaceError",
    "NoBootableImageError",
    "NoPreviousImageError",
    "NoTrialError",
    "StateCorruptError",
    "StateMissingError",
    "Store",
    "StoreError",
    "StoreStatus",
    "UnexpectedEntryError",
    "WrongStateError",
    "crashpoints_passed",
    "status_code_for",
]

DEFAULT_STATE_DIR = Path("/var/lib/m4")
DEFAULT_MAX_IMAGE_BYTES = 32 << 30  # 32 GiB of payload
HISTORY_LIMIT = 200


# ---- errors: one class per failure kind (state-file errors: m4image.state) -------------


class WrongStateError(StoreError):
    """The operation does not fit the store's current state (FAILED_PRECONDITION)."""


class NoTrialError(WrongStateError):
    """mark_good / mark_bad / record_attempt without an image on trial."""


class NoPreviousImageError(WrongStateError):
    """rollback with no previous good image."""


class AlreadyActiveError(WrongStateError):
    """activate of the image that is already active."""


class ImageInUseError(WrongStateError):
    """remove of the active, previous or trial image."""


class NoBootableImageError(WrongStateError):
    """No image can be booted: none was ever marked good and no trial is left."""


class ImageNotFoundError(StoreError):
    """No installed image matches the digest, prefix or version given."""


class AmbiguousReferenceError(StoreError):
    """A digest prefix or version matches more than one installed image."""


class DowngradeError(StoreError):
    """The image's security_version is below the device's anti-rollback floor."""


_STATUS_CODES: list[tuple[type[BaseException], str]] = [
    (ImageNotFoundError, "NOT_FOUND"),
    (AmbiguousReferenceError, "INVALID_ARGUMENT"),
    (ArchiveError, "INVALID_ARGUMENT"),
    (ImageTooLargeError, "RESOURCE_EXHAUSTED"),
    (InsufficientSpaceError, "RESOURCE_EXHAUSTED"),
    (StateCorruptError, "DATA_LOSS"),
    (StateMissingError, "DATA_LOSS"),
    (ImageError, "FAILED_PRECONDITION"),  # wrong state, signature, hashes, downgrade, ...
]


def status_code_for(exc: BaseException) -> str:
    """The gRPC status code name for an image or store error (for the admin servicer)."""
    for cls, code in _STATUS_CODES:
        if isinstance(exc, cls):
            return code
    return "INTERNAL"


@dataclass(frozen=True)
class ImageEntry:
    """One installed image, as ``list()`` shows it."""

    digest: str
    name: str
    version: str
    security_version: int
    compatible: str
    size: int
    signed_by: str | None
    installed_at: str
    state: str  # active, previous, trial or installed


@dataclass(frozen=True)
class StoreStatus:
    """The boot state: digests of the active, previous and trial images, attempts, floor."""

    active: str | None
    previous: str | None
    trial: str | None
    attempts: int
    max_security_version: int


@dataclass(frozen=True)
class BootSelection:
    """What ``select_for_boot`` chose: load ``path``; if ``trial``, self-test then mark it good."""

    digest: str
    path: Path
    trial: bool
    attempt: int  # this boot's attempt number for a trial, 0 otherwise
    fell_back: bool  # a trial ran out of attempts just now and was abandoned


# ---- the store --------------------------------------------------------------------------------


class Store:
    """The image store in one state directory; safe across threads and processes (flock)."""

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        *,
        compatible: str | None = None,
        daemon_version: str | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        history_limit: int = HISTORY_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(state_dir)
        self.images_dir = self.root / "images"
        self.staging_dir = self.root / "staging"
        self.state_path = self.root / "state.json"
        self.compatible = compatible
        self.daemon_version = daemon_version
        self.max_image_bytes = max_image_bytes
        self.history_limit = history_limit
        self.clock = clock
        self.recovered: list[str] = []  # what opening the store cleaned up after a crash
        self.foreign: list[str] = []  # entries of images/ not named by a digest: not the store's
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

    def _load(self) -> State:
        try:
            with open(self.state_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StateMissingError(
                f"{self.state_path} is missing; reopen the store to re-create it"
            ) from None
        return State.from_bytes(data, self.state_path)

    def _save(self, state: State) -> None:
        del state.history[: max(0, len(state.history) - self.history_limit)]
        atomic_write(self.state_path, state.to_bytes())

    def _event(self, state: State, event: str, digest: str | None, detail: str = "") -> None:
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
            self._mkdir(self.images_dir, 0o755)
            self._mkdir(self.staging_dir, 0o700)
            # Only digest-named entries are the store's; anything else (the factory image that
            # tmpfiles.d copies to images/default) is left alone, never deleted or adopted.
            names = sorted(os.listdir(self.images_dir))
            installed = [n for n in names if DIGEST.match(n)]
            self.foreign = [n for n in names if not DIGEST.match(n)]
            if not self.state_path.exists():
                if installed:
                    raise StateMissingError(
                        f"{self.state_path} is missing but {self.images_dir} holds "
                        f"{len(installed)} image(s); restore state.json from a backup, or move "
                        f"{self.images_dir} aside to start an empty store, then {INSTALL_HINT}"
                    )
                self._save(State())
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
            for name in installed:
                if name not in state.images:
                    self._discard(self.images_dir / name)
                    cleaned.append(f"images/{name}")
            if cleaned:
                fsync_dir(self.root)
                fsync_dir(self.staging_dir)
                self.recovered = cleaned
                self._event(state, "recover", None, "removed after an interrupted operation: " + ", ".join(cleaned))
                self._save(state)

    # ---- queries ------------------------------------------------------------------------------

    def status(self) -> StoreStatus:
        s = self._load()
        return StoreStatus(s.active, s.previous, s.trial, s.attempts, s.max_security_version)

    def list(self) -> list[ImageEntry]:
        """Installed images, oldest install first."""
        s = self._load()
        roles = {s.trial: "trial", s.previous: "previous", s.active: "active"}
        out = [ImageEntry(d, r.name, r.version, r.security_version, r.compatible, r.size,
                          r.signed_by, r.installed_at, roles.get(d, "installed"))
               for d, r in s.images.items()]  # fmt: skip
        return sorted(out, key=lambda e: (e.installed_at, e.digest))

    def history(self) -> builtins.list[dict[str, Any]]:
        return list(self._load().history)

    def path_of(self, digest: str) -> Path:
        return self.images_dir / digest

    def resolve(self, ref: str) -> str:
        """A full digest from a digest, ``sha256:`` digest, unique prefix (8+ hex), version or
        ``name@version``."""
        return self._resolve(self._load(), ref)

    def _resolve(self, state: State, ref: str) -> str:
        r = ref.strip().removeprefix("sha256:")
        if r in state.images:
            return r
        matches: list[str] = []
        if len(r) >= 8 and re.fullmatch(r"[0-9a-f]+", r):
            matches = [d for d in state.images if d.startswith(r)]
        if not matches:
            matches = [d for d, rec in state.images.items() if ref in (rec.version, f"{rec.name}@{rec.version}")]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousReferenceError(
                f"{ref!r} matches {len(matches)} installed images ({', '.join(d[:12] for d in sorted(matches))}); "
                "give more of the digest"
            )
        raise ImageNotFoundError(
            f"no installed image matches {ref!r}; `m4ctl image list` shows digests and versions"
        )

    def verify(self, digest: str, keyring: Keyring | None) -> VerifiedImage:
        """Re-verify an installed image (what the daemon does before loading it)."""
        return verify_image(self.path_of(digest), keyring=keyring, expected_compatible=self.compatible,
                            daemon_version=self.daemon_version)

    # ---- installing ----------------------------------------------------------------------

    def _check_downgrade(self, name: str, version: str, security_version: int, state: State,
                         allow: bool) -> None:  # fmt: skip
        if security_version < state.max_security_version and not allow:
            raise DowngradeError(
                f"{name} {version} has security_version {security_version}, below this device's "
                f"anti-rollback floor {state.max_security_version}: it may lack security fixes. "
                f"Use an image with security_version >= {state.max_security_version}, or pass "
                "--allow-downgrade if going back is really intended"
            )

    def _publish(self, staging: Staging, digest: str) -> str:
        """Rename a complete staging directory to images/<digest> and record it."""
        assert staging.manifest is not None
        state = self._load()
        if digest in state.images:
            staging.abort()
            return digest
        target = self.images_dir / digest
        if os.path.lexists(target):  # not in state.json: debris; recovery removes it on open
            self._discard(target)
        fsync_dir_step(staging.dir)
        crashpoint()
        os.chmod(staging.dir, 0o755)
        crashpoint()
        os.rename(staging.dir, target)
        fsync_dir_step(self.images_dir)
        fsync_dir_step(self.staging_dir)
        m = staging.manifest
        state.images[digest] = ImageRecord(m.name, m.version, m.security_version, m.compatible,
                                           staging.total, staging.key_id, now_text(self.clock))
        downgrade = m.security_version < state.max_security_version
        self._event(state, "install", digest, f"{m.name} {m.version}, security_version "
                    f"{m.security_version}, signed by {staging.key_id or 'nobody (unchecked)'}"
                    + (", downgrade allowed" if downgrade else ""))
        self._save(state)
        return digest

    def install_from_dir(
        self,
        src_dir: str | Path,
        keyring: Keyring | None,
        *,
        allow_downgrade: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> str:
        """Install an image directory; returns its digest. ``keyring=None`` skips the signature
        check (development stores only). Each file is read once, hashed as it is copied."""
        root = Path(src_dir)
        if root.is_symlink() or not root.is_dir():
            raise ManifestError(f"{root} is not an image directory (or is a symbolic link)")
        return self._install(lambda staging: fill_from_dir(staging, root), keyring, allow_downgrade, progress)

    def install_stream(
        self,
        chunks: Iterable[bytes],
        keyring: Keyring | None,
        *,
        allow_downgrade: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> str:
        """Install from an uncompressed tar arriving in chunks; returns the image digest.

        manifest.json first, manifest.sig second, then only listed files (see
        ``install.fill_from_tar``); nothing is written before the signature and the manifest
        are checked, and nothing is left behind when any check fails.
        """
        return self._install(lambda staging: fill_from_tar(staging, chunks), keyring, allow_downgrade, progress)

    def _install(
        self,
        fill: Callable[[Staging], None],
        keyring: Keyring | None,
        allow_downgrade: bool,
        progress: Callable[[str, int, int], None] | None,
    ) -> str:
        with self._locked():
            staging = Staging(self, keyring, allow_downgrade, progress)
            try:
                fill(staging)
                return staging.commit()
            except BaseException:
                staging.abort()
                raise

    # ---- boot state machine ------------------------------------------------------------------

    def activate(self, ref: str, *, allow_downgrade: bool = False) -> str:
        """Make an installed image the trial (attempts = 0); it boots next and must be marked
        good. Returns its digest."""
        with self._locked():
            state = self._load()
            digest = self._resolve(state, ref)
            rec = state.images[digest]
            if digest == state.active:
                pending = f"; the trial {state.trial[:12]} stays pending" if state.trial else ""
                raise AlreadyActiveError(f"{rec.name} {rec.version} ({digest[:12]}) is already the active image{pending}")
            self._check_downgrade(rec.name, rec.version, rec.security_version, state, allow_downgrade)
            replaced = f"; replaces trial {state.trial[:12]}" if state.trial and state.trial != digest else ""
            state.trial, state.attempts = digest, 0
            self._event(state, "activate", digest, f"{rec.name} {rec.version} is the trial{replaced}"
                        + (", downgrade allowed" if rec.security_version < state.max_security_version else ""))
            self._save(state)
            return digest

    def record_attempt(self) -> int:
        """Count one boot of the trial, durably; returns the attempt number."""
        with self._locked():
            state = self._load()
            if state.trial is None:
                raise NoTrialError("no image is on trial, so there is no attempt to count; activate one first")
            state.attempts += 1
            self._event(state, "boot-attempt", state.trial, f"attempt {state.attempts}")
            self._save(state)
            return state.attempts

    def select_for_boot(self, max_attempts: int = 3) -> BootSelection:
        """Which image to load now. A trial with attempts left: count this attempt (durably,
        before loading) and return it. A trial out of attempts: abandon it, record the
        fallback, and return the active image. Otherwise the active image."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        with self._locked():
            state = self._load()
            fell_back = False
            if state.trial is not None:
                if state.attempts < max_attempts:
                    attempt = self.record_attempt()
                    return BootSelection(state.trial, self.path_of(state.trial), True, attempt, False)
                failed = state.trial
                state.trial, state.attempts = None, 0
                back = state.active[:12] if state.active else "nothing (no image was ever marked good)"
                self._event(state, "fallback", failed,
                            f"the trial was not marked good after {max_attempts} attempts; back to {back}")
                self._save(state)
                fell_back = True
            if state.active is None:
                raise NoBootableImageError(
                    "no image has been marked good and no trial is left to try; install and "
                    f"activate an image ({INSTALL_HINT}, then `m4ctl image activate DIGEST`)"
                )
            return BootSelection(state.active, self.path_of(state.active), False, 0, fell_back)

    def mark_good(self, digest: str | None = None) -> str:
        """The trial passed its self-test: it becomes active, the old active becomes previous,
        and the anti-rollback floor rises to its security_version."""
        with self._locked():
            state = self._load()
            trial = self._require_trial(state, digest, "mark good")
            rec = state.images[trial]
            old = state.active
            state.active, state.trial, state.attempts = trial, None, 0
            if old is not None and old != trial:
                state.previous = old
            state.max_security_version = max(state.max_security_version, rec.security_version)
            self._event(state, "mark-good", trial, f"{rec.name} {rec.version} is active"
                        + (f", previous {old[:12]}" if old else ""))
            self._save(state)
            return trial

    def mark_bad(self, digest: str | None = None, reason: str = "") -> str:
        """The trial failed (self-test, load error): drop it at once; the active image stays."""
        with self._locked():
            state = self._load()
            trial = self._require_trial(state, digest, "mark bad")
            state.trial, state.attempts = None, 0
            self._event(state, "mark-bad", trial, reason or "the trial failed")
            self._save(state)
            return trial

    def _require_trial(self, state: State, digest: str | None, verb: str) -> str:
        if state.trial is None:
            raise NoTrialError(f"no image is on trial, so there is nothing to {verb}; activate one first "
                               "(`m4ctl image activate DIGEST`)")
        if digest is not None and self._resolve(state, digest) != state.trial:
            raise WrongStateError(
                f"{digest[:12]} is not the image on trial (that is {state.trial[:12]}); the trial "
                "changed since this boot: restart the daemon to boot the new trial"
            )
        return state.trial

    def rollback(self, *, allow_downgrade: bool = False) -> str:
        """Go back to the previous good image: active <-> previous; a pending trial is dropped."""
        with self._locked():
            state = self._load()
            if state.previous is None:
                raise NoPreviousImageError(
                    "there is no previous good image to roll back to (only one image has been "
                    "marked good); activate another installed image instead"
                )
            rec = state.images[state.previous]
            self._check_downgrade(rec.name, rec.version, rec.security_version, state, allow_downgrade)
            dropped = f"; dropped trial {state.trial[:12]}" if state.trial else ""
            state.active, state.previous = state.previous, state.active
            state.trial, state.attempts = None, 0
            assert state.active is not None
            self._event(state, "rollback", state.active, f"back to {rec.name} {rec.version}{dropped}")
            self._save(state)
            return state.active

    def remove(self, ref: str) -> str:
        """Delete an installed image that is not active, previous or on trial."""
        with self._locked():
            state = self._load()
            digest = self._resolve(state, ref)
            for role in ("active", "previous", "trial"):
                if getattr(state, role) == digest:
                    raise ImageInUseError(
                        f"{digest[:12]} is the {role} image and cannot be removed; activate and "
                        "mark good another image first"
                    )
            rec = state.images.pop(digest)
            self._event(state, "remove", digest, f"{rec.name} {rec.version}")
            self._save(state)  # state first: a crash now leaves a stray folder, removed on open
            self._discard(self.path_of(digest))
            return digest
