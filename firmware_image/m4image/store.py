"""Firmware image, store: installed images, which one boots, and the way back.

The state directory (``images/<digest>/``, ``staging/``, ``state.json``, the lock) and its
recovery after a crash are ``m4image.statedir``; ``state.json`` (schema ``m4-store/1``:
``m4image.state``) records which image is active, previous and on trial, the trial's boot
attempts, the anti-rollback floor (``max_security_version``), every installed image and the
recent history. An image is published by one rename of a complete, fsynced staging directory.

Installing verifies before it writes (``m4image.install``): the signature over the exact
manifest bytes, then the manifest (compatible, min_daemon_version, anti-rollback), then each
file is hashed while it is written into the staging directory, so the bytes checked are the
bytes installed. One writer at a time: an install holds the store's lock until it is done.

Boot protocol (RAUC-like, the transitions in ``m4image.boot``): ``activate`` makes an image
the trial; at start the daemon calls ``select_for_boot(max_attempts)``, which counts the
attempt durably BEFORE the image is loaded, and falls back to the active image once the trial
has had its attempts; after the self-test passes the daemon calls ``mark_good`` (or
``mark_bad`` when it fails).

Every durable step the store takes (write, fsync, rename, mkdir, delete) goes through
``m4image.durable.crashpoint``; the fault-injection tests replace it (tests/hooks) to SIGKILL a
real install/activate/rollback at each of those points.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m4image import boot
from m4image.boot import (
    AlreadyActiveError,
    BootSelection,
    DowngradeError,
    ImageInUseError,
    NoBootableImageError,
    NoPreviousImageError,
    NoTrialError,
    WrongStateError,
)
from m4image.durable import crashpoints_passed
from m4image.install import (
    Admission,
    DuplicateEntryError,
    ImageTooLargeError,
    InsufficientSpaceError,
    Staging,
    UnexpectedEntryError,
    fill_from_dir,
    fill_from_tar,
)
from m4image.keys import Keyring
from m4image.manifest import ImageError, Manifest, ManifestError
from m4image.state import (
    STATE_FORMAT,
    ImageRecord,
    State,
    StateCorruptError,
    StateMissingError,
    StoreError,
    now_text,
)
from m4image.statedir import StoreDir
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


# ---- errors: one class per failure kind (state file: m4image.state; boot: m4image.boot) ----


class ImageNotFoundError(StoreError):
    """No installed image matches the digest, prefix or version given."""


class AmbiguousReferenceError(StoreError):
    """A digest prefix or version matches more than one installed image."""


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
    """The gRPC status code name for an image or store error (for the admin servicer); an
    error class may name its own (``status_code``, e.g. the add-on store's not-found)."""
    own = getattr(type(exc), "status_code", None)
    if isinstance(own, str):
        return own
    for cls, code in _STATUS_CODES:
        if isinstance(exc, cls):
            return code
    return "INTERNAL"


@dataclass(frozen=True)
class ImageEntry(ImageRecord):
    """One installed image, as ``list()`` shows it: its record, digest and role."""

    digest: str
    state: str  # active, previous, trial or installed


@dataclass(frozen=True)
class StoreStatus:
    """The boot state: digests of the active, previous and trial images, attempts, floor."""

    active: str | None
    previous: str | None
    trial: str | None
    attempts: int
    max_security_version: int


# ---- the store --------------------------------------------------------------------------------


class Store(StoreDir[State]):
    """The image store in one state directory (``m4image.statedir``): installed images, which
    one boots, and the way back; safe across threads and processes."""

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
        self.compatible = compatible
        self.daemon_version = daemon_version
        self.max_image_bytes = max_image_bytes
        super().__init__(state_dir, history_limit=history_limit, clock=clock, entries="images",
                         new_state=State, parse_state=State.from_bytes)

    @property
    def images_dir(self) -> Path:
        """``images/``: one directory per installed image, named by its digest."""
        return self.entries_dir

    # ---- queries ------------------------------------------------------------------------------

    def status(self) -> StoreStatus:
        s = self._load()
        return StoreStatus(s.active, s.previous, s.trial, s.attempts, s.max_security_version)

    def list(self) -> list[ImageEntry]:
        """Installed images, oldest install first."""
        s = self._load()
        roles = {s.trial: "trial", s.previous: "previous", s.active: "active"}
        out = [ImageEntry(**r.to_dict(), digest=d, state=roles.get(d, "installed"))
               for d, r in s.images.items()]
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

    def _publish(self, staging: Staging[Manifest], digest: str) -> str:
        """Rename a complete staging directory to images/<digest> and record it."""
        assert staging.manifest is not None
        state = self._load()
        if digest in state.images:
            staging.abort()
            return digest
        self._publish_entry(staging.dir, digest)
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
        fill: Callable[[Staging[Manifest]], None],
        keyring: Keyring | None,
        allow_downgrade: bool,
        progress: Callable[[str, int, int], None] | None,
    ) -> str:
        def check_floor(m: Manifest) -> None:
            boot.check_floor(self._load(), m.name, m.version, m.security_version, allow_downgrade)

        admission = Admission(keyring, self.compatible, self.daemon_version, self.max_image_bytes,
                              check_floor)
        with self._locked():
            staging = Staging(self.staging_dir, admission, progress)
            try:
                fill(staging)
                return self._publish(staging, staging.commit())
            except BaseException:
                staging.abort()
                raise

    # ---- boot state machine (the transitions: m4image.boot) ----------------------------------

    def _record(self, state: State, event: str, digest: str | None, detail: str) -> None:
        """Append the event to the history and save the state (a transition done)."""
        self._event(state, event, digest, detail)
        self._save(state)

    def activate(self, ref: str, *, allow_downgrade: bool = False) -> str:
        """Make an installed image the trial (attempts = 0); it boots next and must be marked
        good. Returns its digest."""
        with self._locked():
            state = self._load()
            digest = self._resolve(state, ref)
            self._record(state, "activate", digest, boot.activate(state, digest, allow_downgrade))
            return digest

    def record_attempt(self) -> int:
        """Count one boot of the trial, durably; returns the attempt number."""
        with self._locked():
            state = self._load()
            detail = boot.count_attempt(state)
            self._record(state, "boot-attempt", state.trial, detail)
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
                self._record(state, "fallback", failed, boot.abandon_trial(state, max_attempts))
                fell_back = True
            active = boot.boot_image(state)
            return BootSelection(active, self.path_of(active), False, 0, fell_back)

    def mark_good(self, digest: str | None = None) -> str:
        """The trial passed its self-test: it becomes active, the old active becomes previous,
        and the anti-rollback floor rises to its security_version."""
        with self._locked():
            state = self._load()
            trial = boot.require_trial(state, digest, lambda ref: self._resolve(state, ref), "mark good")
            self._record(state, "mark-good", trial, boot.mark_good(state, trial))
            return trial

    def mark_bad(self, digest: str | None = None, reason: str = "") -> str:
        """The trial failed (self-test, load error): drop it at once; the active image stays."""
        with self._locked():
            state = self._load()
            trial = boot.require_trial(state, digest, lambda ref: self._resolve(state, ref), "mark bad")
            self._record(state, "mark-bad", trial, boot.mark_bad(state, reason))
            return trial

    def rollback(self, *, allow_downgrade: bool = False) -> str:
        """Go back to the previous good image: active <-> previous; a pending trial is dropped."""
        with self._locked():
            state = self._load()
            detail = boot.rollback(state, allow_downgrade)
            assert state.active is not None
            self._record(state, "rollback", state.active, detail)
            return state.active

    def remove(self, ref: str) -> str:
        """Delete an installed image that is not active, previous or on trial."""
        with self._locked():
            state = self._load()
            digest = self._resolve(state, ref)
            boot.check_removable(state, digest)
            rec = state.images.pop(digest)
            self._event(state, "remove", digest, f"{rec.name} {rec.version}")
            self._save(state)  # state first: a crash now leaves a stray folder, removed on open
            self._discard(self.path_of(digest))
            return digest
