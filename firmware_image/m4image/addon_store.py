"""Add-on, store: the installed add-ons, under the image store's state directory.

Layout (a ``StoreDir``, as the image store's, in its own directory)::

    <state dir>/addons/
      state.json              which add-on name is which digest (schema m4-addons/1, below)
      installed/<digest>/     one verified add-on, named by the sha256 of its addon.json bytes
      staging/                0700: installs in progress, trash being deleted
      lock                    flock(2): one writer at a time, across processes

``state.json``::

    {"format": "m4-addons/1",
     "addons": {name: {"digest", "version", "base", "size", "signed_by", "installed_at"}},
     "history": [{"time", "event", "digest", "detail"}, ...]}

An install goes through the image's pipeline (``m4image.install``): the signature over the
exact addon.json bytes is checked first, then the manifest, then the caller's check against
the image it would join (``check``: base digest, clashes), and only then is a payload byte
written, each file hashed as it is written into staging/. The complete directory is published
with one rename, and state.json (tmp, fsync, rename, fsync) names it; installing a name again
replaces the add-on at that last rename. A crash at any point leaves the old state or the new
one: opening the store deletes staging leftovers and any installed/<digest> that state.json
does not name. Every durable step is a crash point (``m4image.durable``).

The daemon may still be running calls through a replaced or removed add-on: with ``keep``
the store leaves its directory in place (no longer named by state.json) until ``purge``.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from m4image.addon import ADDON, AddonManifest, check_name
from m4image.addon_io import VerifiedAddon, read_addon, verify_addon
from m4image.fsutil import canonical_json
from m4image.install import Staging, fill_from_dir, fill_from_tar
from m4image.keys import Keyring
from m4image.layout import Layout
from m4image.state import DIGEST, StateCorruptError, StoreError, now_text
from m4image.statedir import StoreDir

__all__ = ["ADDONS_FORMAT", "AddonEntry", "AddonNotFoundError", "AddonStore", "AddonsState",
           "Installed"]

ADDONS_FORMAT = "m4-addons/1"
DEFAULT_MAX_ADDON_BYTES = 1 << 30  # 1 GiB of payload
HISTORY_LIMIT = 200
# a look at a complete, verified add-on before it is published (its directory, its manifest)
Inspect = Callable[[Path, AddonManifest], None]


class AddonNotFoundError(StoreError):
    """No add-on of that name is installed."""

    status_code = "NOT_FOUND"


@dataclass(frozen=True)
class AddonEntry:
    """One installed add-on, as state.json records it."""

    name: str
    digest: str
    version: str
    base: str  # the image digest it is pinned to
    size: int
    signed_by: str | None
    installed_at: str

    _TYPES: ClassVar[dict[str, Any]] = {"digest": str, "version": str, "base": str, "size": int,
                                        "signed_by": (str, type(None)), "installed_at": str}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._TYPES}


@dataclass
class AddonsState:
    """The parsed contents of the add-on store's state.json."""

    addons: dict[str, AddonEntry] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return canonical_json({"format": ADDONS_FORMAT, "history": self.history,
                               "addons": {n: e.to_dict() for n, e in sorted(self.addons.items())}})

    def digests(self) -> set[str]:
        return {e.digest for e in self.addons.values()}

    @classmethod
    def from_bytes(cls, data: bytes, path: Path) -> AddonsState:
        def bad(detail: str) -> StateCorruptError:
            return StateCorruptError(
                f"{path} is corrupt ({detail}); restore it from a backup, or move "
                f"{path.parent} aside and install the add-ons again (schema {ADDONS_FORMAT}, "
                "m4image/addon_store.py)")

        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"not UTF-8 JSON: {e}") from None
        if not isinstance(d, dict) or set(d) != {"format", "addons", "history"} \
                or d["format"] != ADDONS_FORMAT:
            raise bad(f"not a {ADDONS_FORMAT} document")
        if not isinstance(d["addons"], dict) or not isinstance(d["history"], list):
            raise bad("addons must be an object and history a list")
        addons = {}
        for name, rec in d["addons"].items():
            ok = isinstance(rec, dict) and set(rec) == set(AddonEntry._TYPES) and all(
                isinstance(rec[k], t) and not isinstance(rec[k], bool)
                for k, t in AddonEntry._TYPES.items())
            if not ok or not DIGEST.match(rec["digest"]):
                raise bad(f"addons[{name!r}] is malformed")
            addons[name] = AddonEntry(name=name, **rec)
        return cls(addons, d["history"])


@dataclass(frozen=True)
class Installed:
    """The outcome of an install: the add-on now installed, and the one it replaced."""

    entry: AddonEntry
    replaced: AddonEntry | None
    changed: bool  # False: this very add-on was installed already, nothing was written


@dataclass(frozen=True)
class _Admission:
    """An add-on store's `install.Admits`: signature first, then the manifest, then
    `check` (the daemon's: the image it would join)."""

    keyring: Keyring | None
    max_addon_bytes: int
    check: Callable[[AddonManifest], None]

    @property
    def layout(self) -> Layout:
        return ADDON

    @property
    def max_bytes(self) -> int:
        return self.max_addon_bytes

    def admit(self, data: bytes, signature: bytes | None) -> tuple[AddonManifest, str | None]:
        manifest, key_id = read_addon(data, signature, self.keyring)
        self.check(manifest)
        return manifest, key_id


