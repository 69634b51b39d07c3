"""Firmware images in the daemon: boot selection, and the admin operations on the image store.

The store (`m4image.store`) is the source of truth for which image is active, previous and on
trial; this module runs its calls on worker threads (they hash and fsync hundreds of MB, the
event loop never waits on them) and ties them to the daemon's life cycle:

- boot: an empty store is seeded with the factory image (`config.image`) and activates it;
  then `select_for_boot` counts the trial's attempt BEFORE it is loaded; the image is
  re-verified, loaded and self-tested; a passing trial is marked good, a failing one is
  marked bad and the daemon falls back to the last good image (logged, and in the store's
  history, which `m4ctl image list` shows).
- install: the admin's tar stream is fed to `Store.install_stream` on a worker thread, which
  pulls each chunk from the gRPC stream as it needs it; progress comes back to the caller.
- activate now / rollback: a hot swap (`Daemon.swap`), one at a time; the store records the
  outcome only after the self-test.

Self-test modes: "strict" marks a failing trial bad and refuses it; "warn" and "off" serve it
and leave it on trial, for the administrator to `m4ctl image mark-good` or roll back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from m4image.keys import Keyring
from m4image.manifest import ImageError
from m4image.store import (
    DowngradeError,
    ImageEntry,
    NoPreviousImageError,
    Store,
    StoreStatus,
)

from m4d import __version__
from m4d.errors import FailedPrecondition, Unavailable
from m4d.service.daemon import Daemon, SelfTestFailed, Serving, Verdict
from m4d.service.transfer import pull_chunks

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.1  # seconds between install progress messages


@dataclass(frozen=True)
class InstallProgress:
    """How far an install has got (see admin.proto InstallProgress)."""

    stage: str  # signature, files, publish
    received_bytes: int
    total_bytes: int
    written_bytes: int
    image_bytes: int


@dataclass(frozen=True)
class Listing:
    images: list[ImageEntry]
    status: StoreStatus
    history: list[dict[str, Any]]


class ImageManager:
    """The daemon's side of the image store (image_source = "store")."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.keyring = Keyring(self.config.keys_dir) if self.config.require_signature else None
        self._store: Store | None = None
        self._busy = False

    async def store(self) -> Store:
        """The store, opened (and recovered after a crash) on first use."""
        if self._store is None:
            store = await asyncio.to_thread(
                Store, self.config.state_dir, compatible=self.config.compatible,
                daemon_version=__version__)
            if store.recovered:
                log.warning("image store recovered after an interrupted operation",
                            extra={"removed": store.recovered})
            self._store = store
        return self._store

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ---- boot ----------------------------------------------------------------------

    async def boot(self) -> Serving:
        """The image to serve at start: the trial if it has attempts left, else the active one."""
        store = await self.store()
        await self._seed(store)
        strict = self.config.self_test == "strict"
        while True:
            sel = await self._call(store.select_for_boot, self.config.max_boot_attempts)
            if sel.fell_back:
                log.error("fallback: the trial image was not marked good after "
                          f"{self.config.max_boot_attempts} boot attempts; booting the last "
                          "good image", extra={"digest": sel.digest})
            role = f"trial (attempt {sel.attempt})" if sel.trial else "active"
            log.info("booting image from the store", extra={"digest": sel.digest, "role": role})
            try:
                image = await self._call(store.verify, sel.digest, self.keyring)
                serving = await self.daemon.start_image(image)
            except Exception as exc:
                if not sel.trial:
                    raise
                await self._reject(store, sel.digest, f"could not be loaded: {exc}")
                continue
            verdict = await self.daemon.self_test(serving)
            if verdict.passed:
                if sel.trial:
                    await self._call(store.mark_good, sel.digest)
                    log.info("trial image passed its self-test: marked good",
                             extra={"image": serving.label})
                return serving
            if strict:
                await self.daemon.stop_serving(serving)
                if not sel.trial:
                    raise SelfTestFailed(self.daemon.failure_message(serving, verdict))
                await self._reject(store, sel.digest, f"failed its self-test: {verdict.detail}")
                continue
            pending = "; it stays on trial until `m4ctl image mark-good`" if sel.trial else ""
            log.warning(f"serving an image whose self-test did not pass (self_test = "
                        f"{self.config.self_test}){pending}",
                        extra={"image": serving.label, "detail": verdict.detail})
            return serving

    async def _reject(self, store: Store, digest: str, reason: str) -> None:
        await self._call(store.mark_bad, digest, reason)
        active = (await self._call(store.status)).active
        log.error(f"trial image {digest[:12]} {reason}; falling back to the last good image "
                  f"{active[:12] if active else '(none)'}",
                  extra={"digest": digest, "fallback": active})

    async def _seed(self, store: Store) -> None:
        """Nothing bootable yet: install the factory image (config.image) and activate it."""
        status = await self._call(store.status)
        if status.active is not None or status.trial is not None:
            return
        factory = self.config.image
        if not factory.is_dir():
            return  # select_for_boot says what to do
        log.info("no image to boot: installing the factory image", extra={"path": str(factory)})
        digest = await self._call(store.install_from_dir, factory, self.keyring)
        await self._call(store.activate, digest)

    # ---- admin operations ----------------------------------------------------------

    async def listing(self) -> Listing:
        store = await self.store()
        images, status, history = await asyncio.gather(
            self._call(store.list), self._call(store.status), self._call(store.history))
        return Listing(images, status, history)

    async def entry(self, digest: str) -> ImageEntry:
        store = await self.store()
        entries: list[ImageEntry] = await self._call(store.list)
        for e in entries:
            if e.digest == digest:
                return e
        raise ImageError(f"image {digest[:12]} vanished from the store")  # removed meanwhile

    async def install(self, chunks: AsyncIterator[bytes], *, total_bytes: int,
                      allow_downgrade: bool, activate: bool,
                      ) -> AsyncIterator[InstallProgress | ImageEntry]:
        """Streams a tar into the store; yields progress, then the installed image."""
        store = await self.store()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[InstallProgress] = asyncio.Queue()
        gone = threading.Event()  # the caller went away: stop pulling chunks
        counts = {"received": 0, "written": 0, "image": 0}
        last = [0.0]

        def report(stage: str, force: bool = False) -> None:  # on the worker thread
            now = time.monotonic()
            if force or now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                loop.call_soon_threadsafe(updates.put_nowait, InstallProgress(
                    stage, counts["received"], total_bytes, counts["written"], counts["image"]))

        def received(n: int) -> None:
            counts["received"] += n

        def progress(stage: str, done: int, total: int) -> None:
            counts["written"], counts["image"] = done, total
            report("publish" if done >= total else "files", force=done >= total)

        def work() -> str:
            report("signature", force=True)
            digest: str = store.install_stream(pull_chunks(chunks, loop, gone, received),
                                               self.keyring,
                                               allow_downgrade=allow_downgrade, progress=progress)
            return digest

        task: asyncio.Future[str] = loop.run_in_executor(None, work)
        try:
            while True:
                getter = asyncio.ensure_future(updates.get())
                waiting: set[asyncio.Future[Any]] = {getter, task}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                break
            digest = task.result()  # raises the store's refusal
        finally:
            if not task.done():
                gone.set()
                task.add_done_callback(_log_abandoned)
        entry = await self.entry(digest)
        log.info("image installed", extra={"digest": digest, "image": entry.name,
                                           "version": entry.version})
        if activate:
            await self._call(store.activate, digest, allow_downgrade=allow_downgrade)
            entry = await self.entry(digest)
        yield entry

    async def activate(self, ref: str, *, allow_downgrade: bool, now: bool) -> ImageEntry:
        """Makes an image the trial; with `now`, hot-swaps to it and records the outcome."""
        store = await self.store()
        if not now:
            digest = await self._call(store.activate, ref, allow_downgrade=allow_downgrade)
            log.info("image activated for the next start", extra={"digest": digest})
            return await self.entry(digest)
        async with self._exclusive(f"activate {ref}"):
            digest = await self._call(store.activate, ref, allow_downgrade=allow_downgrade)
            await self._call(store.record_attempt)  # counted before loading, as at boot
            try:
                image = await self._call(store.verify, digest, self.keyring)
            except ImageError as exc:
                await self._call(store.mark_bad, digest, f"verification failed: {exc}")
                raise
            recorded = False

            async def commit(verdict: Verdict) -> None:
                nonlocal recorded
                recorded = True
                if verdict.passed:
                    await self._call(store.mark_good, digest)
                elif self.config.self_test == "strict":
                    await self._call(store.mark_bad, digest,
                                     f"failed its self-test: {verdict.detail}")

            try:
                serving = await self.daemon.swap(image, commit)
            except SelfTestFailed as exc:
                log.error(f"activation refused: {exc}; the old image keeps serving",
                          extra={"digest": digest})
                raise
            except Exception as exc:
                if not recorded:
                    with contextlib.suppress(ImageError):
                        await self._call(store.mark_bad, digest, f"could not be loaded: {exc}")
                raise
            log.info("image activated", extra={"image": serving.label})
            return await self.entry(digest)

    async def rollback(self, *, allow_downgrade: bool) -> tuple[ImageEntry, ImageEntry | None]:
        """Hot-swaps back to the previous good image; the store changes after its self-test."""
        store = await self.store()
        async with self._exclusive("rollback"):
            status = await self._call(store.status)
            if status.previous is None:
                raise NoPreviousImageError(
                    "there is no previous good image to roll back to (only one image has been "
                    "marked good); activate another installed image instead")
            prev = await self.entry(status.previous)
            if prev.security_version < status.max_security_version and not allow_downgrade:
                raise DowngradeError(
                    f"the previous image {prev.name} {prev.version} has security_version "
                    f"{prev.security_version}, below this device's anti-rollback floor "
                    f"{status.max_security_version}; pass --allow-downgrade if going back is "
                    "really intended")
            image = await self._call(store.verify, status.previous, self.keyring)

            async def commit(verdict: Verdict) -> None:
                if verdict.passed or self.config.self_test != "strict":
                    await self._call(store.rollback, allow_downgrade=allow_downgrade)

            await self.daemon.swap(image, commit)
            after = await self._call(store.status)
            active = await self.entry(after.active) if after.active else prev
            previous = await self.entry(after.previous) if after.previous else None
            log.info("rolled back", extra={"image": f"{active.name} {active.version}",
                                           "digest": active.digest})
            return active, previous

    async def mark_good(self, ref: str) -> ImageEntry:
        """The administrator vouches for the trial this daemon serves (self_test warn/off)."""
        store = await self.store()
        trial = (await self._call(store.status)).trial
        serving = self.daemon.image
        if trial is not None and (serving is None or serving.digest != trial):
            now = f"{serving.manifest.name} {serving.manifest.version}" if serving else "nothing"
            raise FailedPrecondition(
                f"the trial {trial[:12]} is not what this daemon serves (it serves {now}); "
                f"`m4ctl image activate {trial[:12]}` loads and self-tests it now, or restart "
                "m4d to boot it")
        digest = await self._call(store.mark_good, ref or None)
        log.info("trial image marked good by the administrator", extra={"digest": digest})
        return await self.entry(digest)

    async def remove(self, ref: str) -> str:
        store = await self.store()
        digest: str = await self._call(store.remove, ref)
        log.info("image removed", extra={"digest": digest})
        return digest

    @contextlib.asynccontextmanager
    async def _exclusive(self, what: str) -> AsyncIterator[None]:
        """One swap at a time; a second one is told to retry."""
        if self._busy:
            raise Unavailable(f"{self.daemon.operation} is in progress; retry when it finishes",
                              retry_after=max(1.0, round(self.daemon.load_seconds, 1)))
        self._busy, self.daemon.operation = True, what
        try:
            yield
        finally:
            self._busy, self.daemon.operation = False, ""


def _log_abandoned(future: asyncio.Future[str]) -> None:
    """An install whose caller went away: its outcome is only logged."""
    if future.cancelled():
        return
    exc = future.exception()
    if exc is None:
        log.info("install finished after its caller went away", extra={"digest": future.result()})
    else:
        log.info("install abandoned", extra={"reason": str(exc)})
