"""Firmware image, install pipeline: verify first, then write only what was verified.

``Staging`` is one install in progress: a 0700 directory under the store's ``staging/``. It
accepts the manifest only after the signature (over the exact bytes), ``compatible``,
``min_daemon_version``, the anti-rollback floor, the size cap and the free space are checked;
then each listed file is written from its chunks while being hashed, so the bytes checked are
the bytes installed, with no second read. ``commit`` hands the complete directory to the
store, which publishes it with one rename. ``fill_from_dir`` and ``fill_from_tar`` feed a
staging directory from an image directory or from a streamed tar.

Add-ons (``m4image.addon``) are installed by the same pipeline: ``Staging`` takes whatever
``Admits`` manifests of one ``Layout`` (the image's ``Admission`` here, the add-on store's
own), and writes, hashes and checks the files that manifest lists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from m4image import manifest as mf
from m4image.durable import crashpoint, fsync_dir_step, write_all
from m4image.keys import BadSignatureError, Keyring
from m4image.layout import IMAGE, Layout
from m4image.signature import KeyringSignatureCheck
from m4image.tarstream import BLOCK, MAX_PAX_BYTES, ArchiveError, TarReader
from m4image.verify import (
    ExtraFileError,
    HashMismatchError,
    MissingFileError,
    SignatureCheck,
    SizeMismatchError,
    UnsafePathError,
    check_manifest,
    read_manifest_bytes,
    read_signature_bytes,
    scan_files,
)

__all__ = [
    "Admission",
    "Admits",
    "DuplicateEntryError",
    "ImageTooLargeError",
    "InsufficientSpaceError",
    "Staging",
    "UnexpectedEntryError",
    "fill_from_dir",
    "fill_from_tar",
]

SPACE_MARGIN = 64 << 20  # keep this much free after an install
CHUNK = 1 << 20


class ImageTooLargeError(mf.ImageError):
    """The manifest's files add up to more than the store accepts."""


class InsufficientSpaceError(mf.ImageError):
    """The state directory's filesystem cannot hold the image."""


class DuplicateEntryError(ArchiveError):
    """The install tar holds the same path twice."""


class UnexpectedEntryError(ArchiveError):
    """The install tar is out of order: manifest.json first, manifest.sig second, then files."""