class AddonStore(StoreDir[AddonsState]):
    """The installed add-ons in ``<state_dir>/addons``; safe across threads and processes."""

    def __init__(self, state_dir: str | Path, *, max_addon_bytes: int = DEFAULT_MAX_ADDON_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_addon_bytes = max_addon_bytes
        super().__init__(Path(state_dir) / "addons", history_limit=HISTORY_LIMIT, clock=clock,
                         entries="installed", new_state=AddonsState,
                         parse_state=AddonsState.from_bytes)

    # ---- queries -------------------------------------------------------------------------

    def list(self) -> list[AddonEntry]:
        """Installed add-ons by name."""
        return sorted(self._load().addons.values(), key=lambda e: e.name)

    def get(self, name: str) -> AddonEntry:
        entry = self._load().addons.get(name)
        if entry is None:
            raise AddonNotFoundError(f"no add-on named {name!r} is installed; "
                                     "`m4ctl adapter list` shows them")
        return entry

    def path_of(self, digest: str) -> Path:
        return self.entries_dir / digest

    def verify(self, entry: AddonEntry, keyring: Keyring | None) -> VerifiedAddon:
        """Re-verify an installed add-on (signature with `keyring`, every file)."""
        return verify_addon(self.path_of(entry.digest), keyring=keyring)

    def history(self) -> builtins.list[dict[str, Any]]:
        return list(self._load().history)

    # ---- changes -------------------------------------------------------------------------

    def install_stream(self, chunks: Iterable[bytes], keyring: Keyring | None,
                       check: Callable[[AddonManifest], None], *, inspect: Inspect | None = None,
                       keep: bool = False) -> Installed:
        """Install from an add-on tar arriving in chunks (addon.json, addon.sig, files);
        `check` refuses a manifest before anything is written, `inspect` the complete
        directory (staged, verified) before it is published. With `keep`, the directory of
        an add-on this one replaces stays until `purge`."""
        return self._install(lambda s: fill_from_tar(s, chunks), keyring, check, inspect, keep)

    def install_from_dir(self, directory: str | Path, keyring: Keyring | None,
                         check: Callable[[AddonManifest], None] = lambda m: None, *,
                         inspect: Inspect | None = None, keep: bool = False) -> Installed:
        """Install an add-on directory (each file read once, hashed as it is copied)."""
        return self._install(lambda s: fill_from_dir(s, Path(directory)), keyring, check,
                             inspect, keep)

    def _install(self, fill: Callable[[Staging[AddonManifest]], None],
                 keyring: Keyring | None, check: Callable[[AddonManifest], None],
                 inspect: Inspect | None, keep: bool) -> Installed:
        with self._locked():
            staging = Staging(self.staging_dir, _Admission(keyring, self.max_addon_bytes, check),
                              None)
            try:
                fill(staging)
                digest = staging.commit()
                assert staging.manifest is not None
                m = staging.manifest
                if inspect is not None:
                    inspect(staging.dir, m)
                state = self._load()
                old = state.addons.get(m.name)
                if old is not None and old.digest == digest:
                    staging.abort()
                    return Installed(old, None, False)
                if digest in state.digests():  # cannot be: the name is in the manifest
                    raise StoreError(f"add-on {digest[:12]} is installed under another name")
                self._publish_entry(staging.dir, digest)
            except BaseException:
                staging.abort()
                raise
            entry = AddonEntry(m.name, digest, m.version, m.base, staging.total, staging.key_id,
                               now_text(self.clock))
            state.addons[m.name] = entry
            was = f", replacing {old.version} ({old.digest[:12]})" if old else ""
            self._event(state, "install", digest, f"{m.name} {m.version} for image "
                        f"{m.base[:12]}, signed by {staging.key_id or 'nobody (unchecked)'}{was}")
            self._save(state)
            if old is not None and not keep:
                self._discard(self.path_of(old.digest))
            return Installed(entry, old, True)

    def remove(self, name: str, *, keep: bool = False) -> AddonEntry:
        """Uninstall an add-on: state.json first (a crash after leaves a stray folder, which
        opening the store deletes), then its directory (with `keep`: at `purge`)."""
        check_name(name, "add-on")
        with self._locked():
            state = self._load()
            entry = state.addons.pop(name, None)
            if entry is None:
                raise AddonNotFoundError(f"no add-on named {name!r} is installed; "
                                         "`m4ctl adapter list` shows them")
            self._event(state, "remove", entry.digest, f"{name} {entry.version}")
            self._save(state)
            if not keep:
                self._discard(self.path_of(entry.digest))
            return entry

    def purge(self, digest: str) -> bool:
        """Delete the directory of a replaced or removed add-on kept for the calls that were
        still using it; a digest state.json names again (installed anew) is left alone."""
        with self._locked():
            path = self.path_of(digest)
            if digest in self._load().digests() or not path.is_dir():
                return False
            self._discard(path)
            return True
