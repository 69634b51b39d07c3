"""Firmware image, signing: ed25519 key pairs and writing ``manifest.sig``.

The signature is ed25519 over the EXACT bytes of ``manifest.json``, stored as ``manifest.sig``
(the format, and its check against a keyring, are ``m4image.signature``). Checking by hand::

    jq -r .signature manifest.sig | base64 -d > sig.bin
    openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in manifest.json -sigfile sig.bin

Key files: ``NAME.key`` is PKCS#8 PEM, unencrypted, mode 0600; ``NAME.pub`` is
SubjectPublicKeyInfo PEM, mode 0644 (``openssl pkey -pubin -in NAME.pub -text`` reads it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m4image.fsutil import atomic_write_bytes
from m4image.keys import key_id_of, public_key_pem
from m4image.manifest import SIGNATURE_NAME, ImageError
from m4image.signature import decode_signature, encode_signature
from m4image.verify import read_manifest_bytes, verify_image

__all__ = [
    "KeyFileError",
    "KeyPair",
    "SignedImage",
    "generate_keypair",
    "load_private_key",
    "sign_image",
    "sign_manifest",
]


class KeyFileError(ImageError):
    """A private key file cannot be written (exists) or read (missing, wrong type, encrypted)."""


@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class SignedImage:
    path: Path
    digest: str  # sha256 of the manifest bytes that were signed
    key_id: str


def _key_paths(out_path: str | Path) -> tuple[Path, Path]:
    """``dev`` / ``dev.key`` / ``dev.pub`` -> (``dev.key``, ``dev.pub``)."""
    p = Path(out_path)
    if p.suffix in (".key", ".pub"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".key"), p.with_name(p.name + ".pub")


def generate_keypair(out_path: str | Path, *, force: bool = False) -> KeyPair:
    """Write ``NAME.key`` (PKCS#8 PEM, 0600) and ``NAME.pub`` (PEM, 0644), each atomically.

    The private key file is created 0600 from its first byte (never readable by others, not
    even briefly). Existing files are refused unless ``force``.
    """
    key_path, pub_path = _key_paths(out_path)
    if not force:
        for p in (key_path, pub_path):
            if p.exists() or p.is_symlink():
                raise KeyFileError(f"{p} already exists; choose another --output or pass --force")
    if not key_path.parent.is_dir():
        raise KeyFileError(f"{key_path.parent} is not a directory; create it first")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write_bytes(key_path, pem, mode=0o600)
    atomic_write_bytes(pub_path, public_key_pem(private.public_key()), mode=0o644)
    return KeyPair(key_id_of(private.public_key()), key_path, pub_path)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An unencrypted PKCS#8 PEM ed25519 private key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read private key {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path} is encrypted; decrypt it to a 0600 file first") from None
    except ValueError:
        hint = " (that is the PUBLIC key; sign with the .key file)" if b"PUBLIC KEY" in data else ""
        raise KeyFileError(
            f"{path} is not a PEM private key{hint}; use the .key file written by "
            "`m4ctl keys generate`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
    return key


def sign_manifest(manifest: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """manifest.sig for these exact manifest bytes."""
    return encode_signature(key_id_of(private_key.public_key()), private_key.sign(manifest))


def sign_image(directory: str | Path, private_key_path: str | Path) -> SignedImage:
    """Verify the image's files, sign its manifest bytes, write manifest.sig atomically.

    The manifest is read once; if it changes between the file check and the read, nothing is
    written. Any old manifest.sig is replaced.
    """
    private = load_private_key(private_key_path)
    root = Path(directory)
    image = verify_image(root)  # a signature over a manifest whose files do not match is useless
    data = read_manifest_bytes(root)
    digest = hashlib.sha256(data).hexdigest()
    if digest != image.digest:
        raise ImageError(f"{root / 'manifest.json'} changed while signing; nothing was written, try again")
    sig = sign_manifest(data, private)
    private.public_key().verify(decode_signature(sig)[1], data)  # never write a bad signature
    atomic_write_bytes(root / SIGNATURE_NAME, sig, mode=0o644)
    return SignedImage(root.resolve(), digest, key_id_of(private.public_key()))
