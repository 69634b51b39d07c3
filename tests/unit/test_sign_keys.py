"""m4image.sign, m4image.signature and m4image.keys: key pairs, manifest.sig, the keyring, and every refusal of
signature verification, on tiny images and development keys the tests make."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from imagekit import make_image
from m4image.keys import (
    BadSignatureError,
    Keyring,
    KeyringError,
    RevokedKeyError,
    SignatureError,
    UnknownKeyError,
    UnsignedImageError,
    key_id_of,
    load_public_key,
)
from m4image.manifest import ImageError
from m4image.sign import KeyFileError, generate_keypair, load_private_key, sign_image
from m4image.signature import KeyringSignatureCheck, decode_signature, verify_signature
from m4image.verify import (
    DaemonTooOldError,
    HashMismatchError,
    IncompatibleImageError,
    ManifestError,
    parse_version,
    verify_image,
)


def flip(path: Path, at: int = 5) -> None:
    """Flip one bit of a file in place (same size: only the hash can tell)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def dev(tmp_path: Path) -> tuple[Path, Path, str]:
    """(private key, public key, key id) of a development key pair."""
    kp = generate_keypair(tmp_path / "dev")
    return kp.private_key, kp.public_key, kp.key_id


@pytest.fixture
def keyring(tmp_path: Path, dev: tuple[Path, Path, str]) -> Keyring:
    kr = Keyring(tmp_path / "keys")
    kr.add(dev[1])
    return kr


@pytest.fixture
def signed(tmp_path: Path, dev: tuple[Path, Path, str]) -> Path:
    image = make_image(tmp_path / "img")
    sign_image(image, dev[0])
    return image


# ---- keys ------------------------------------------------------------------------------------


def test_generate_keypair_files_modes_and_key_id(tmp_path: Path) -> None:
    kp = generate_keypair(tmp_path / "vendor.key")  # a suffix is accepted and replaced
    assert (kp.private_key.name, kp.public_key.name) == ("vendor.key", "vendor.pub")
    assert stat.S_IMODE(os.stat(kp.private_key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(kp.public_key).st_mode) == 0o644
    assert kp.private_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    pub = load_public_key(kp.public_key)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert kp.key_id == hashlib.sha256(raw).hexdigest()[:16] == key_id_of(pub)
    assert key_id_of(load_private_key(kp.private_key).public_key()) == kp.key_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vendor.key", "vendor.pub"]  # no temporaries
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "vendor")
    assert generate_keypair(tmp_path / "vendor", force=True).key_id != kp.key_id