class Listed(Protocol):
    """What the install needs of a manifest: its name and version (for messages) and the
    files it lists."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def files(self) -> Mapping[str, mf.FileEntry]: ...


M = TypeVar("M", bound=Listed)
M_co = TypeVar("M_co", bound=Listed, covariant=True)


class Admits(Protocol[M_co]):
    """What a store accepts: ``admit`` checks the exact manifest bytes and the signature's
    (signature first) and returns the parsed manifest and the signing key id, or raises."""

    @property
    def layout(self) -> Layout: ...
    @property
    def max_bytes(self) -> int: ...

    def admit(self, data: bytes, signature: bytes | None) -> tuple[M_co, str | None]: ...


@dataclass(frozen=True)
class Admission:
    """What a store accepts: images signed by a key of ``keyring`` (None: unchecked), built
    for this device and daemon, of at most ``max_image_bytes``, and not below the
    anti-rollback floor (``check_floor`` raises when the manifest is)."""

    keyring: Keyring | None
    compatible: str | None
    daemon_version: str | None
    max_image_bytes: int
    check_floor: Callable[[mf.Manifest], None]

    @property
    def layout(self) -> Layout:
        return IMAGE

    @property
    def max_bytes(self) -> int:
        return self.max_image_bytes

    def admit(self, data: bytes, signature: bytes | None) -> tuple[mf.Manifest, str | None]:
        check: SignatureCheck | None = None
        if self.keyring is not None:
            check = KeyringSignatureCheck(self.keyring)
        manifest, key_id = check_manifest(data, signature, signature_check=check,
                                          expected_compatible=self.compatible,
                                          daemon_version=self.daemon_version)
        self.check_floor(manifest)
        return manifest, key_id


def check_entry_path(path: str, layout: Layout = IMAGE) -> None:
    bad = (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("..", ".", "") for part in path.split("/"))
    )
    if bad:
        raise UnsafePathError(
            f"the install tar holds the unsafe path {path!r} (absolute, '..' or empty parts); "
            f"the tar is malformed or malicious: nothing was installed ({layout.kind})"
        )


def folders(paths: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for rel in paths:
        parts = rel.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


class Staging(Generic[M]):
    """One install in progress: a 0700 directory under the store's ``staging/``, filled only
    with the manifest's files, each hashed while written; ``commit`` checks that it is
    complete, and the store then publishes it with one rename (holding its lock throughout)."""

    def __init__(
        self,
        staging_dir: Path,
        admission: Admits[M],
        progress: Callable[[str, int, int], None] | None,
    ) -> None:
        self.admission = admission
        self.layout = admission.layout
        self.progress = progress
        crashpoint()
        self.dir = Path(tempfile.mkdtemp(prefix="install-", dir=staging_dir))  # mode 0700
        self.store_root = staging_dir.parent  # named in the message about free space
        self.manifest: M | None = None
        self.manifest_bytes = b""
        self.key_id: str | None = None
        self.written: set[str] = set()
        self.folders: set[str] = set()
        self.made: set[str] = set()
        self.total = 0
        self.done = 0

    def accept_manifest(self, data: bytes, signature: bytes | None) -> M:
        kind, limit = self.layout.kind, self.admission.max_bytes
        manifest, key_id = self.admission.admit(data, signature)
        self.total = sum(e.size for e in manifest.files.values())
        if self.total > limit:
            raise ImageTooLargeError(
                f"{kind} {manifest.name} {manifest.version} holds {self.total} bytes, over "
                f"this store's limit of {limit}; raise the limit in the daemon's config if "
                f"the {kind} is genuine"
            )
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if free < self.total + SPACE_MARGIN:
            raise InsufficientSpaceError(
                f"{self.store_root} has {free} bytes free, the {kind} needs {self.total} "
                f"(+{SPACE_MARGIN} spare); {self.layout.remove}"
            )
        self.manifest, self.manifest_bytes, self.key_id = manifest, data, key_id
        self.folders = folders(manifest.files)
        self._write_whole(self.layout.manifest, data)
        if signature is not None:
            self._write_whole(self.layout.signature, signature)
        return manifest

    def _write_whole(self, name: str, data: bytes) -> None:
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            crashpoint()
            os.fsync(fd)
        finally:
            os.close(fd)

    def _make_parents(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self.made:
                crashpoint()
                os.mkdir(self.dir / sub, 0o755)
                self.made.add(sub)

    def write_file(self, rel: str, chunks: Iterable[bytes], declared_size: int | None = None) -> None:
        """Write one listed file from ``chunks``, hashing the very bytes written."""
        assert self.manifest is not None
        entry = self.manifest.files.get(rel)
        if entry is None:
            raise ExtraFileError(
                f"{rel} is not listed in the manifest; an {self.layout.kind} may only hold the "
                "files its signed manifest lists: nothing was installed"
            )
        if rel in self.written:
            raise DuplicateEntryError(f"{rel} appears twice in the install tar; nothing was installed")
        if declared_size is not None and declared_size != entry.size:
            what = "truncated" if declared_size < entry.size else "larger than listed"
            raise SizeMismatchError(
                f"{rel} is {declared_size} bytes in the tar, the manifest says {entry.size} "
                f"({what}); re-create the tar from a verified image: nothing was installed"
            )
        self._make_parents(rel)
        crashpoint()
        fd = os.open(self.dir / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        h = hashlib.sha256()
        n = 0
        try:
            for chunk in chunks:
                n += len(chunk)
                if n > entry.size:
                    raise SizeMismatchError(
                        f"{rel} is larger than the {entry.size} bytes the manifest lists: "
                        "nothing was installed"
                    )
                h.update(chunk)
                write_all(fd, chunk)
                self.done += len(chunk)
                if self.progress:
                    self.progress("install", self.done, self.total)
            if n != entry.size:
                raise SizeMismatchError(
                    f"{rel} is {n} bytes, the manifest says {entry.size} (truncated): "
                    "nothing was installed"
                )
            if h.hexdigest() != entry.sha256:
                raise HashMismatchError(
                    f"{rel} has sha256 {h.hexdigest()}, the manifest says {entry.sha256} "
                    f"(corrupted in transfer or tampered): nothing was installed; get the "
                    f"{self.layout.kind} again"
                )
            crashpoint()
            os.fsync(fd)
        finally:
            os.close(fd)
        self.written.add(rel)

    def commit(self) -> str:
        """Check that every listed file was written and make the directory durable; returns
        the image's digest, for the store to publish it under."""
        assert self.manifest is not None
        missing = sorted(set(self.manifest.files) - self.written)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingFileError(
                f"{missing[0]}{more} is listed in the manifest but was not in the install "
                f"tar: nothing was installed; send the whole {self.layout.kind}"
            )
        for sub in sorted(self.made, key=lambda s: -s.count("/")):
            fsync_dir_step(self.dir / sub)
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def file_chunks(path: Path, size: int) -> Iterator[bytes]:
    """A source file's bytes (no links, regular file), one past ``size`` to detect growth."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MissingFileError(f"{path} is listed in the manifest but missing: nothing was installed") from None
    except OSError as e:
        raise UnsafePathError(f"{path} cannot be opened safely ({e.strerror}): nothing was installed") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{path} is not a regular file: nothing was installed")
        left = size + 1
        while left > 0 and (block := os.read(fd, min(CHUNK, left))):
            left -= len(block)
            yield block
    finally:
        os.close(fd)


def fill_from_dir(staging: Staging[M], root: Path) -> None:
    """Stage an image directory: the manifest read once, each listed file read once and
    hashed as it is copied; unlisted files, links and special files are refused."""
    layout = staging.layout
    manifest = staging.accept_manifest(read_manifest_bytes(root, layout),
                                       read_signature_bytes(root, layout))
    extra = sorted(scan_files(root, layout) - set(layout.reserved) - set(manifest.files))
    if extra:
        raise ExtraFileError(
            f"{extra[0]} is in {root} but not listed in the manifest; remove it or "
            f"rebuild the {layout.kind}: nothing was installed"
        )
    for rel, entry in sorted(manifest.files.items()):
        staging.write_file(rel, file_chunks(root / rel, entry.size))


def fill_from_tar(staging: Staging[M], chunks: Iterable[bytes]) -> None:
    """Stage an image from an uncompressed tar arriving in chunks.

    The tar must hold manifest.json first, then manifest.sig, then only files the manifest
    lists (folders may appear too); an add-on's: addon.json, addon.sig, then its files. Links,
    devices, unsafe or duplicate paths, unlisted files, and sizes other than the manifest's
    are refused before their bytes are written; hashes are checked as each file is written.
    """
    layout = staging.layout
    kind, manifest_name, signature_name = layout.kind, layout.manifest, layout.signature
    limit = layout.max_manifest_bytes
    head_limit = limit + mf.MAX_SIGNATURE_BYTES + 4 * (3 * BLOCK + MAX_PAX_BYTES)
    reader = TarReader(chunks, limit=head_limit)
    first = reader.next_entry()
    if first is None or first.kind != "file" or first.path != manifest_name:
        got = "an empty archive" if first is None else f"{first.kind} {first.path!r}"
        raise UnexpectedEntryError(
            f"the install tar must start with {manifest_name}, it starts with {got}; "
            f"create it with {layout.tar}"
        )
    if first.size > limit:
        raise mf.ManifestError(
            f"{manifest_name} is {first.size} bytes, over the {limit}-byte "
            f"limit; this is not an {kind} this daemon can load"
        )
    data = b"".join(reader.data(manifest_name))
    entry = reader.next_entry()
    signature = None
    if entry is not None and entry.path == signature_name:
        if entry.kind != "file":
            raise UnsafePathError(f"{signature_name} is a {entry.kind} entry; it must be a file")
        if entry.size > mf.MAX_SIGNATURE_BYTES:
            raise BadSignatureError(
                f"{signature_name} is {entry.size} bytes, over {mf.MAX_SIGNATURE_BYTES}: it "
                f"is not an m4 signature; re-sign the {kind}"
            )
        signature = b"".join(reader.data(signature_name))
        entry = reader.next_entry()
    manifest = staging.accept_manifest(data, signature)
    n_entries = len(manifest.files) + len(staging.folders) + 2
    reader.limit = (reader.bytes_read
                    + sum(e.size + (-e.size % BLOCK) for e in manifest.files.values())
                    + n_entries * (3 * BLOCK + 4096) + (1 << 20))  # fmt: skip
    seen = {manifest_name, signature_name}
    while entry is not None:
        if entry.path != "" or entry.kind != "dir":
            check_entry_path(entry.path, layout)
        if entry.path in seen:
            raise DuplicateEntryError(
                f"{entry.path!r} appears twice in the install tar (or out of order: "
                f"{manifest_name} first, {signature_name} second); nothing was installed"
            )
        seen.add(entry.path)
        if entry.kind == "dir":
            if entry.path and entry.path not in staging.folders:
                raise ExtraFileError(
                    f"folder {entry.path!r} holds no file the manifest lists; "
                    "nothing was installed"
                )
            reader.skip()
        elif entry.kind == "file":
            staging.write_file(entry.path, reader.data(entry.path), declared_size=entry.size)
        else:
            raise UnsafePathError(
                f"{entry.path!r} is a {entry.kind} entry in the install tar; an {kind} "
                "holds regular files only: nothing was installed"
            )
        entry = reader.next_entry()
