"""Firmware image, trust: the keyring of ed25519 public keys that may sign images.

Layout of a keyring directory (default ``/etc/m4/keys``, env ``M4_KEYS_DIR``)::

    /etc/m4/keys/
      <anything>.pub           a trusted public key: PEM (SubjectPublicKeyInfo) or 32 raw bytes;
                               ``add`` writes ``<key id>.pub`` in PEM
      revoked/<key id>         one small file per revoked key id (its content is informative)

A key id is the first 16 hex digits of sha256 over the 32 raw public-key bytes. A revoked id
wins over a ``.pub`` file holding the same key, so revoking never needs the key file deleted,
and a revocation can be recorded before the key is ever seen. One file per revocation (not a
shared ``revoked.txt``) makes every ``revoke`` a single atomic create: two admins revoking at
once can never lose each other's write.

The refusals of signature verification live here too (``SignatureError``, one subclass per
cause, each saying what to do next): the keyring's lookup raises two of them; the verifier
itself is ``m4image.signature.KeyringSignatureCheck``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from m4image.fsutil import atomic_write_bytes, canonical_json, fsync_dir
from m4image.manifest import ImageError

__all__ = [
    "DEFAULT_KEYS_DIR",
    "KEYS_DIR_ENV",
    "BadSignatureError",
    "Keyring",
    "KeyringError",
    "RevokedKeyError",
    "SignatureError",
    "TrustedKey",
    "UnknownKeyError",
    "UnsignedImageError",
    "check_key_id",
    "key_id_of",
    "load_public_key",
    "public_key_pem",
]

DEFAULT_KEYS_DIR = Path("/etc/m4/keys")
KEYS_DIR_ENV = "M4_KEYS_DIR"
REVOKED_DIR = "revoked"
KEY_ID_HEX = 16
MAX_KEY_FILE_BYTES = 16 * 1024
_KEY_ID = re.compile(rf"^[0-9a-f]{{{KEY_ID_HEX}}}$")


class KeyringError(ImageError):
    """The keyring directory or one of its key files cannot be used (the message names the file)."""


class SignatureError(ImageError):
    """manifest.sig is missing or does not verify; one subclass per cause."""


class UnsignedImageError(SignatureError):
    """The image has no manifest.sig and a keyring requires one."""


class UnknownKeyError(SignatureError):
    """manifest.sig names a key that is not in the trusted keyring."""


class RevokedKeyError(SignatureError):
    """manifest.sig was made with a key that has been revoked."""


class BadSignatureError(SignatureError):
    """manifest.sig is malformed or does not match manifest.json (modified after signing)."""


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the 32 raw public-key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def check_key_id(key_id: str) -> str:
    """Normalise and validate a key id given by a person (16 hex digits)."""
    kid = key_id.strip().lower()
    if not _KEY_ID.match(kid):
        raise KeyringError(
            f"{key_id!r} is not a key id; a key id is {KEY_ID_HEX} hex digits, "
            "as `m4ctl keys list` shows them"
        )
    return kid


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An ed25519 public key from a PEM file or a file of its 32 raw bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise KeyringError(f"cannot read public key {path}: {e.strerror or e}") from None
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    if b"PRIVATE KEY" in data:
        raise KeyringError(
            f"{path} is a PRIVATE key; give the matching .pub file (never copy a private key "
            "onto a device)"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyringError(
            f"{path} is not a public key (expected PEM 'BEGIN PUBLIC KEY' or 32 raw bytes); "
            "use the .pub file written by `m4ctl keys generate`"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyringError(
            f"{path} holds a {type(key).__name__}, not an ed25519 key; M4 images are signed "
            "with ed25519 (`m4ctl keys generate`)"
        )
    return key


@dataclass(frozen=True)
class TrustedKey:
    """One key the keyring knows: trusted, or revoked (then ``path`` may be None)."""

    key_id: str
    path: Path | None
    revoked: bool
    public_key: Ed25519PublicKey | None = field(default=None, repr=False, compare=False)


class Keyring:
    """The trusted keys in one directory. Reads are fresh on every call; writes are atomic."""

    def __init__(self, directory: str | Path | None = None) -> None:
        if directory is None:
            directory = os.environ.get(KEYS_DIR_ENV) or DEFAULT_KEYS_DIR
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"Keyring({str(self.directory)!r})"

    # ---- reading ---------------------------------------------------------------------------

    def _key_files(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise KeyringError(f"{self.directory} is not a directory; point --keys at a keyring directory") from None
        except OSError as e:
            raise KeyringError(f"cannot read keyring {self.directory}: {e.strerror or e}") from None
        return [self.directory / n for n in names if n.endswith(".pub") and not n.startswith(".")]

    def revoked_ids(self) -> set[str]:
        """Key ids listed under ``revoked/``."""
        try:
            names = os.listdir(self.directory / REVOKED_DIR)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        except OSError as e:
            raise KeyringError(f"cannot read {self.directory / REVOKED_DIR}: {e.strerror or e}") from None
        return {n for n in names if _KEY_ID.match(n)}

    def list(self) -> list[TrustedKey]:
        """Every key: the ``.pub`` files (with their revoked flag), then revoked ids with no file."""
        revoked = self.revoked_ids()
        keys: dict[str, TrustedKey] = {}
        for path in self._key_files():
            if not path.is_file():
                continue
            key = load_public_key(path)
            kid = key_id_of(key)
            keys.setdefault(kid, TrustedKey(kid, path, kid in revoked, key))
        for kid in sorted(revoked - set(keys)):
            keys[kid] = TrustedKey(kid, None, True, None)
        return sorted(keys.values(), key=lambda k: (k.revoked, k.key_id))

    def lookup(self, key_id: str, what: str = "the image") -> Ed25519PublicKey:
        """The trusted public key with this id; RevokedKeyError or UnknownKeyError otherwise
        (their messages name `what` was signed: "the image", "the add-on")."""
        entries = {k.key_id: k for k in self.list()}
        entry = entries.get(key_id)
        if entry is not None and entry.revoked:
            raise RevokedKeyError(
                f"{what} is signed with key {key_id}, which is revoked "
                f"({self.directory / REVOKED_DIR / key_id}); get {what} re-signed with a "
                "current vendor key"
            )
        if entry is None or entry.public_key is None:
            trusted = sorted(k.key_id for k in entries.values() if not k.revoked)
            have = f"trusted keys: {', '.join(trusted)}" if trusted else "it holds no trusted keys"
            raise UnknownKeyError(
                f"{what} is signed with key {key_id}, which is not in the keyring "
                f"{self.directory} ({have}); if that is the vendor's genuine key, add its public "
                f"key with `m4ctl keys add FILE --keys {self.directory}`"
            )
        return entry.public_key

    # ---- writing ---------------------------------------------------------------------------

    def add(self, pubkey_path: str | Path) -> TrustedKey:
        """Trust a public key: written as ``<key id>.pub`` (PEM, 0644), atomically. Idempotent."""
        key = load_public_key(pubkey_path)
        kid = key_id_of(key)
        if kid in self.revoked_ids():
            raise RevokedKeyError(
                f"key {kid} is revoked in {self.directory}; a revoked key cannot be trusted "
                f"again (remove {self.directory / REVOKED_DIR / kid} by hand if that was a mistake)"
            )
        self._mkdir(self.directory)
        target = self.directory / f"{kid}.pub"
        atomic_write_bytes(target, public_key_pem(key), mode=0o644)
        return TrustedKey(kid, target, False, key)

    def revoke(self, key_id: str, *, reason: str = "") -> TrustedKey:
        """Revoke a key id (known or not yet seen): ``revoked/<key id>``, written atomically."""
        kid = check_key_id(key_id)
        self._mkdir(self.directory)
        rdir = self.directory / REVOKED_DIR
        self._mkdir(rdir)
        when = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        record = {"key_id": kid, "revoked_at": when, "reason": reason}
        atomic_write_bytes(rdir / kid, canonical_json(record), mode=0o644)
        path = self.directory / f"{kid}.pub"
        return TrustedKey(kid, path if path.is_file() else None, True, None)

    @staticmethod
    def _mkdir(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                return
            fsync_dir(path.parent)
            return
        if not stat.S_ISDIR(st.st_mode):
            raise KeyringError(f"{path} exists and is not a directory; move it aside")
