"""Firmware image, store state: ``state.json``, its schema, strict parsing and canonical bytes.

Schema ``m4-store/1`` (canonical JSON: sorted keys, 2-space indent)::

    {"format": "m4-store/1",
     "active": digest | null,        the last image marked good: what boots
     "previous": digest | null,      the good image before it: what ``rollback`` returns to
     "trial": digest | null,         activated, not yet marked good
     "attempts": int,                boots of the trial so far (counted before loading it)
     "max_security_version": int,    anti-rollback floor: highest security_version marked good
     "images": {digest: {"name", "version", "security_version", "compatible", "size",
                         "signed_by": key id | null, "installed_at": RFC 3339}},
     "history": [{"time", "event", "digest", "detail"}, ...]}   (the most recent events)

Parsing refuses anything else (unknown or missing keys, wrong types, a role naming an image
that is not installed) with ``StateCorruptError``, whose message says how to recover; the
store never resets a state file it cannot read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from m4image.fsutil import canonical_json
from m4image.manifest import ImageError

__all__ = [
    "DIGEST",
    "STATE_FORMAT",
    "ImageRecord",
    "State",
    "StateCorruptError",
    "StateMissingError",
    "StoreError",
    "now_text",
]

STATE_FORMAT = "m4-store/1"
DIGEST = re.compile(r"^[0-9a-f]{64}$")
INSTALL_HINT = "`m4ctl image install FILE`"


class StoreError(ImageError):
    """Base of the image store's own refusals."""


class StateCorruptError(StoreError):
    """state.json exists but does not parse or does not match the schema."""


class StateMissingError(StoreError):
    """state.json is gone while images are still installed."""


def now_text(clock: Callable[[], float]) -> str:
    """RFC 3339 UTC time, to the second: ``2025-01-01T12:00:00Z``."""
    return datetime.fromtimestamp(clock(), UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class ImageRecord:
    """What the store remembers of one installed image (from its verified manifest)."""

    name: str
    version: str
    security_version: int
    compatible: str
    size: int
    signed_by: str | None
    installed_at: str

    _TYPES: ClassVar[dict[str, Any]] = {"name": str, "version": str, "security_version": int, "compatible": str,
              "size": int, "signed_by": (str, type(None)), "installed_at": str}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._TYPES}


@dataclass
class State:
    """The parsed contents of state.json."""

    active: str | None = None
    previous: str | None = None
    trial: str | None = None
    attempts: int = 0
    max_security_version: int = 0
    images: dict[str, ImageRecord] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "active": self.active,
            "previous": self.previous,
            "trial": self.trial,
            "attempts": self.attempts,
            "max_security_version": self.max_security_version,
            "images": {d: r.to_dict() for d, r in sorted(self.images.items())},
            "history": self.history,
        }

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> State:
        def bad(detail: str) -> StateCorruptError:
            return StateCorruptError(
                f"{path} is corrupt ({detail}); the store refuses to guess which image to boot. "
                f"Restore it from a backup, or repair it by hand (schema: {STATE_FORMAT}, see "
                f"m4image/state.py); to start over, move both {path} and {path.parent / 'images'} "
                f"aside, then {INSTALL_HINT} and `m4ctl image activate`"
            )

        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"not UTF-8 JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise bad(f"format is not {STATE_FORMAT!r}")
        want = {"format", "active", "previous", "trial", "attempts", "max_security_version", "images", "history"}
        if set(d) != want:
            raise bad(f"keys {sorted(set(d) ^ want)} are missing or unknown")
        for key in ("active", "previous", "trial"):
            if d[key] is not None and (not isinstance(d[key], str) or not DIGEST.match(d[key])):
                raise bad(f"{key} is not a digest or null")
        for key in ("attempts", "max_security_version"):
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0:
                raise bad(f"{key} is not a non-negative integer")
        if not isinstance(d["images"], dict) or not isinstance(d["history"], list):
            raise bad("images must be an object and history a list")
        images: dict[str, ImageRecord] = {}
        for digest, rec in d["images"].items():
            if not DIGEST.match(digest) or not isinstance(rec, dict) or set(rec) != set(ImageRecord._TYPES):
                raise bad(f"images[{digest!r}] is malformed")
            for k, typ in ImageRecord._TYPES.items():
                if not isinstance(rec[k], typ) or isinstance(rec[k], bool):
                    raise bad(f"images[{digest[:12]}].{k} has the wrong type")
            images[digest] = ImageRecord(**rec)
        for key in ("active", "previous", "trial"):
            if d[key] is not None and d[key] not in images:
                raise bad(f"{key} {d[key][:12]} is not among the installed images")
        return cls(
            active=d["active"],
            previous=d["previous"],
            trial=d["trial"],
            attempts=d["attempts"],
            max_security_version=d["max_security_version"],
            images=images,
            history=d["history"],
        )

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    def digests(self) -> set[str]:
        """The installed images (the store's entries ``images/<digest>``)."""
        return set(self.images)
