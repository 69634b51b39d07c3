"""Firmware image, verification: the gate every image passes before the store or daemon uses it.

Order (as RAUC): read manifest.json once (size-capped), check the signature over exactly those
bytes (a ``Keyring`` or a ``SignatureCheck`` hook), parse the manifest strictly, check that it
is meant for this device (``compatible``) and this daemon (``min_daemon_version``), refuse
unsafe paths, links and unlisted files, then check every listed file's size and sha256. Only
``verify_image`` creates a ``VerifiedImage``.

``check_manifest`` is the same gate for the manifest alone; the image store's streamed install
uses it before it writes any payload byte, then hashes each file while writing it.

The file-level checks (the manifest read once, the signature file, safe paths, no unlisted
file, every file's size and hash: ``check_payload``) take a ``Layout``, so add-ons
(``m4image.addon``) are verified by the same code as images.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from m4image.fsutil import sha256_fd
from m4image.keys import Keyring, SignatureError
from m4image.layout import IMAGE, Layout
from m4image.manifest import (
    MAX_SIGNATURE_BYTES,
    FileEntry,
    ImageError,
    Manifest,
    ManifestError,
)
from m4image.signature import KeyringSignatureCheck

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "DaemonTooOldError",
    "ExtraFileError",
    "HashMismatchError",
    "ImageError",
    "IncompatibleImageError",
    "ManifestError",
    "MissingFileError",
    "SignatureCheck",
    "SignatureError",
    "SizeMismatchError",
    "UnsafePathError",
    "VerifiedImage",
    "check_file_table",
    "check_manifest",
    "check_paths",
    "check_payload",
    "check_relative_path",
    "parse_version",
    "read_manifest_bytes",
    "read_signature_bytes",
    "scan_files",
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


class IncompatibleImageError(ImageError):
    """The manifest's ``compatible`` string is not this device's: the image is for other hardware."""


class DaemonTooOldError(ImageError):
    """The manifest's ``min_daemon_version`` is newer than the daemon that would load it."""


# Signature hook: called with the exact manifest bytes and the bytes of manifest.sig (None when
# absent) before the manifest is parsed; raises SignatureError to reject, and may return the id
# of the key that signed (kept in VerifiedImage.signed_by). When neither a check nor a keyring
# is given, manifest.sig is ignored whether or not it is present (development images).
SignatureCheck = Callable[[bytes, "bytes | None"], "str | None"]

_TOKEN = object()


@dataclass(frozen=True)
class VerifiedImage:
    """An image directory whose manifest and every file were checked. Only verify_image makes one."""

    path: Path
    manifest: Manifest
    digest: str  # sha256 hex of the manifest.json bytes: the image's identity
    signed_by: str | None = None  # key id that signed it; None when no signature was checked
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("VerifiedImage is only created by m4image.verify.verify_image()")

    def file(self, relative: str) -> Path:
        """Absolute path of a file the manifest lists."""
        if relative not in self.manifest.files:
            raise KeyError(f"{relative!r} is not a file of image {self.digest[:12]}")
        return self.path / relative


def check_relative_path(rel: str, layout: Layout = IMAGE) -> PurePosixPath:
    """A manifest path must be relative, POSIX, normalised and stay inside the image."""
    rebuild = layout.rebuild
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
            f"the {layout.kind} is malformed or malicious: {rebuild}"
        )
    if rel in layout.reserved:
        raise UnsafePathError(f"manifest lists {rel!r} as a payload file; it must not: {rebuild}")
    return p


def _open_regular(path: Path, name: str,
                  refused: Callable[[OSError], ImageError]) -> tuple[int, os.stat_result] | None:
    """``path`` opened read-only without following a link, checked to be a regular file: its
    fd (the caller closes it) and stat; None when it is missing. Any other failure to open it
    is ``refused(error)``; a file that is not a regular one, UnsafePathError naming ``name``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise refused(e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{name} is not a regular file: {_REBUILD}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _link_or(path: Path, error: ImageError) -> ImageError:
    """UnsafePathError when ``path`` is a symbolic link (so it could not be opened), else ``error``."""
    if os.path.islink(path):
        return UnsafePathError(f"{path} is a symbolic link; images must hold regular files: {_REBUILD}")
    return error


def _read_and_close(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from ``fd``, which is closed after."""
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit)
    finally:
        os.close(fd)


