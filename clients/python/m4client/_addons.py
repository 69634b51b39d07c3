"""Add-ons as the admin client sees them: dataclasses and their conversion from the Admin
service's messages (InstallAddon, ListAddons, RemoveAddon)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from m4.admin.v1 import admin_pb2

from ._images import INSTALL_CHUNK, _time


@dataclass(frozen=True)
class AddonComponent:
    """One adapter of an add-on: a LoRA on the backbone or a task head on the text encoder."""

    name: str
    kind: str  # "lora" or "head"
    module: str  # "backbone" or "text_encoder"
    rank: int
    alpha: float
    targets: list[str]
    labels: list[str]
    metrics: dict[str, float]  # flattened: "adapter.intent_accuracy" -> 0.95
    served_as: str  # its name in the task table while the add-on applies


@dataclass(frozen=True)
class AddonTask:
    """One task an add-on serves."""

    id: str
    rpc: str
    description: str
    adapter: str


@dataclass(frozen=True)
class AddonInfo:
    """One installed add-on; `applies`: its tasks are served now (else `reason` says why)."""

    name: str
    version: str
    digest: str
    base_digest: str
    size_bytes: int
    signed_by: str
    installed_at: str  # RFC 3339, UTC
    applies: bool
    reason: str
    tasks: list[AddonTask]
    components: list[AddonComponent]
    raw: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class AddonList:
    """ListAddons: the installed add-ons (by name) and the digest of the image served."""

    addons: list[AddonInfo]
    image_digest: str
    raw: Any = field(default=None, repr=False, compare=False)

    def get(self, name: str) -> AddonInfo | None:
        return next((a for a in self.addons if a.name == name), None)


@dataclass(frozen=True)
class AddonChange:
    """InstallAddon / RemoveAddon: the add-on, the version it replaced (install), and the
    calls still running through what went (they finish on it)."""

    addon: AddonInfo
    replaced: AddonInfo | None
    calls_finishing: int
    changed: bool = True  # False: this very add-on was installed already
    raw: Any = field(default=None, repr=False, compare=False)


def addon_info(msg: admin_pb2.AddonInfo) -> AddonInfo:
    return AddonInfo(
        msg.name, msg.version, msg.digest, msg.base_digest, msg.size_bytes, msg.signed_by,
        _time(msg.installed_at), msg.applies, msg.reason,
        [AddonTask(t.id, t.rpc, t.description, t.adapter) for t in msg.tasks],
        [AddonComponent(c.name, c.kind, c.module, c.rank, c.alpha, list(c.targets),
                        list(c.labels), dict(c.metrics), c.served_as) for c in msg.components],
        raw=msg)


def addon_list(msg: admin_pb2.ListAddonsResponse) -> AddonList:
    return AddonList([addon_info(a) for a in msg.addons], msg.image_digest, raw=msg)


def installed_addon(msg: admin_pb2.InstallAddonResponse) -> AddonChange:
    replaced = addon_info(msg.replaced) if msg.HasField("replaced") else None
    return AddonChange(addon_info(msg.addon), replaced, msg.calls_finishing, msg.changed,
                       raw=msg)


def removed_addon(msg: admin_pb2.RemoveAddonResponse) -> AddonChange:
    return AddonChange(addon_info(msg.addon), None, msg.calls_finishing, raw=msg)


def install_requests(chunks: Iterable[bytes]) -> Iterator[admin_pb2.InstallAddonRequest]:
    """The InstallAddon request stream: the tar in messages of 1 MiB (small pieces joined)."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= INSTALL_CHUNK:
            yield admin_pb2.InstallAddonRequest(chunk=bytes(buf[:INSTALL_CHUNK]))
            del buf[:INSTALL_CHUNK]
    if buf:
        yield admin_pb2.InstallAddonRequest(chunk=bytes(buf))
