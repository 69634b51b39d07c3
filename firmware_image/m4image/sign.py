"""Firmware image, signing: ed25519 key pairs, ``manifest.sig``, and the keyring verifier.

The signature is ed25519 over the EXACT bytes of ``manifest.json`` (no canonicalisation, no
prefix), so it covers every file hash the manifest lists and any tool can check it. It is
stored next to the manifest as ``manifest.sig``, a small canonical JSON document::

    {"algorithm": "ed25519", "format": "m4-sig/1", "key_id": "<16 hex>", "signature": "<base64>"}

``key_id`` (first 16 hex digits of sha256 over the raw public key) only picks the key to try
and gives a refusal its precise reason (unknown vs revoked); it is not trusted: a wrong id
simply fails the signature check. Checking by hand::

    jq -r .signature manifest.sig | base64 -d > sig.bin
    openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in manifest.json -sigfile sig.bin

Key files: ``NAME.key`` is PKCS#8 PEM, unencrypted, mode 0600; ``NAME.pub`` is
SubjectPublicKeyInfo PEM, mode 0644 (``openssl pkey -pubin -in NAME.pub -text`` reads it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m4image.fsutil import atomic_write_bytes, canonical_json
from m4image.keys import (
    BadSignatureError,
    Keyring,
    UnsignedImageError,
    check_key_id,
    key_id_of,
    public_key_pem,
)
from m4image.manifest import SIGNATURE_NAME, ImageError
from m4image.verify import MAX_SIGNATURE_BYTES, read_manifest_bytes, verify_image

__all__ = [
    "SIGNATURE_FORMAT",
    "KeyFileError",
    "KeyPair",
    "KeyringSignatureCheck",
    "SignedImage",
    "decode_signature",
    "encode_signature",
    "generate_keypair",
    "load_private_key",
    "sign_image",
    "sign_manifest",
    "verify_signature",
]

SIGNATURE_FORMAT = "m4-sig/1"
ALGORITHM = "ed25519"


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


def encode_signature(key_id: str, signature: bytes) -> bytes:
    """The bytes of manifest.sig."""
    return canonical_json(
        {
            "algorithm": ALGORITHM,
            "format": SIGNATURE_FORMAT,
            "key_id": key_id,
            "signature": base64.b64encode(signature).decode("ascii"),
        }
    )


def decode_signature(data: bytes) -> tuple[str, bytes]:
    """(key id, 64 signature bytes) from manifest.sig; BadSignatureError when malformed."""
    fix = "re-sign the image with `m4ctl image sign DIR --key KEY`"
    if len(data) > MAX_SIGNATURE_BYTES:
        raise BadSignatureError(
            f"{SIGNATURE_NAME} is over {MAX_SIGNATURE_BYTES} bytes, so it is not an m4 signature; {fix}"
        )
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSignatureError(f"{SIGNATURE_NAME} is not JSON (corrupted?); {fix}") from None
    if not isinstance(d, dict) or d.get("format") != SIGNATURE_FORMAT:
        got = d.get("format") if isinstance(d, dict) else None
        raise BadSignatureError(f"{SIGNATURE_NAME} format is {got!r}, expected {SIGNATURE_FORMAT!r}; {fix}")
    if set(d) != {"algorithm", "format", "key_id", "signature"}:
        raise BadSignatureError(f"{SIGNATURE_NAME} has keys {sorted(d)}, not those of {SIGNATURE_FORMAT}; {fix}")
    if d["algorithm"] != ALGORITHM:
        raise BadSignatureError(f"{SIGNATURE_NAME} algorithm {d['algorithm']!r} is not supported; {fix}")
    if not isinstance(d["key_id"], str) or not isinstance(d["signature"], str):
        raise BadSignatureError(f"{SIGNATURE_NAME}: key_id and signature must be strings; {fix}")
    try:
        key_id = check_key_id(d["key_id"])
        sig = base64.b64decode(d["signature"], validate=True)
    except (ImageError, binascii.Error):
        raise BadSignatureError(f"{SIGNATURE_NAME}: malformed key_id or signature; {fix}") from None
    if len(sig) != 64:
        raise BadSignatureError(f"{SIGNATURE_NAME}: an ed25519 signature is 64 bytes, got {len(sig)}; {fix}")
    return key_id, sig


def sign_manifest(manifest: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """manifest.sig for these exact manifest bytes."""
    return encode_signature(key_id_of(private_key.public_key()), private_key.sign(manifest))


def verify_signature(manifest: bytes, signature: bytes | None, keyring: Keyring) -> str:
    """Check manifest.sig over the exact manifest bytes; return the signing key id.

    Raises UnsignedImageError, BadSignatureError (malformed or not matching), UnknownKeyError
    or RevokedKeyError (both from ``keyring.lookup``).
    """
    if signature is None:
        raise UnsignedImageError(
            f"the image has no {SIGNATURE_NAME} and the keyring {keyring.directory} requires one; "
            "sign it with `m4ctl image sign DIR --key KEY.key` (development images: skip the "
            "signature check explicitly, e.g. `m4ctl image verify --unsigned`)"
        )
    key_id, sig = decode_signature(signature)
    public = keyring.lookup(key_id)
    try:
        public.verify(sig, manifest)
    except InvalidSignature:
        raise BadSignatureError(
            f"{SIGNATURE_NAME} does not match manifest.json for key {key_id}: the manifest was "
            "modified after signing, or the signature is corrupt; re-download the image, or "
            "rebuild and re-sign it"
        ) from None
    return key_id


class KeyringSignatureCheck:
    """A ``verify.SignatureCheck`` backed by a Keyring (read afresh on every check)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def __call__(self, manifest: bytes, signature: bytes | None) -> str:
        return verify_signature(manifest, signature, self.keyring)

    def __repr__(self) -> str:
        return f"KeyringSignatureCheck({self.keyring!r})"


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
