"""Firmware image, verification: the gate every image passes before the store or daemon uses it.

Order (as RAUC): read manifest.json (size-capped), check the signature hook, parse the
manifest strictly, refuse unsafe paths, links and unlisted files, then check every listed
file's size and sha256. Only ``verify_image`` creates a ``VerifiedImage``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from m4image.fsutil import sha256_fd
from m4image.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    ImageError,
    Manifest,
    ManifestError,
)

__all__ = [
    "ExtraFileError",
    "HashMismatchError",
    "ImageError",
    "ManifestError",
    "MissingFileError",
    "SignatureCheck",
    "SignatureError",
    "SizeMismatchError",
    "UnsafePathError",
    "VerifiedImage",
    "verify_image",
]

_REBUILD = "rebuild or re-download the image (m4ctl image build / install)"


class MissingFileError(ImageError):
    """A file listed in the manifest is absent."""


class ExtraFileError(ImageError):
    """The image directory holds a file the manifest does not list."""


class SizeMismatchError(ImageError):
    """A file's size differs from the manifest (truncated or appended)."""


class HashMismatchError(ImageError):
    """A file's sha256 differs from the manifest (corrupted or tampered)."""


class UnsafePathError(ImageError):
    """A path escapes the image (``..``, absolute) or is a link or special file."""


class SignatureError(ImageError):
    """manifest.sig does not verify (raised by a SignatureCheck; signing comes later)."""


# Signature hook: called with the exact manifest bytes and the bytes of manifest.sig (None when
# absent) before the manifest is parsed; raises SignatureError to reject. When no check is
# given, manifest.sig is ignored whether or not it is present.
SignatureCheck = Callable[[bytes, "bytes | None"], None]

_TOKEN = object()


@dataclass(frozen=True)
class VerifiedImage:
    """An image directory whose manifest and every file were checked. Only verify_image makes one."""

    path: Path
    manifest: Manifest
    digest: str  # sha256 hex of the manifest.json bytes: the image's identity
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("VerifiedImage is only created by m4image.verify.verify_image()")

    def file(self, relative: str) -> Path:
        """Absolute path of a file the manifest lists."""
        if relative not in self.manifest.files:
            raise KeyError(f"{relative!r} is not a file of image {self.digest[:12]}")
        return self.path / relative


def check_relative_path(rel: str) -> PurePosixPath:
    """A manifest path must be relative, POSIX, normalised and stay inside the image."""
    p = PurePosixPath(rel)
    bad = (
        not rel
        or "\\" in rel
        or "\x00" in rel
        or p.is_absolute()
        or any(part in ("..", ".", "") for part in rel.split("/"))
    )
    if bad:
        raise UnsafePathError(
            f"manifest lists unsafe path {rel!r} (absolute, '..', '.', empty or backslash parts); "
            f"the image is malformed or malicious: {_REBUILD}"
        )
    if rel in (MANIFEST_NAME, SIGNATURE_NAME):
        raise UnsafePathError(f"manifest lists {rel!r} as a payload file; it must not: {_REBUILD}")
    return p


def _read_manifest(root: Path) -> bytes:
    path = root / MANIFEST_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing; {root} is not a firmware image") from None
    except OSError as e:
        if os.path.islink(path):
            raise UnsafePathError(f"{path} is a symbolic link; images must hold regular files: {_REBUILD}") from None
        raise ManifestError(f"cannot read {path}: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path} is not a regular file: {_REBUILD}")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path} is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit; refusing to parse it"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        return data
    finally:
        os.close(fd)


def _scan(root: Path) -> set[str]:
    """Every regular file under root as a relative POSIX path; links and special files raise."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(f"{rel} is a symbolic link; images must hold regular files only: {_REBUILD}")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{rel} is not a regular file (device, fifo or socket): {_REBUILD}")
            found.add(rel)
    return found


def _check_file(root: Path, rel: str, size: int, sha256: str) -> None:
    path = root / rel
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise MissingFileError(f"{rel} is listed in the manifest but missing from {root}: {_REBUILD}") from None
    except OSError as e:
        raise UnsafePathError(f"{rel} cannot be opened safely ({e.strerror}): {_REBUILD}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{rel} is not a regular file: {_REBUILD}")
        if st.st_size != size:
            what = "truncated" if st.st_size < size else "larger than listed"
            raise SizeMismatchError(
                f"{rel} is {st.st_size} bytes, the manifest says {size} ({what}): {_REBUILD}"
            )
        digest, n = sha256_fd(fd)
        if n != size:
            raise SizeMismatchError(f"{rel} changed size while being read ({n} != {size}): {_REBUILD}")
        if digest != sha256:
            raise HashMismatchError(
                f"{rel} has sha256 {digest}, the manifest says {sha256} (corrupted or tampered): {_REBUILD}"
            )
    finally:
        os.close(fd)


def verify_image(
    directory: str | Path,
    *,
    signature_check: SignatureCheck | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> VerifiedImage:
    """Verify an image directory; return a VerifiedImage or raise an ImageError subclass."""
    root = Path(directory)
    if root.is_symlink():
        raise UnsafePathError(f"{root} is a symbolic link; pass the image directory itself")
    if not root.is_dir():
        raise ManifestError(f"{root} is not a directory; expected a firmware image directory")
    data = _read_manifest(root)
    if signature_check is not None:
        sig_path = root / SIGNATURE_NAME
        sig = sig_path.read_bytes() if sig_path.is_file() and not sig_path.is_symlink() else None
        signature_check(data, sig)
    manifest = Manifest.from_json(data)

    for rel in manifest.files:
        check_relative_path(rel)
    present = _scan(root) - {MANIFEST_NAME, SIGNATURE_NAME}
    extra = sorted(present - set(manifest.files))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ExtraFileError(
            f"{extra[0]}{more} is in {root} but not listed in the manifest; "
            f"remove it or {_REBUILD}"
        )
    total = len(manifest.files)
    for i, (rel, entry) in enumerate(sorted(manifest.files.items()), 1):
        _check_file(root, rel, entry.size, entry.sha256)
        if progress:
            progress("verify files", i, total)
    return VerifiedImage(
        path=root.resolve(), manifest=manifest, digest=hashlib.sha256(data).hexdigest(), _token=_TOKEN
    )