def read_manifest_bytes(root: Path, layout: Layout = IMAGE) -> bytes:
    """The exact bytes of ``root/manifest.json`` (no links, regular file, size-capped), read once."""
    path = root / layout.manifest
    limit = layout.max_manifest_bytes
    opened = _open_regular(path, str(path), lambda e: _link_or(path, ManifestError(f"cannot read {path}: {e}")))
    if opened is None:
        what = "a firmware image" if layout is IMAGE else f"an {layout.kind}"
        raise ManifestError(f"{path} is missing; {root} is not {what}")
    fd, st = opened
    if st.st_size > limit:
        os.close(fd)
        raise ManifestError(
            f"{path} is {st.st_size} bytes, over the {limit}-byte limit; refusing to parse it"
        )
    return _read_and_close(fd, limit + 1)


def read_signature_bytes(root: Path, layout: Layout = IMAGE) -> bytes | None:
    """The bytes of ``root/manifest.sig`` (capped), or None when the image has none."""
    path = root / layout.signature
    opened = _open_regular(path, str(path), lambda e: _link_or(path, SignatureError(f"cannot read {path}: {e}")))
    if opened is None:
        return None
    return _read_and_close(opened[0], MAX_SIGNATURE_BYTES + 1)  # the checker refuses anything over the cap


def scan_files(root: Path, layout: Layout = IMAGE) -> set[str]:
    """Every regular file under root as a relative POSIX path; links and special files raise."""
    fix = layout.rebuild
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePathError(f"{rel} is a symbolic link; images must hold regular files only: {fix}")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{rel} is not a regular file (device, fifo or socket): {fix}")
            found.add(rel)
    return found


def _check_file(root: Path, rel: str, size: int, sha256: str, fix: str) -> None:
    opened = _open_regular(root / rel, rel, lambda e: UnsafePathError(
        f"{rel} cannot be opened safely ({e.strerror}): {fix}"))
    if opened is None:
        raise MissingFileError(f"{rel} is listed in the manifest but missing from {root}: {fix}")
    fd, st = opened
    try:
        if st.st_size != size:
            what = "truncated" if st.st_size < size else "larger than listed"
            raise SizeMismatchError(
                f"{rel} is {st.st_size} bytes, the manifest says {size} ({what}): {fix}"
            )
        digest, n = sha256_fd(fd)
        if n != size:
            raise SizeMismatchError(f"{rel} changed size while being read ({n} != {size}): {fix}")
        if digest != sha256:
            raise HashMismatchError(
                f"{rel} has sha256 {digest}, the manifest says {sha256} (corrupted or tampered): {fix}"
            )
    finally:
        os.close(fd)


