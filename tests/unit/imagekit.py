"""Tiny firmware images for the image-trust and store tests: a few small files, a manifest,
development keys generated on the spot, and hand-made tars (good and malicious)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m4image.manifest import FORMAT
from m4image.tarstream import iter_image_tar

COMPATIBLE = "m4-cpu-v1"
DAEMON_VERSION = "0.1.0"


def payload(seed: str) -> dict[str, bytes]:
    """Three small files whose bytes depend on ``seed`` (so two versions differ)."""
    h = hashlib.sha256(seed.encode()).digest()
    return {
        "backbone/model.safetensors": h * 80 + b"weights",  # 2567 bytes: not block-aligned
        "backbone/tokenizer.json": b'{"vocab": {"' + seed.encode() + b'": 0}}',
        "text_encoder/model.safetensors": h[::-1] * 40,
    }


def manifest_dict(files: dict[str, bytes], **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "format": FORMAT, "name": "tiny", "version": "1.0.0", "security_version": 1,
        "compatible": COMPATIBLE, "min_daemon_version": "0.1.0", "created": "2025-01-01T00:00:00Z",
        "files": {rel: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for rel, b in files.items()},
        "components": {}, "tasks": [], "self_test": [],
    }  # fmt: skip
    d.update(over)
    return d


def make_image(root: Path, *, seed: str = "one", files: dict[str, bytes] | None = None, **over: Any) -> Path:
    """An unsigned image directory; ``over`` overrides manifest keys (version, security_version…)."""
    files = payload(seed) if files is None else files
    root.mkdir(parents=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "manifest.json").write_bytes(json.dumps(manifest_dict(files, **over), indent=2, sort_keys=True).encode())
    return root


def tar_of(root: Path) -> bytes:
    """The image as the store's install tar (manifest, sig, files)."""
    return b"".join(iter_image_tar(root, chunk=1000))


def chunked(data: bytes, size: int = 777) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def entries_of(root: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) in install order, for tests that tamper with the list before taring."""
    out = [("manifest.json", (root / "manifest.json").read_bytes())]
    if (root / "manifest.sig").exists():
        out.append(("manifest.sig", (root / "manifest.sig").read_bytes()))
    files = json.loads(out[0][1])["files"]
    out += [(rel, (root / rel).read_bytes()) for rel in sorted(files)]
    return out


def craft_tar(entries: list[tuple[str, bytes] | tarfile.TarInfo], *, size_override: dict[str, int] | None = None) -> bytes:
    """A tar of (name, data) files and raw TarInfo entries (links, devices, folders), in order.

    ``size_override`` writes a header size different from the data (the data is cut or padded
    to match, as a truncated or appended file would be).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
                continue
            name, data = e
            if size_override and name in size_override:
                n = size_override[name]
                data = data[:n] + bytes(max(0, n - len(data)))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def tree_snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders), to prove nothing changed."""
    snap: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, n), root)] = None
        for n in filenames:
            p = os.path.join(dirpath, n)
            snap[os.path.relpath(p, root)] = Path(p).read_bytes()
    return snap
