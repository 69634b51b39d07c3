"""Firmware image, transport: an uncompressed tar read from (or written to) a stream of chunks.

The image store's streamed install reads the tar with ``TarReader``: one header at a time,
each file's bytes handed on in bounded chunks as they arrive, nothing extracted by a library
and nothing buffered whole. It understands exactly what an image needs (POSIX ustar and GNU
headers, pax ``path``/``size`` records, GNU long names) and reports every entry's kind, so the
caller can refuse links, devices and anything else; the reader itself refuses malformed
headers, oversized metadata, and streams that end early or go on past a limit.

``iter_image_tar`` writes an image directory as such a tar, lazily: ``manifest.json`` first,
``manifest.sig`` second, then the files in the manifest's order. That is the order the store
requires, so it can check the signature and the manifest before it writes a single payload
byte. With GNU tar::

    tar -cf image.tar -C IMAGE manifest.json manifest.sig $(jq -r '.files|keys[]' IMAGE/manifest.json)
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from m4image.manifest import MANIFEST_NAME, SIGNATURE_NAME, ImageError, Manifest

__all__ = [
    "ArchiveError",
    "ArchiveTooLargeError",
    "MalformedArchiveError",
    "TarEntry",
    "TarReader",
    "TruncatedArchiveError",
    "iter_image_tar",
    "iter_signed_tar",
]

BLOCK = 512
MAX_PAX_BYTES = 64 * 1024  # one pax or GNU long-name record; real ones are a few hundred bytes
MAX_TRAILER_BYTES = 1 << 20  # zero padding after the end-of-archive blocks
CHUNK = 1 << 20

_KINDS = {
    b"0": "file", b"\x00": "file", b"7": "file",
    b"1": "hardlink", b"2": "symlink", b"3": "chardev", b"4": "blockdev",
    b"5": "dir", b"6": "fifo",
}  # fmt: skip


class ArchiveError(ImageError):
    """The install stream is not a usable image tar."""


class MalformedArchiveError(ArchiveError):
    """A tar header is corrupt or uses a feature an image never needs."""


class TruncatedArchiveError(ArchiveError):
    """The stream ended inside a header or a file's bytes: the transfer was cut short."""


class ArchiveTooLargeError(ArchiveError):
    """The stream is longer than its limit (the manifest's sizes plus headers, or a hard cap)."""


@dataclass(frozen=True)
class TarEntry:
    """One member: ``path`` as written (``./`` and a trailing ``/`` removed), its kind and size."""

    path: str
    kind: str  # file, dir, symlink, hardlink, chardev, blockdev, fifo, or other:<flag>
    size: int
    linkname: str = ""


