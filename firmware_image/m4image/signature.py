"""Firmware image, signature: the ``manifest.sig`` format and its check against a keyring.

The signature is ed25519 over the EXACT bytes of ``manifest.json`` (no canonicalisation, no
prefix), so it covers every file hash the manifest lists and any tool can check it. It is
stored next to the manifest as ``manifest.sig``, a small canonical JSON document::

    {"algorithm": "ed25519", "format": "m4-sig/1", "key_id": "<16 hex>", "signature": "<base64>"}

``key_id`` (first 16 hex digits of sha256 over the raw public key) only picks the key to try
and gives a refusal its precise reason (unknown vs revoked); it is not trusted: a wrong id
simply fails the signature check. ``KeyringSignatureCheck`` is the check verification
(``m4image.verify``) and installation (``m4image.install``) run before the manifest is parsed;
making signatures is ``m4image.sign``. Add-ons (``m4image.addon``) are signed the same way,
``addon.sig`` over the exact bytes of ``addon.json``: every function takes the ``Layout`` of
what it checks (an image's by default), which names the files and the fix in each message.
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography.exceptions import InvalidSignature

from m4image.fsutil import canonical_json
from m4image.keys import BadSignatureError, Keyring, UnsignedImageError, check_key_id
from m4image.layout import IMAGE, Layout
from m4image.manifest import MAX_SIGNATURE_BYTES, ImageError

__all__ = [
    "ALGORITHM",
    "SIGNATURE_FORMAT",
    "KeyringSignatureCheck",
    "decode_signature",
    "encode_signature",
    "verify_signature",
]

SIGNATURE_FORMAT = "m4-sig/1"
ALGORITHM = "ed25519"


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


def decode_signature(data: bytes, layout: Layout = IMAGE) -> tuple[str, bytes]:
    """(key id, 64 signature bytes) from manifest.sig (the layout's signature file);
    BadSignatureError when malformed."""
    name = layout.signature
    fix = f"re-sign the {layout.kind} with {layout.sign}"
    if len(data) > MAX_SIGNATURE_BYTES:
        raise BadSignatureError(
            f"{name} is over {MAX_SIGNATURE_BYTES} bytes, so it is not an m4 signature; {fix}"
        )
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSignatureError(f"{name} is not JSON (corrupted?); {fix}") from None
    if not isinstance(d, dict) or d.get("format") != SIGNATURE_FORMAT:
        got = d.get("format") if isinstance(d, dict) else None
        raise BadSignatureError(f"{name} format is {got!r}, expected {SIGNATURE_FORMAT!r}; {fix}")
    if set(d) != {"algorithm", "format", "key_id", "signature"}:
        raise BadSignatureError(f"{name} has keys {sorted(d)}, not those of {SIGNATURE_FORMAT}; {fix}")
    if d["algorithm"] != ALGORITHM:
        raise BadSignatureError(f"{name} algorithm {d['algorithm']!r} is not supported; {fix}")
    if not isinstance(d["key_id"], str) or not isinstance(d["signature"], str):
        raise BadSignatureError(f"{name}: key_id and signature must be strings; {fix}")
    try:
        key_id = check_key_id(d["key_id"])
        sig = base64.b64decode(d["signature"], validate=True)
    except (ImageError, binascii.Error):
        raise BadSignatureError(f"{name}: malformed key_id or signature; {fix}") from None
    if len(sig) != 64:
        raise BadSignatureError(f"{name}: an ed25519 signature is 64 bytes, got {len(sig)}; {fix}")
    return key_id, sig


def verify_signature(manifest: bytes, signature: bytes | None, keyring: Keyring,
                     layout: Layout = IMAGE) -> str:
    """Check manifest.sig over the exact manifest bytes; return the signing key id.

    Raises UnsignedImageError, BadSignatureError (malformed or not matching), UnknownKeyError
    or RevokedKeyError (both from ``keyring.lookup``).
    """
    what = f"the {layout.kind}"
    if signature is None:
        development = (" (development images: skip the signature check explicitly, e.g. "
                       "`m4ctl image verify --unsigned`)" if layout is IMAGE else "")
        raise UnsignedImageError(
            f"{what} has no {layout.signature} and the keyring {keyring.directory} requires "
            f"one; sign it with {layout.sign}{development}"
        )
    key_id, sig = decode_signature(signature, layout)
    public = keyring.lookup(key_id, what)
    try:
        public.verify(sig, manifest)
    except InvalidSignature:
        raise BadSignatureError(
            f"{layout.signature} does not match {layout.manifest} for key {key_id}: the "
            f"manifest was modified after signing, or the signature is corrupt; re-download "
            f"{what}, or rebuild and re-sign it"
        ) from None
    return key_id


class KeyringSignatureCheck:
    """A ``verify.SignatureCheck`` backed by a Keyring (read afresh on every check)."""

    def __init__(self, keyring: Keyring, layout: Layout = IMAGE) -> None:
        self.keyring = keyring
        self.layout = layout

    def __call__(self, manifest: bytes, signature: bytes | None) -> str:
        return verify_signature(manifest, signature, self.keyring, self.layout)

    def __repr__(self) -> str:
        return f"KeyringSignatureCheck({self.keyring!r})"
