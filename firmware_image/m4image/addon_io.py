"""Add-on, files: verify an add-on directory, write and sign one, send it as a tar.

The same gate as an image's (``m4image.verify``, with the add-on's ``Layout``): addon.json is
read once, the signature over exactly those bytes is checked first (with a keyring), then the
manifest is parsed, then the directory must hold exactly the listed files with their sizes
and hashes. Only ``verify_addon`` makes a ``VerifiedAddon``. Writing publishes the whole
directory with one rename (``fsutil.publish_dir``) and signs it with a vendor key
(``m4image.sign``); the tar is the order the store's streamed install reads: addon.json,
addon.sig, then the files.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from m4image.addon import ADDON, AddonManifest, build_addon_manifest
from m4image.fsutil import atomic_file, atomic_write_bytes, publish_dir, sha256_file
from m4image.keys import Keyring, key_id_of
from m4image.manifest import FileEntry, ImageError, Task
from m4image.sign import load_private_key, sign_manifest
from m4image.signature import KeyringSignatureCheck
from m4image.tarstream import iter_signed_tar
from m4image.verify import (
    UnsafePathError,
    check_paths,
    check_payload,
    read_manifest_bytes,
    read_signature_bytes,
)

__all__ = ["VerifiedAddon", "iter_addon_tar", "sign_addon", "verify_addon", "write_addon",
           "write_addon_tar"]

_TOKEN = object()


@dataclass(frozen=True)
class VerifiedAddon:
    """An add-on directory whose signature (when checked), manifest and every file were
    checked. Only verify_addon makes one."""

    path: Path
    manifest: AddonManifest
    digest: str  # sha256 of the addon.json bytes: the add-on's identity
    signed_by: str | None = None  # key id; None when no signature was checked
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("VerifiedAddon is only created by m4image.addon_io.verify_addon()")

    @property
    def size(self) -> int:
        return sum(e.size for e in self.manifest.files.values())


def read_addon(data: bytes, signature: bytes | None,
               keyring: Keyring | None) -> tuple[AddonManifest, str | None]:
    """The manifest half of verification, on bytes read once: the signature first (with a
    keyring), then the strict parse and the file table's paths."""
    key_id = KeyringSignatureCheck(keyring, ADDON)(data, signature) if keyring else None
    manifest = AddonManifest.from_json(data)
    check_paths(manifest.files, ADDON)
    return manifest, key_id


def verify_addon(directory: str | Path, *, keyring: Keyring | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> VerifiedAddon:
    """Verify an add-on directory; with `keyring`, addon.sig must verify against a trusted,
    unrevoked key before anything else is looked at."""
    root = Path(directory)
    if root.is_symlink() or not root.is_dir():
        raise UnsafePathError(f"{root} is not an add-on directory (or is a symbolic link)")
    data = read_manifest_bytes(root, ADDON)
    signature = read_signature_bytes(root, ADDON) if keyring is not None else None
    manifest, key_id = read_addon(data, signature, keyring)
    check_payload(root, manifest.files, ADDON, progress=progress)
    return VerifiedAddon(root.resolve(), manifest, hashlib.sha256(data).hexdigest(), key_id,
                         _token=_TOKEN)


def sign_addon(directory: str | Path, private_key: str | Path) -> VerifiedAddon:
    """Check the add-on's files, sign its exact manifest bytes, write addon.sig atomically."""
    key = load_private_key(private_key)
    root = Path(directory)
    addon = verify_addon(root)  # a signature over files that do not match is useless
    data = read_manifest_bytes(root, ADDON)
    if hashlib.sha256(data).hexdigest() != addon.digest:
        raise ImageError(f"{root / ADDON.manifest} changed while signing; nothing was written")
    atomic_write_bytes(root / ADDON.signature, sign_manifest(data, key))
    return VerifiedAddon(addon.path, addon.manifest, addon.digest,
                         key_id_of(key.public_key()), _token=_TOKEN)


def _created() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_addon(out: Path, *, name: str, version: str, base: str,
                components: dict[str, dict[str, Any]], tasks: Sequence[Task | dict[str, Any]],
                payload: Mapping[str, Path], key: Path | None = None,
                force: bool = False) -> VerifiedAddon:
    """An add-on directory at `out`, built whole and published with one rename: the
    `payload` files (add-on path -> source file) copied, hashed and listed, addon.json
    written and (with `key`) signed."""
    private = load_private_key(key) if key is not None else None  # refused before any work
    try:
        with publish_dir(out, replace=force) as stage:
            files: dict[str, FileEntry] = {}
            for rel, src in sorted(payload.items()):
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, stage / rel)
                files[rel] = FileEntry((stage / rel).stat().st_size, sha256_file(stage / rel))
            manifest = build_addon_manifest(name=name, version=version, base=base,
                                            created=_created(), components=components,
                                            tasks=tasks, files=files)
            data = manifest.to_json()
            (stage / ADDON.manifest).write_bytes(data)
            if private is not None:
                (stage / ADDON.signature).write_bytes(sign_manifest(data, private))
    except FileExistsError as e:
        raise ImageError(f"{e}; pass --force to replace it") from None
    addon = verify_addon(out)
    signed = key_id_of(private.public_key()) if private is not None else None
    return VerifiedAddon(addon.path, addon.manifest, addon.digest, signed, _token=_TOKEN)


def iter_addon_tar(directory: str | Path) -> Iterator[bytes]:
    """An add-on directory as the uncompressed tar the store installs: addon.json first,
    addon.sig second, then the files the manifest lists."""
    root = Path(directory)
    data = read_manifest_bytes(root, ADDON)
    manifest = AddonManifest.from_json(data)
    yield from iter_signed_tar(root, ADDON.manifest, ADDON.signature, data,
                               {p: e.size for p, e in manifest.files.items()})


def write_addon_tar(directory: Path, out: Path) -> None:
    """The add-on's tar written to `out` atomically."""
    with atomic_file(out) as tmp, open(tmp, "wb") as f:
        for chunk in iter_addon_tar(directory):
            f.write(chunk)
