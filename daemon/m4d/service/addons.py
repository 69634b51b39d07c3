"""Add-ons in the daemon: installed, listed and removed through the admin socket while apps
are served, and applied to every image they are pinned to.

The store (``m4image.addon_store``, under the image store's state directory) is the source of
truth for which add-ons are installed; this module runs its calls on worker threads and ties
them to what is served:

- install: the admin's tar is fed to ``AddonStore.install_stream``: the signature, then the
  manifest against the image served (its digest, its backbone, task ids and component names
  already taken: ``m4image.addon.check_base``), then every file hashed as it is written, then
  the adapters' shapes against the image (``m4d.adapters.pack.check_component``), and only
  then one rename. The add-on's components join the running image's adapter banks, under a
  name of their own (``<add-on>/<component>@<digest>``, so the prefix cache never mixes two
  versions), and its tasks join the task table: the next call sees them. Every image loaded
  with that digest gets it (also one a swap is loading). An add-on installed again under the
  same name replaces the old one in the same step; the old one is retired as on remove.
- remove: state.json first (the add-on is gone for good, even after a crash), then its tasks
  leave the table (new calls: "unknown task"), then its components are retired: a call
  already accepted holds its component until it ends (``m4d.executor.adapters``), and the
  add-on's files are deleted once the last one has. Nothing accepted ever fails.
- at start and at every hot swap, the add-ons pinned to the image loaded are verified again
  (signature, every hash) and applied before it serves (``Daemon.extensions``); the others
  are listed as not applying, with the reason.

One add-on change at a time; none during an image swap (UNAVAILABLE, retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from m4image.addon import ADDON, AdapterMismatchError, AddonManifest, check_base
from m4image.addon_io import VerifiedAddon
from m4image.addon_store import AddonEntry, AddonStore, Installed
from m4image.keys import Keyring
from m4image.manifest import ImageError

from m4d.adapters.lora import AdapterError
from m4d.adapters.pack import check_component, check_template
from m4d.errors import FailedPrecondition, Unavailable
from m4d.executor.adapters import AdapterBank, EncoderLoraBank, HeadBank, encoder_adapters
from m4d.service.daemon import Daemon, Serving
from m4d.service.tasks import Tasks
from m4d.service.transfer import pull_chunks

log = logging.getLogger(__name__)


Bank = AdapterBank | EncoderLoraBank | HeadBank


@dataclass
class Applied:
    """One add-on joined to one loaded image: its components' names in the banks, its tasks."""

    name: str
    digest: str
    components: dict[str, tuple[Bank, str]]  # component -> (bank, served as)
    task_ids: list[str]


@dataclass(frozen=True)
class AddonView:
    """One installed add-on as ListAddons shows it."""

    entry: AddonEntry
    manifest: AddonManifest | None  # None when its directory cannot be read
    applies: bool  # its tasks are served now
    reason: str = ""  # why it does not apply ("" when it does)
    served_as: dict[str, str] = field(default_factory=dict)  # component -> name in the banks


@dataclass(frozen=True)
class Change:
    """What an install or remove did; `finishing`: calls still running through what went."""

    view: AddonView
    replaced: AddonEntry | None = None
    finishing: int = 0
    changed: bool = True  # False: this very add-on was installed already


def served_name(addon: str, component: str, digest: str) -> str:
    """An add-on component's name in the adapter banks and the task table."""
    return f"{addon}/{component}@{digest[:12]}"


