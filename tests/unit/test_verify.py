"""m4image.verify: every failure kind on tiny images the tests build themselves (no models)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from m4image.fsutil import atomic_write_bytes, canonical_json, publish_dir, sha256_file
from m4image.manifest import FORMAT, MAX_MANIFEST_BYTES
from m4image.verify import (
    ExtraFileError,
    HashMismatchError,
    ImageError,
    ManifestError,
    MissingFileError,
    SignatureError,
    SizeMismatchError,
    UnsafePathError,
    VerifiedImage,
    verify_image,
)

PAYLOAD = {
    "text_encoder/model.safetensors": b"\x00" * 64 + b"weights",
    "text_encoder/tokenizer.json": b'{"vocab": {}}',
    "backbone/model.safetensors": os.urandom(3000),
}


def write_manifest(root: Path, files: dict[str, Any], **over: Any) -> bytes:
    d = {
        "format": FORMAT, "name": "tiny", "version": "1", "security_version": 1,
        "compatible": "m4-cpu-v1", "min_daemon_version": "0.1.0", "created": "2025-01-01T00:00:00Z",
        "files": files, "components": {}, "tasks": [], "self_test": [],
    }  # fmt: skip
    d.update(over)
    data = json.dumps(d, sort_keys=True, indent=2).encode()
    (root / "manifest.json").write_bytes(data)
    return data


def make_image(root: Path) -> Path:
    root.mkdir()
    files = {}
    for rel, data in PAYLOAD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(root, files)
    return root


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "img")


def listed(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_bytes())["files"]  # type: ignore[no-any-return]


def test_good_image(image: Path) -> None:
    v = verify_image(image)
    assert isinstance(v, VerifiedImage)
    assert v.path == image.resolve()
    assert v.digest == hashlib.sha256((image / "manifest.json").read_bytes()).hexdigest()
    assert set(v.manifest.files) == set(PAYLOAD)
    assert v.file("backbone/model.safetensors") == image.resolve() / "backbone/model.safetensors"
    with pytest.raises(KeyError):
        v.file("nope")


def test_verified_image_cannot_be_forged(image: Path) -> None:
    v = verify_image(image)
    with pytest.raises(TypeError, match=r"only created by"):
        VerifiedImage(path=image, manifest=v.manifest, digest=v.digest)
    with pytest.raises(AttributeError):
        v.digest = "0" * 64  # type: ignore[misc]


def test_flipped_byte(image: Path) -> None:
    p = image / "backbone/model.safetensors"
    data = bytearray(p.read_bytes())
    data[1234] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match=r"backbone/model.safetensors") as err:
        verify_image(image)
    assert "rebuild" in str(err.value)


def test_truncated_file(image: Path) -> None:
    p = image / "text_encoder/model.safetensors"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(SizeMismatchError, match=r"text_encoder/model.safetensors is 70 bytes.*truncated"):
        verify_image(image)


def test_appended_file(image: Path) -> None:
    with open(image / "text_encoder/tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(SizeMismatchError, match=r"larger than listed"):
        verify_image(image)


def test_extra_file(image: Path) -> None:
    (image / "backbone/notes.txt").write_text("hi")
    with pytest.raises(ExtraFileError, match=r"backbone/notes.txt is in .* not listed"):
        verify_image(image)


def test_extra_hidden_temp_file(image: Path) -> None:
    (image / ".model.safetensors.tmp-abc").write_bytes(b"x")
    with pytest.raises(ExtraFileError, match=r"\.model\.safetensors\.tmp-abc"):
        verify_image(image)


def test_missing_file(image: Path) -> None:
    (image / "text_encoder/tokenizer.json").unlink()
    with pytest.raises(MissingFileError, match=r"text_encoder/tokenizer.json is listed .* missing"):
        verify_image(image)


@pytest.mark.parametrize(
    "bad", ["../outside.bin", "/etc/passwd", "a/../../b", "./a", "a//b", "a\\b", "manifest.sig", ""]
)
def test_unsafe_paths(image: Path, bad: str) -> None:
    files = listed(image)
    files[bad] = {"size": 1, "sha256": "00" * 32}
    write_manifest(image, files)
    with pytest.raises(UnsafePathError, match=r"unsafe path|payload file"):
        verify_image(image)


def test_dotdot_never_reads_outside(tmp_path: Path) -> None:
    root = make_image(tmp_path / "img")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s")
    files = listed(root)
    files["../secret.bin"] = {"size": 1, "sha256": sha256_file(secret)}
    write_manifest(root, files)
    with pytest.raises(UnsafePathError, match=r"'\.\./secret\.bin'"):
        verify_image(root)


def test_symlink_file(image: Path, tmp_path: Path) -> None:
    target = image / "backbone/model.safetensors"
    moved = tmp_path / "elsewhere.bin"
    target.rename(moved)
    target.symlink_to(moved)  # same bytes, but through a link
    with pytest.raises(UnsafePathError, match=r"backbone/model.safetensors is a symbolic link"):
        verify_image(image)


def test_symlink_dir(image: Path, tmp_path: Path) -> None:
    (image / "text_encoder").rename(tmp_path / "te")
    (image / "text_encoder").symlink_to(tmp_path / "te")
    with pytest.raises(UnsafePathError, match=r"text_encoder is a symbolic link"):
        verify_image(image)


def test_symlink_manifest(image: Path, tmp_path: Path) -> None:
    (image / "manifest.json").rename(tmp_path / "m.json")
    (image / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(UnsafePathError, match=r"manifest.json is a symbolic link"):
        verify_image(image)


def test_fifo_is_refused(image: Path) -> None:
    os.mkfifo(image / "pipe")
    with pytest.raises(UnsafePathError, match=r"pipe is not a regular file"):
        verify_image(image)


def test_oversized_manifest(image: Path) -> None:
    files = listed(image)
    write_manifest(image, files, name="x" * MAX_MANIFEST_BYTES)
    with pytest.raises(ManifestError, match=r"over the 1048576-byte limit"):
        verify_image(image)


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"manifest.json is missing"):
        verify_image(tmp_path / "empty")
    with pytest.raises(ManifestError, match=r"not a directory"):
        verify_image(tmp_path / "nothing")


def test_bad_manifest_is_manifest_error(image: Path) -> None:
    write_manifest(image, listed(image), format="m4-image/9")
    with pytest.raises(ManifestError, match=r"m4-image/9"):
        verify_image(image)


def test_errors_share_a_base() -> None:
    for cls in (ManifestError, MissingFileError, ExtraFileError, SizeMismatchError,
                HashMismatchError, UnsafePathError, SignatureError):
        assert issubclass(cls, ImageError)


def test_signature_hook(image: Path) -> None:
    # Without a check, manifest.sig is optional and ignored (signing comes later).
    (image / "manifest.sig").write_bytes(b"not yet checked")
    verify_image(image)
    seen: list[tuple[bytes, bytes | None]] = []

    def check(manifest: bytes, sig: bytes | None) -> None:
        seen.append((manifest, sig))
        if sig != b"good":
            raise SignatureError("manifest.sig does not verify with any trusted key")

    with pytest.raises(SignatureError):
        verify_image(image, signature_check=check)
    assert seen[0] == ((image / "manifest.json").read_bytes(), b"not yet checked")
    (image / "manifest.sig").write_bytes(b"good")
    verify_image(image, signature_check=check)
    (image / "manifest.sig").unlink()
    with pytest.raises(SignatureError):
        verify_image(image, signature_check=check)
    assert seen[-1][1] is None


# ---- fsutil ---------------------------------------------------------------------------------


def test_atomic_writes(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"one")
    atomic_write_bytes(tmp_path / "a.bin", b"two")
    assert (tmp_path / "a.bin").read_bytes() == b"two"
    atomic_write_bytes(tmp_path / "b.json", canonical_json({"z": 1, "a": "é"}))
    assert (tmp_path / "b.json").read_bytes() == '{\n  "a": "é",\n  "z": 1\n}\n'.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json"]


def test_publish_dir(tmp_path: Path) -> None:
    target = tmp_path / "img"
    with pytest.raises(RuntimeError), publish_dir(target) as stage:
        (stage / "half").write_bytes(b"x")
        assert stage.name.startswith("img.tmp-") and not target.exists()
        raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []  # nothing half-built, staging removed
    with publish_dir(target) as stage:
        (stage / "f").write_bytes(b"1")
    assert (target / "f").read_bytes() == b"1"
    with pytest.raises(FileExistsError), publish_dir(target):
        pass
    with publish_dir(target, replace=True) as stage:
        (stage / "g").write_bytes(b"2")
    assert [p.name for p in target.iterdir()] == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["img"]