_VERSION = re.compile(r"^(\d+(?:\.\d+)*)(?:[-+.]?[0-9A-Za-z.+-]*)?$")


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.1.0"`` -> ``(0, 1, 0)``; a suffix (``0.2.0rc1``, ``0.2.0+local``) is ignored.

    Trailing zeros do not count (``1.0`` == ``1.0.0``). Raises ValueError on anything else.
    """
    m = _VERSION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a dotted version number such as 0.1.0")
    parts = [int(x) for x in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def check_file_table(manifest: Manifest) -> None:
    """Every listed path is safe, and no listed file is also the folder of another one."""
    check_paths(manifest.files)


def check_paths(files: Mapping[str, object], layout: Layout = IMAGE) -> None:
    """Every listed path is safe, and no listed file is also the folder of another one."""
    folders: set[str] = set()
    for rel in files:
        check_relative_path(rel, layout)
        parts = rel.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(folders & set(files))
    if clash:
        raise UnsafePathError(
            f"manifest lists {clash[0]!r} both as a file and as the folder of other files: "
            f"{layout.rebuild}"
        )


def check_manifest(
    data: bytes,
    signature: bytes | None,
    *,
    signature_check: SignatureCheck | None = None,
    expected_compatible: str | None = None,
    daemon_version: str | None = None,
) -> tuple[Manifest, str | None]:
    """The manifest half of verification, on bytes already read once.

    Signature first (over exactly ``data``), then the strict parse, then ``compatible`` and
    ``min_daemon_version``, then the file table's paths. Returns the manifest and the signing
    key id (None when no signature check was asked for).
    """
    key_id = signature_check(data, signature) if signature_check is not None else None
    manifest = Manifest.from_json(data)
    if expected_compatible is not None and manifest.compatible != expected_compatible:
        raise IncompatibleImageError(
            f"image {manifest.name} {manifest.version} is built for {manifest.compatible!r}, "
            f"this device is {expected_compatible!r}; get the image built for {expected_compatible!r}"
        )
    if daemon_version is not None:
        try:
            needed = parse_version(manifest.min_daemon_version)
        except ValueError as e:
            raise ManifestError(f"manifest.min_daemon_version: {e}; {_REBUILD}") from None
        if parse_version(daemon_version) < needed:
            raise DaemonTooOldError(
                f"image {manifest.name} {manifest.version} needs m4d >= {manifest.min_daemon_version}, "
                f"this daemon is {daemon_version}; update m4d first, then install the image"
            )
    check_file_table(manifest)
    return manifest, key_id


def check_payload(root: Path, files: Mapping[str, FileEntry], layout: Layout = IMAGE, *,
                  progress: Callable[[str, int, int], None] | None = None) -> None:
    """The directory holds exactly the listed files (besides the manifest and signature),
    regular files with the listed sizes and sha256."""
    present = scan_files(root, layout) - set(layout.reserved)
    extra = sorted(present - set(files))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ExtraFileError(
            f"{extra[0]}{more} is in {root} but not listed in the manifest; "
            f"remove it or {layout.rebuild}"
        )
    total = len(files)
    entries = sorted(files.items())
    # hashlib and os.read let go of the GIL: files are hashed side by side (a boot verifies
    # every byte), and a failure is reported for the first bad file in path order
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        checks = pool.map(lambda item: _check_file(root, item[0], item[1].size, item[1].sha256,
                                                   layout.rebuild), entries)
        for i, _ in enumerate(checks, 1):
            if progress:
                progress("verify files", i, total)


def verify_image(
    directory: str | Path,
    *,
    keyring: Keyring | None = None,
    signature_check: SignatureCheck | None = None,
    expected_compatible: str | None = None,
    daemon_version: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> VerifiedImage:
    """Verify an image directory; return a VerifiedImage or raise an ImageError subclass.

    With ``keyring`` (or a ``signature_check`` hook) manifest.sig must verify against a trusted,
    unrevoked key before anything else is looked at. Without either the signature is not
    checked: development images. ``expected_compatible`` and ``daemon_version`` are checked
    when given.
    """
    if keyring is not None and signature_check is not None:
        raise ValueError("pass keyring or signature_check, not both")
    if keyring is not None:
        signature_check = KeyringSignatureCheck(keyring)
    root = Path(directory)
    if root.is_symlink():
        raise UnsafePathError(f"{root} is a symbolic link; pass the image directory itself")
    if not root.is_dir():
        raise ManifestError(f"{root} is not a directory; expected a firmware image directory")
    data = read_manifest_bytes(root)
    signature = read_signature_bytes(root) if signature_check is not None else None
    manifest, key_id = check_manifest(
        data,
        signature,
        signature_check=signature_check,
        expected_compatible=expected_compatible,
        daemon_version=daemon_version,
    )
    check_payload(root, manifest.files, progress=progress)
    return VerifiedImage(
        path=root.resolve(),
        manifest=manifest,
        digest=hashlib.sha256(data).hexdigest(),
        signed_by=key_id,
        _token=_TOKEN,
    )