class AddonManager:
    """The daemon's side of the add-on store (image_source = "store")."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.keyring = Keyring(self.config.keys_dir) if self.config.require_signature else None
        self._store: AddonStore | None = None
        self._lock = asyncio.Lock()
        # per loaded image (its task table), the add-ons applied to it
        self._applied: weakref.WeakKeyDictionary[Tasks, dict[str, Applied]] = (
            weakref.WeakKeyDictionary())
        # every image loaded and not yet freed (the one serving, one being swapped in or out)
        self._live: weakref.WeakValueDictionary[int, Serving] = weakref.WeakValueDictionary()
        self._problems: dict[str, str] = {}  # add-on -> why it was not applied
        self._purges: set[asyncio.Task[None]] = set()
        daemon.extensions.append(self.apply)

    async def store(self) -> AddonStore:
        """The store, opened (and recovered after a crash) on first use."""
        if self._store is None:
            store = await asyncio.to_thread(AddonStore, self.config.state_dir)
            if store.recovered:
                log.warning("add-on store recovered after an interrupted operation",
                            extra={"removed": store.recovered})
            self._store = store
        return self._store

    # ---- applying to an image ------------------------------------------------------

    async def apply(self, serving: Serving) -> None:
        """The installed add-ons pinned to `serving`'s image join it (each verified again:
        signature and every file); one that fails is logged and listed, never fatal."""
        self._live[id(serving)] = serving  # an install from now on joins it too
        store = await self.store()
        for entry in await asyncio.to_thread(store.list):
            if entry.base != serving.image.digest:
                continue
            try:
                addon = await asyncio.to_thread(store.verify, entry, self.keyring)
                self._join(serving, addon)
                self._problems.pop(entry.name, None)
                log.info("add-on applied", extra={"addon": entry.name, "version": entry.version,
                                                  "image": serving.label})
            except (ImageError, AdapterError, FailedPrecondition) as exc:
                self._problems[entry.name] = f"not applied at load: {exc}"
                log.error("add-on not applied", extra={"addon": entry.name, "error": str(exc)})

    def _join(self, serving: Serving, addon: VerifiedAddon) -> Applied | None:
        """Puts the add-on's components in the banks and its tasks in the table; returns
        the version of it that this replaces (still in the banks: retire it)."""
        m, runtime = addon.manifest, serving.runtime
        banks: dict[tuple[str, str], Bank | None] = {
            ("lora", "backbone"): runtime.adapters, ("lora", "text_encoder"): runtime.encoder_loras,
            ("head", "text_encoder"): runtime.heads}
        components: dict[str, tuple[Bank, str]] = {}
        for comp, spec in m.components.items():
            bank = banks.get((spec["kind"], spec.get("module", "")))
            if bank is None:
                raise FailedPrecondition(f"add-on {m.name}: the image has no "
                                         f"{spec.get('module')} for adapter {comp!r}")
            components[comp] = (bank, served_name(m.name, comp, addon.digest))
        applied = self._applied.setdefault(serving.tasks, {})
        old = applied.get(m.name)
        if old is not None and old.digest == addon.digest:
            return None
        for comp, (bank, key) in components.items():
            bank.add(key, m.components[comp], addon.path)
        renamed = {comp: key for comp, (_, key) in components.items()}
        tasks = [dict(t, adapter=renamed.get(t.get("adapter") or "", t.get("adapter") or ""))
                 for t in m.tasks]
        serving.tasks.extend(m.name, tasks, [key for comp, (bank, key) in components.items()
                                            if isinstance(bank, AdapterBank)],
                             encoder_adapters(m.components, renamed))
        applied[m.name] = Applied(m.name, addon.digest, components, [t["id"] for t in tasks])
        return old

    def _retire(self, applied: Applied) -> tuple[int, list[asyncio.Future[None]]]:
        """Its components take no new call; each goes once no call holds it. Returns the
        calls still holding them and a future per component, done when it has gone."""
        loop = asyncio.get_running_loop()
        held, waits = 0, []
        for bank, key in applied.components.values():
            done: asyncio.Future[None] = loop.create_future()

            def gone(done: asyncio.Future[None] = done) -> None:  # any thread
                loop.call_soon_threadsafe(_settle, done)

            held += bank.retire(key, gone)
            waits.append(done)
        return held, waits

    def _purge_after(self, digest: str, waits: list[asyncio.Future[None]]) -> None:
        """Deletes an add-on's kept directory once its components have left every bank."""
        async def purge() -> None:
            await asyncio.gather(*waits)
            store = await self.store()
            if await asyncio.to_thread(store.purge, digest):
                log.info("add-on files deleted", extra={"digest": digest})

        task = asyncio.get_running_loop().create_task(purge())
        self._purges.add(task)
        task.add_done_callback(self._purges.discard)

    # ---- admin operations ----------------------------------------------------------

    def _serving(self) -> Serving:
        serving = self.daemon.serving()  # Unavailable while loading or swapping
        if self.daemon.operation:
            raise Unavailable(f"{self.daemon.operation} is in progress; retry when it "
                              "finishes", retry_after=max(1.0, round(self.daemon.load_seconds)))
        return serving

    async def install(self, chunks: AsyncIterator[bytes]) -> Change:
        """Streams an add-on tar into the store and applies it to the image served."""
        self._serving()  # refused at once while loading or swapping
        async with self._lock:
            serving = self._serving()  # (a swap may have started while this waited)
            self._live[id(serving)] = serving
            store, loop, gone = await self.store(), asyncio.get_running_loop(), threading.Event()
            image = serving.image
            applied = self._applied.setdefault(serving.tasks, {})

            def check(m: AddonManifest) -> None:  # before a payload byte is written
                others = {t for name, a in applied.items() if name != m.name for t in a.task_ids}
                check_base(m, image.manifest, image.digest, others)
                loras = [c for c, s in m.components.items()
                         if s["kind"] == "lora" and s.get("module") == "backbone"]
                if loras and serving.runtime.adapter_error:
                    raise AdapterMismatchError(f"add-on {m.name}: adapter {loras[0]!r} cannot "
                                               f"run here: {serving.runtime.adapter_error}")

            def inspect(root: Path, m: AddonManifest) -> None:  # before it is published
                try:
                    for spec in m.components.values():
                        check_component(spec, root / spec["dir"], image.manifest)
                    for task in m.tasks:
                        if task["rpc"] == "Generate":
                            check_template(task.get("prompt_template") or "")
                except AdapterError as exc:
                    raise AdapterMismatchError(f"add-on {m.name}: {exc}") from None

            def work() -> Installed:
                return store.install_stream(pull_chunks(chunks, loop, gone), self.keyring,
                                            check, inspect=inspect, keep=True)

            task = loop.run_in_executor(None, work)
            try:
                done = await asyncio.shield(task)
            finally:
                if not task.done():  # the caller went away: stop pulling, let it end
                    gone.set()
            addon = await asyncio.to_thread(store.verify, done.entry, None)
            finishing, waits = 0, list[asyncio.Future[None]]()
            for each in list(self._live.values()):  # a swap's new image may be loading
                if each.image.digest == addon.manifest.base:
                    old = self._join(each, addon)
                    if old is not None:
                        held, more = self._retire(old)
                        finishing, waits = finishing + held, waits + more
            if done.replaced is not None:
                self._purge_after(done.replaced.digest, waits)
            self._problems.pop(done.entry.name, None)
            if done.changed:
                log.info("add-on installed", extra={"addon": done.entry.name,
                                                    "version": done.entry.version,
                                                    "replaced": done.replaced.version
                                                    if done.replaced else None})
            return Change(self._view(done.entry, serving), done.replaced, finishing, done.changed)

    async def remove(self, name: str) -> Change:
        """Uninstalls an add-on: gone from the store at once, its tasks from the table at
        once, its components (and files) once the calls running through them have ended."""
        async with self._lock:
            store = await self.store()
            entry = await asyncio.to_thread(store.remove, name, keep=True)
            finishing, waits = 0, list[asyncio.Future[None]]()
            for tasks, applied in list(self._applied.items()):  # every image still loaded
                mine = applied.get(name)
                if mine is None or mine.digest != entry.digest:
                    continue
                tasks.withdraw(name)
                del applied[name]
                held, more = self._retire(mine)
                finishing, waits = finishing + held, waits + more
            self._problems.pop(name, None)
            self._purge_after(entry.digest, waits)
            log.info("add-on removed", extra={"addon": name, "version": entry.version,
                                              "calls_finishing": finishing})
            view = AddonView(entry, self._manifest(entry), False, "removed")
            return Change(view, None, finishing)

    async def listing(self) -> list[AddonView]:
        store = await self.store()
        entries = await asyncio.to_thread(store.list)
        return [self._view(e, self.daemon.current) for e in entries]

    def _manifest(self, entry: AddonEntry) -> AddonManifest | None:
        """The add-on's manifest as installed (None when its directory is unreadable)."""
        with contextlib.suppress(OSError, ImageError):
            assert self._store is not None
            path = self._store.path_of(entry.digest) / ADDON.manifest
            return AddonManifest.from_json(path.read_bytes())
        return None

    def _view(self, entry: AddonEntry, serving: Serving | None) -> AddonView:
        manifest = self._manifest(entry)
        if serving is None:
            return AddonView(entry, manifest, False, "no image is loaded")
        applied = self._applied.get(serving.tasks, {}).get(entry.name)
        if applied is not None and applied.digest == entry.digest:
            names = {comp: key for comp, (_, key) in applied.components.items()}
            return AddonView(entry, manifest, True, "", names)
        if entry.base != serving.image.digest:
            reason = (f"built for the image {entry.base[:12]}; the daemon serves "
                      f"{serving.label}")
        else:
            reason = self._problems.get(entry.name, "not applied")
        return AddonView(entry, manifest, False, reason)


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