def _nul_str(field: bytes, what: str) -> str:
    raw = field.split(b"\x00", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedArchiveError(f"tar header: {what} is not UTF-8") from None


def _number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes of 8 GiB and more
        if field[0] == 0xFF:
            raise MalformedArchiveError(f"tar header: negative {what}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.replace(b"\x00", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise MalformedArchiveError(f"tar header: {what} {text!r} is not an octal number") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156], "checksum")
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def _parse_pax(data: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad with NULs
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise MalformedArchiveError("pax header: record without a length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise MalformedArchiveError("pax header: bad record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise MalformedArchiveError("pax header: record length does not match")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise MalformedArchiveError("pax header: record without '='")
        try:
            out[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedArchiveError("pax header: record is not UTF-8") from None
        pos = end
    return out


def _normalise(path: str) -> str:
    while path.startswith("./"):
        path = path[2:]
    if path == ".":
        return ""
    return path.rstrip("/") if path != "/" else path


class TarReader:
    """Pull tar entries out of an iterable of byte chunks.

    ``next_entry()`` returns the next member (None at the end of the archive); then
    ``data()`` yields exactly that member's bytes in chunks of at most ``CHUNK`` (it must be
    consumed, or ``skip()`` called, before the next ``next_entry()``). ``limit`` caps the
    total bytes read from the stream and may be lowered once the manifest is known.
    """

    def __init__(self, chunks: Iterable[bytes], *, limit: int) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()
        self._pos = 0  # bytes handed out of _buf so far, over the whole stream
        self.limit = limit
        self._pending = 0  # data bytes (with padding) of the current entry not yet consumed
        self._pending_data = 0
        self.ended = False

    @property
    def bytes_read(self) -> int:
        """Bytes consumed from the stream so far."""
        return self._pos

    def _fill(self, n: int) -> bool:
        """Make at least n bytes available in the buffer; False if the stream ends first."""
        while len(self._buf) < n:
            try:
                chunk = next(self._it)
            except StopIteration:
                return False
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(f"install stream chunks must be bytes, got {type(chunk).__name__}")
            self._buf += chunk
        return True

    def _take(self, n: int, what: str) -> bytes:
        if self._pos + n > self.limit:
            raise ArchiveTooLargeError(
                f"the install stream goes on past {self.limit} bytes, more than the image can "
                "need; it is not the image the manifest describes: re-create the tar with "
                "`python -m m4image tar DIR -o FILE`"
            )
        if not self._fill(n):
            raise TruncatedArchiveError(
                f"the install stream ended inside {what} after {self._pos + len(self._buf)} bytes; "
                "the transfer was cut short: send the whole tar again"
            )
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos += n
        return out

    def _take_chunks(self, n: int, what: str) -> Iterator[bytes]:
        while n > 0:
            step = min(n, CHUNK)
            if not self._buf and not self._fill(1):
                raise TruncatedArchiveError(
                    f"the install stream ended inside {what}; the transfer was cut short: "
                    "send the whole tar again"
                )
            step = min(step, len(self._buf))
            yield self._take(step, what)
            n -= step

    @staticmethod
    def _padding(size: int) -> int:
        return -size % BLOCK

    def _read_record(self, size: int, what: str) -> bytes:
        if size > MAX_PAX_BYTES:
            raise MalformedArchiveError(f"{what} of {size} bytes is over the {MAX_PAX_BYTES}-byte limit")
        data = self._take(size, what)
        self._take(self._padding(size), what)
        return data

    def next_entry(self) -> TarEntry | None:
        if self._pending:
            raise RuntimeError("consume or skip the previous entry's data first")
        if self.ended:
            return None
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            header = self._take(BLOCK, "a tar header")
            if header == bytes(BLOCK):
                self._finish()
                return None
            if not _checksum_ok(header):
                raise MalformedArchiveError(
                    f"tar header at byte {self._pos - BLOCK} has a bad checksum (corrupt transfer?)"
                )
            if header[257:262] != b"ustar":
                raise MalformedArchiveError("tar header is not ustar/GNU/pax (old v7 tar is not accepted)")
            flag = header[156:157]
            size = _number(header[124:136], "size")
            if flag == b"x":
                pax.update(_parse_pax(self._read_record(size, "a pax header")))
                continue
            if flag == b"g":  # global pax header (git archive writes one): nothing we use
                self._read_record(size, "a global pax header")
                continue
            if flag == b"L":
                long_name = _nul_str(self._read_record(size, "a GNU long name"), "GNU long name")
                continue
            if flag == b"K":
                long_link = _nul_str(self._read_record(size, "a GNU long link"), "GNU long link")
                continue
            name = _nul_str(header[0:100], "name")
            prefix = _nul_str(header[345:500], "prefix") if header[257:263] == b"ustar\x00" else ""
            path = f"{prefix}/{name}" if prefix else name
            path = pax.get("path", long_name if long_name is not None else path)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise MalformedArchiveError("pax header: size is not a number") from None
            linkname = pax.get("linkpath", long_link if long_link is not None else _nul_str(header[157:257], "linkname"))
            kind = _KINDS.get(flag, f"other:{flag.decode('latin-1')!r}")
            self._pending_data = size
            self._pending = size + self._padding(size)
            return TarEntry(_normalise(path), kind, size, linkname)

    def data(self, what: str = "a file") -> Iterator[bytes]:
        """The current entry's bytes, in chunks, then its padding (consumed silently)."""
        size, pad = self._pending_data, self._pending - self._pending_data
        self._pending = self._pending_data = 0
        yield from self._take_chunks(size, what)
        self._take(pad, what)

    def skip(self) -> None:
        for _ in self.data():
            pass

    def _finish(self) -> None:
        """After the first zero block: the rest must be zero padding, and not much of it."""
        self.ended = True
        seen = 0
        while True:
            if not self._buf and not self._fill(1):
                return
            seen += len(self._buf)
            if seen > MAX_TRAILER_BYTES:
                raise ArchiveTooLargeError(
                    f"more than {MAX_TRAILER_BYTES} bytes follow the end of the archive; "
                    "send only the image tar"
                )
            if any(self._buf):
                raise MalformedArchiveError(
                    "data follows the end-of-archive marker; the stream holds more than one "
                    "image tar or is corrupt"
                )
            self._pos += len(self._buf)
            self._buf.clear()


# ---- writing --------------------------------------------------------------------------------


def _header(name: str, size: int, mode: int = 0o644) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _file_chunks(path: Path, size: int, chunk: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(f"{path} is not a regular file")
        left = size
        while left > 0:
            block = os.read(fd, min(chunk, left))
            if not block:
                raise ImageError(f"{path} shrank while being sent; verify the image and try again")
            left -= len(block)
            yield block
    finally:
        os.close(fd)


def iter_image_tar(directory: str | Path, *, chunk: int = CHUNK) -> Iterator[bytes]:
    """An image directory as an uncompressed tar, lazily, in the order the store requires.

    Sizes come from the manifest; the store checks every byte against it, so this side only
    reads (a file that changed on disk makes the install fail, never install something else).
    """
    root = Path(directory)
    manifest_bytes = (root / MANIFEST_NAME).read_bytes()
    manifest = Manifest.from_json(manifest_bytes)
    yield from iter_signed_tar(root, MANIFEST_NAME, SIGNATURE_NAME, manifest_bytes,
                               {p: e.size for p, e in manifest.files.items()}, chunk=chunk)


def iter_signed_tar(root: Path, manifest_name: str, signature_name: str, manifest_bytes: bytes,
                    sizes: Mapping[str, int], *, chunk: int = CHUNK) -> Iterator[bytes]:
    """A signed directory (an image or an add-on, ``m4image.addon``) as an uncompressed tar:
    the exact manifest bytes, the signature if there is one, then the listed files (sizes
    from the manifest) in path order, read as they are sent."""
    yield _header(manifest_name, len(manifest_bytes)) + manifest_bytes + bytes(-len(manifest_bytes) % BLOCK)
    sig = root / signature_name
    if sig.is_file():
        data = sig.read_bytes()
        yield _header(signature_name, len(data)) + data + bytes(-len(data) % BLOCK)
    for rel, size in sorted(sizes.items()):
        yield _header(rel, size)
        yield from _file_chunks(root / rel, size, chunk)
        if size % BLOCK:
            yield bytes(-size % BLOCK)
    yield bytes(2 * BLOCK)