def test_private_key_errors(tmp_path: Path, dev: tuple[Path, Path, str]) -> None:
    with pytest.raises(KeyFileError, match="PUBLIC key"):
        load_private_key(dev[1])
    with pytest.raises(KeyFileError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")


def test_keyring_add_list_revoke(tmp_path: Path, dev: tuple[Path, Path, str]) -> None:
    kr = Keyring(tmp_path / "keys")
    assert kr.list() == []  # a missing directory is an empty keyring
    key = kr.add(dev[1])
    assert key.key_id == dev[2] and key.path == tmp_path / "keys" / f"{dev[2]}.pub"
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o644
    kr.add(dev[1])  # idempotent
    # raw 32-byte keys are accepted too, and a second key is listed
    other = generate_keypair(tmp_path / "other")
    raw = load_public_key(other.public_key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "raw.pub").write_bytes(raw)
    kr.add(tmp_path / "raw.pub")
    assert [(k.key_id, k.revoked) for k in kr.list()] == sorted([(dev[2], False), (other.key_id, False)])
    revoked = kr.revoke(other.key_id.upper(), reason="leaked")
    assert revoked.revoked and (tmp_path / "keys/revoked" / other.key_id).is_file()
    assert json.loads((tmp_path / "keys/revoked" / other.key_id).read_bytes())["reason"] == "leaked"
    assert [(k.key_id, k.revoked) for k in kr.list()] == [(dev[2], False), (other.key_id, True)]
    kr.revoke("00112233445566ff")  # a key never seen can be revoked ahead of time
    assert ("00112233445566ff", True) in [(k.key_id, k.revoked) for k in kr.list()]
    with pytest.raises(RevokedKeyError, match="cannot be trusted again"):
        kr.add(other.public_key)
    leftovers = [p.name for p in (tmp_path / "keys").rglob(".*")]
    assert leftovers == []  # every write was atomic: no temporaries


def test_keyring_refuses_bad_input(tmp_path: Path, dev: tuple[Path, Path, str]) -> None:
    kr = Keyring(tmp_path / "keys")
    with pytest.raises(KeyringError, match="PRIVATE key"):
        kr.add(dev[0])
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(KeyringError, match="not a public key"):
        kr.add(tmp_path / "junk.pub")
    with pytest.raises(KeyringError, match="16 hex digits"):
        kr.revoke("abc")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/broken.pub").write_text("not a key")
    with pytest.raises(KeyringError, match=r"broken\.pub"):  # a broken trust store names the file
        kr.list()


def test_keyring_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("M4_KEYS_DIR", raising=False)
    assert Keyring().directory == Path("/etc/m4/keys")
    monkeypatch.setenv("M4_KEYS_DIR", str(tmp_path))
    assert Keyring().directory == tmp_path


# ---- signing and verifying -------------------------------------------------------------------


def test_sign_verify_round_trip(signed: Path, keyring: Keyring, dev: tuple[Path, Path, str]) -> None:
    data = (signed / "manifest.json").read_bytes()
    sig = (signed / "manifest.sig").read_bytes()
    doc = json.loads(sig)
    assert doc["format"] == "m4-sig/1" and doc["algorithm"] == "ed25519" and doc["key_id"] == dev[2]
    assert len(base64.b64decode(doc["signature"])) == 64
    # the signature is over the exact manifest bytes, checkable with the bare public key
    load_public_key(dev[1]).verify(base64.b64decode(doc["signature"]), data)
    image = verify_image(signed, keyring=keyring)
    assert image.signed_by == dev[2]
    assert image.digest == hashlib.sha256(data).hexdigest()
    assert verify_signature(data, sig, keyring) == dev[2]
    assert KeyringSignatureCheck(keyring)(data, sig) == dev[2]
    assert verify_image(signed).signed_by is None  # no keyring: development behaviour, unchanged


def test_flipped_byte_in_manifest(signed: Path, keyring: Keyring) -> None:
    data = bytearray((signed / "manifest.json").read_bytes())
    i = data.index(b'"tiny"') + 2
    data[i] ^= 0x01  # still valid JSON, still a valid manifest: only the signature can tell
    (signed / "manifest.json").write_bytes(bytes(data))
    verify_image(signed)
    with pytest.raises(BadSignatureError, match="modified after signing"):
        verify_image(signed, keyring=keyring)


@pytest.mark.parametrize("where", ["signature", "json", "key_id", "length"])
def test_flipped_or_malformed_signature(signed: Path, keyring: Keyring, where: str) -> None:
    doc = json.loads((signed / "manifest.sig").read_bytes())
    sig = bytearray(base64.b64decode(doc["signature"]))
    if where == "signature":
        sig[10] ^= 0x40
        doc["signature"] = base64.b64encode(bytes(sig)).decode()
        raw = json.dumps(doc).encode()
    elif where == "json":
        raw = (signed / "manifest.sig").read_bytes()[:-20]
    elif where == "key_id":
        doc["key_id"] = "zz"
        raw = json.dumps(doc).encode()
    else:
        doc["signature"] = base64.b64encode(bytes(sig[:63])).decode()
        raw = json.dumps(doc).encode()
    (signed / "manifest.sig").write_bytes(raw)
    with pytest.raises(BadSignatureError):
        verify_image(signed, keyring=keyring)


def test_unknown_key(tmp_path: Path, signed: Path, dev: tuple[Path, Path, str]) -> None:
    stranger = generate_keypair(tmp_path / "stranger")
    kr = Keyring(tmp_path / "other-keys")
    with pytest.raises(UnknownKeyError, match="holds no trusted keys"):
        verify_image(signed, keyring=kr)
    kr.add(stranger.public_key)
    with pytest.raises(UnknownKeyError, match=r"m4ctl keys add FILE") as e:
        verify_image(signed, keyring=kr)
    assert dev[2] in str(e.value) and stranger.key_id in str(e.value)


def test_revoked_key(signed: Path, keyring: Keyring, dev: tuple[Path, Path, str]) -> None:
    verify_image(signed, keyring=keyring)
    keyring.revoke(dev[2])
    with pytest.raises(RevokedKeyError, match="revoked"):
        verify_image(signed, keyring=keyring)


def test_unsigned_image_with_keyring(tmp_path: Path, keyring: Keyring) -> None:
    image = make_image(tmp_path / "unsigned")
    verify_image(image)  # fine without a keyring (dev images, make demo)
    with pytest.raises(UnsignedImageError, match="m4ctl image sign"):
        verify_image(image, keyring=keyring)


def test_signature_is_checked_before_anything_else(signed: Path, keyring: Keyring) -> None:
    flip(signed / "backbone/model.safetensors")
    with pytest.raises(HashMismatchError):
        verify_image(signed, keyring=keyring)  # signature fine, so the hashes are looked at
    (signed / "manifest.json").write_bytes(b"{not json")
    with pytest.raises(BadSignatureError):  # not ManifestError: the parser never saw the bytes
        verify_image(signed, keyring=keyring)
    with pytest.raises(ManifestError):
        verify_image(signed)


def test_sign_image_refuses_a_broken_image(tmp_path: Path, dev: tuple[Path, Path, str]) -> None:
    image = make_image(tmp_path / "img")
    flip(image / "backbone/tokenizer.json")
    with pytest.raises(HashMismatchError):
        sign_image(image, dev[0])
    assert not (image / "manifest.sig").exists()


def test_resigning_replaces_the_signature(signed: Path, tmp_path: Path, keyring: Keyring) -> None:
    new = generate_keypair(tmp_path / "new")
    result = sign_image(signed, new.private_key)
    assert result.key_id == new.key_id
    assert decode_signature((signed / "manifest.sig").read_bytes())[0] == new.key_id
    with pytest.raises(UnknownKeyError):
        verify_image(signed, keyring=keyring)
    keyring.add(new.public_key)
    assert verify_image(signed, keyring=keyring).signed_by == new.key_id


def test_error_classes() -> None:
    for cls in (UnsignedImageError, UnknownKeyError, RevokedKeyError, BadSignatureError):
        assert issubclass(cls, SignatureError) and issubclass(cls, ImageError)
    assert issubclass(KeyringError, ImageError) and issubclass(KeyFileError, ImageError)


# ---- compatible and min_daemon_version -------------------------------------------------------


def test_compatible_and_daemon_version(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", compatible="m4-cpu-v1", min_daemon_version="0.3.0")
    verify_image(image, expected_compatible="m4-cpu-v1", daemon_version="0.3")
    with pytest.raises(IncompatibleImageError, match="m4-gpu-v2"):
        verify_image(image, expected_compatible="m4-gpu-v2")
    with pytest.raises(DaemonTooOldError, match="update m4d"):
        verify_image(image, daemon_version="0.2.9")
    bad = make_image(tmp_path / "bad", min_daemon_version="soon")
    with pytest.raises(ManifestError, match="min_daemon_version"):
        verify_image(bad, daemon_version="1.0.0")
    verify_image(bad)  # not checked unless a daemon version is given


def test_parse_version() -> None:
    assert parse_version("0.1.0") == (0, 1) == parse_version("0.1")
    assert parse_version("1.10.2rc1") == (1, 10, 2)
    assert parse_version("2.0.0+local") > parse_version("1.99")
    with pytest.raises(ValueError):
        parse_version("v1")
