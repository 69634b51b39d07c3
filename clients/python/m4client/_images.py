"""Firmware images as the admin client sees them: dataclasses and their conversion from the
Admin service's messages (ListImages, InstallImage, ActivateImage, MarkGood, Rollback)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from m4.admin.v1 import admin_pb2

#: Largest chunk of an install tar per message (the daemon accepts up to 4 MiB per message).
INSTALL_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageInfo:
    """One installed image; `state` is "active", "previous", "trial" or "installed"."""

    digest: str
    name: str
    version: str
    security_version: int
    compatible: str
    size_bytes: int
    signed_by: str
    installed_at: str  # RFC 3339, UTC
    state: str
    raw: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class StoreEvent:
    """One entry of the store's history: install, activate, boot-attempt, mark-good, ..."""

    time: str
    event: str
    digest: str
    detail: str


@dataclass(frozen=True)
class ImageList:
    """ListImages: the images (oldest install first), the boot state and the history."""

    images: list[ImageInfo]
    trial_attempts: int
    max_trial_attempts: int
    max_security_version: int
    history: list[StoreEvent]
    trial_digest: str = ""
    raw: Any = field(default=None, repr=False, compare=False)

    def by_state(self, state: str) -> ImageInfo | None:
        return next((i for i in self.images if i.state == state), None)

    @property
    def trial(self) -> ImageInfo | None:
        """The image on trial (it may also be the previous image)."""
        return next((i for i in self.images if i.digest == self.trial_digest), None)


@dataclass(frozen=True)
class InstallProgress:
    """How far an install has got: stage, tar bytes sent, payload bytes written and hashed."""

    stage: str
    received_bytes: int
    total_bytes: int
    written_bytes: int
    image_bytes: int


def _time(ts: Any) -> str:
    return str(ts.ToJsonString()) if ts.seconds or ts.nanos else ""


def image_info(msg: admin_pb2.ImageInfo) -> ImageInfo:
    try:
        state = admin_pb2.ImageState.Name(msg.state).removeprefix("IMAGE_STATE_").lower()
    except ValueError:
        state = str(msg.state)
    return ImageInfo(msg.digest, msg.name, msg.version, msg.security_version, msg.compatible,
                     msg.size_bytes, msg.signed_by, _time(msg.installed_at), state, raw=msg)


def image_list(msg: admin_pb2.ListImagesResponse) -> ImageList:
    return ImageList(
        images=[image_info(i) for i in msg.images],
        trial_attempts=msg.trial_attempts,
        max_trial_attempts=msg.max_trial_attempts,
        max_security_version=msg.max_security_version,
        history=[StoreEvent(_time(h.time), h.event, h.digest, h.detail) for h in msg.history],
        trial_digest=msg.trial_digest,
        raw=msg,
    )


def install_progress(msg: admin_pb2.InstallProgress) -> InstallProgress:
    return InstallProgress(msg.stage, msg.received_bytes, msg.total_bytes, msg.written_bytes,
                           msg.image_bytes)


def install_requests(chunks: Iterable[bytes], *, total_bytes: int, allow_downgrade: bool,
                     activate: bool) -> Iterator[admin_pb2.InstallImageRequest]:
    """The InstallImage request stream: options, then the tar in messages of 1 MiB (small
    pieces, such as tar headers, are joined; the last message may be shorter)."""
    yield admin_pb2.InstallImageRequest(options=admin_pb2.InstallOptions(
        total_bytes=total_bytes, allow_downgrade=allow_downgrade, activate=activate))
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= INSTALL_CHUNK:
            yield admin_pb2.InstallImageRequest(chunk=bytes(buf[:INSTALL_CHUNK]))
            del buf[:INSTALL_CHUNK]
    if buf:
        yield admin_pb2.InstallImageRequest(chunk=bytes(buf))
