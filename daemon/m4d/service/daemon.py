"""The daemon's life cycle: start-up (verify, load, warm, self-test), serving, hot swap, draining.

Holds what the servicers share: the state and the `Serving` set (image, runtime, engine,
task table) of the image being served. The gRPC servers listen from the start, so health
answers NOT_SERVING and inference answers UNAVAILABLE while the model loads; READY follows
the self-test.

Where the image comes from (`config.image_source`): "image" serves the `config.image`
directory as it is; "store" boots from the image store (`load(images.boot)`, with
`m4d.service.images`), with attempt counting, self-test and fallback.

Hot swap (`swap`): the new image is loaded and self-tested beside the old one (swap_mode
"overlap"), then one assignment on the event loop makes new calls use it; a call takes its
task table and engine in one synchronous step, and a `RequestStream` holds its engine, so
calls in flight finish on the old image, which is then drained and stopped in the
background. With swap_mode "drain" the old image is drained and unloaded first: inference
calls get UNAVAILABLE with a retry hint until the new one serves (at most drain_timeout +
load + self-test seconds; the measured load time is the hint).

Every image loaded is handed to the `extensions` before it serves: the installed add-ons
pinned to its digest join its adapter banks and task table (`m4d.service.addons`).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from m4image.verify import VerifiedImage, verify_image

from m4d import __version__
from m4d.config import Config
from m4d.engine.admission import AdmissionConfig, UidQuota
from m4d.engine.backpressure import BackpressureConfig
from m4d.engine.config import EngineConfig
from m4d.engine.engine import Engine
from m4d.engine.policy import make_policy
from m4d.errors import FailedPrecondition, Unavailable
from m4d.executor.adapters import ADAPTER_KINDS, encoder_adapters
from m4d.executor.memory import rss_bytes, trim_heap
from m4d.executor.runtime import Runtime
from m4d.executor.shared import unshared_bytes
from m4d.service.selftest import run_self_test
from m4d.service.sessions import Sessions
from m4d.service.tasks import ImageInfo, Tasks

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True)
class Serving:
    """One loaded image: what a call needs, taken together so a swap never mixes two images."""

    image: VerifiedImage
    runtime: Runtime
    engine: Engine
    tasks: Tasks

    @property
    def label(self) -> str:
        m = self.image.manifest
        return f"{m.name} {m.version} ({self.image.digest[:12]})"


@dataclass(frozen=True)
class Verdict:
    """The self-test's outcome: `passed` only when it ran and every check passed."""

    passed: bool
    detail: str


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = __version__
        self.state = State.LOADING
        self.started = time.monotonic()
        self._serving: Serving | None = None
        self._blocked: tuple[str, float] | None = None  # during a drain-mode swap: why, hint
        self._retiring: set[asyncio.Task[None]] = set()
        self._engines: set[Engine] = set()  # every engine started and not yet stopped
        self.load_seconds = 0.0  # the last image load + self-test: the swap's retry hint
        self.phases: dict[str, float] = {}  # the last load's seconds per part (logged at ready)
        self.operation = ""  # the image operation in progress, for Status
        # called with each image loaded, before it serves (the add-ons pinned to it join it)
        self.extensions: list[Callable[[Serving], Awaitable[None]]] = []
        # apps' conversations (text: they outlive an image swap)
        self.sessions = Sessions(config.sessions_per_uid, config.default_max_tokens)

    # ---- what the servicers use ----------------------------------------------------

    @property
    def image(self) -> VerifiedImage | None:
        return self._serving.image if self._serving else None

    @property
    def runtime(self) -> Runtime | None:
        return self._serving.runtime if self._serving else None

    @property
    def engine(self) -> Engine | None:
        return self._serving.engine if self._serving else None

    @property
    def current(self) -> Serving | None:
        """The image serving new calls, if any (for listings: never Unavailable)."""
        return self._serving

    @property
    def swapping(self) -> bool:
        """True during a drain-mode swap, when no engine serves (the watchdog may skip pings)."""
        return self._blocked is not None

    def serving(self) -> Serving:
        """The image that serves new calls; Unavailable while loading, swapping or draining."""
        if self.state is State.DRAINING:
            raise Unavailable("the daemon is shutting down; retry on the next start",
                              retry_after=5.0)
        if self._blocked is not None:
            raise Unavailable(*self._blocked)
        if self.state is not State.READY or self._serving is None:
            raise Unavailable("the model is loading; retry shortly", retry_after=2.0)
        return self._serving

    def engine_for_requests(self) -> Engine:
        return self.serving().engine

    def tasks(self) -> Tasks:
        return self.serving().tasks

    # ---- life cycle ----------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        self.state = state
        log.info("daemon state", extra={"state": state.value})

    async def load(self, boot: Callable[[], Awaitable[Serving]] | None = None) -> None:
        """Loads the image to serve and self-tests it: `boot` chooses it (the image store's
        `ImageManager.boot`), by default `config.image` as it is."""
        started = time.monotonic()
        self._serving = await (boot or self._load_directly)()
        self._set_state(State.READY)
        log.info("ready", extra={"seconds": round(time.monotonic() - started, 2),
                                 "since_exec": round(process_age(), 2),
                                 "phases": {k: round(v, 3) for k, v in self.phases.items()},
                                 "image": self._serving.label})
        await self._settle(self._serving)

    async def _settle(self, serving: Serving) -> None:
        """After an image starts serving: its deferred warm-up, then the load's temporaries
        and read-once pages handed back (off the path to ready)."""
        await asyncio.to_thread(serving.runtime.settle)
        await asyncio.to_thread(release_memory)

    async def _load_directly(self) -> Serving:
        """`config.image` as it is: every hash verified, the signature not (development)."""
        started = time.monotonic()
        image = await asyncio.to_thread(verify_image, self.config.image)
        self.phases["verify"] = time.monotonic() - started
        serving = await self.start_image(image)
        verdict = await self.self_test(serving)
        if not verdict.passed and self.config.self_test == "strict":
            await self.stop_serving(serving)
            raise SelfTestFailed(self.failure_message(serving, verdict))
        return serving

    async def start_image(self, image: VerifiedImage) -> Serving:
        """Loads a verified image on a worker thread and starts its engine; the event loop
        (and the engine serving now) keep running meanwhile."""
        started = time.monotonic()
        manifest = image.manifest
        log.info("loading image", extra={"image": manifest.name, "version": manifest.version,
                                         "digest": image.digest, "path": str(image.path)})
        runtime = Runtime(image, self.config)
        await asyncio.to_thread(runtime.load)
        self.phases.update(runtime.phases)
        engine = Engine(runtime, engine_config(self.config))
        engine.start()
        self._engines.add(engine)
        tasks = Tasks(
            self.config, manifest.tasks, ImageInfo(manifest.name, manifest.version, image.digest),
            runtime.tokenizer, runtime.chat_template, runtime.max_context, runtime.grammars,
            runtime.encoder_window, runtime.adapters.names if runtime.adapters else (),
            runtime.adapter_error, encoder_adapters(manifest.components))
        serving = Serving(image, runtime, engine, tasks)
        for extend in self.extensions:
            await extend(serving)
        self.load_seconds = time.monotonic() - started
        return serving

    async def self_test(self, serving: Serving) -> Verdict:
        """Runs the image's self-test on its own engine (self_test = "off": not run)."""
        if self.config.self_test == "off":
            return Verdict(False, "the self-test is off (self_test = \"off\")")
        started = time.monotonic()
        results = await run_self_test(serving.image.manifest.self_test, serving.tasks,
                                      serving.engine, Path(serving.image.path))
        for r in results:
            log.info("self-test", extra={"check": r.name, "passed": r.passed,
                                         "detail": r.detail, "image": serving.label})
        self.load_seconds += time.monotonic() - started
        self.phases["self_test"] = time.monotonic() - started
        failed = [r.detail for r in results if not r.passed]
        if failed:
            return Verdict(False, "; ".join(failed))
        return Verdict(True, f"{len(results)} checks passed")

    def failure_message(self, serving: Serving, verdict: Verdict) -> str:
        m = serving.image.manifest
        ran = ", ".join(f"{c.name} {c.weight_format}/{c.compute_dtype}"
                        for c in serving.runtime.components)  # "auto" and fallbacks resolved
        return (f"image {m.name} {m.version} failed its self-test with weight_format="
                f"{self.config.weight_format}, compute_dtype={self.config.compute_dtype} "
                f"({ran}): {verdict.detail}")

    async def stop_serving(self, serving: Serving) -> None:
        """Stops an engine (on a thread: the join may wait for its last step)."""
        await asyncio.to_thread(serving.engine.stop)
        self._engines.discard(serving.engine)

    # ---- hot swap ------------------------------------------------------------------

    async def swap(self, image: VerifiedImage,
                   commit: Callable[[Verdict], Awaitable[None]]) -> Serving:
        """Serve `image` from now on, without stopping service.

        Loads and self-tests it, then awaits `commit(verdict)` (the store records the
        outcome; it raises to refuse the image), then switches. A strict self-test failure
        raises SelfTestFailed after `commit` has recorded it; the old image keeps serving
        (in drain mode it is loaded again)."""
        if self.config.swap_mode == "drain" or self._over_swap_budget(image):
            return await self._swap_drained(image, commit)
        new = await self.start_image(image)
        try:
            await self._accept(new, commit)
        except BaseException:
            await self.stop_serving(new)
            raise
        old, self._serving = self._serving, new  # one assignment: new calls go to `new`
        log.info("image swapped", extra={"image": new.label,
                                         "old": old.label if old else None})
        if old is not None:
            self._retire(old)
        del old  # the retirement holds it now
        await self._settle(new)
        return new

    def _over_swap_budget(self, image: VerifiedImage) -> bool:
        """Whether loading `image` beside the serving one could pass swap_memory_mb."""
        budget = self.config.swap_memory_mb << 20
        if not budget:
            return False
        lazy = tuple(f"{c['dir']}/" for c in image.manifest.components.values()  # adapters load
                     if c["kind"] in ADAPTER_KINDS)  # on first use, within adapter_memory_mb
        files = {p: e for p, e in image.manifest.files.items() if not p.startswith(lazy)}
        now, adds = rss_bytes(), unshared_bytes(files) + SWAP_SELF_TEST_BYTES
        over = now + adds > budget
        log.info("swap memory", extra={"rss_mib": now >> 20, "new_image_adds_mib": adds >> 20,
                                        "budget_mib": budget >> 20,
                                        "mode": "drain" if over else "overlap"})
        return over

    async def _accept(self, new: Serving, commit: Callable[[Verdict], Awaitable[None]]) -> None:
        verdict = await self.self_test(new)
        await commit(verdict)
        if not verdict.passed and self.config.self_test == "strict":
            raise SelfTestFailed(self.failure_message(new, verdict))

    async def _swap_drained(self, image: VerifiedImage,
                            commit: Callable[[Verdict], Awaitable[None]]) -> Serving:
        old = self._serving
        old_image = old.image if old is not None else None
        hint = max(1.0, round(self.load_seconds, 1))
        self._blocked = (
            f"swapping to image {image.manifest.name} {image.manifest.version}: the old image "
            "is unloaded first (swap_mode = drain); retry shortly", hint)
        window = time.monotonic()
        try:
            if old is not None:
                await self._wait_idle(old.engine, self.config.drain_timeout)
                await self.stop_serving(old)
                self._serving = old = None
                await asyncio.to_thread(release_memory)
            new: Serving | None = None
            try:
                new = await self.start_image(image)
                await self._accept(new, commit)
            except BaseException:
                if new is not None:
                    await self.stop_serving(new)
                if old_image is not None:
                    log.warning("reloading the old image", extra={"digest": old_image.digest})
                    self._serving = await self.start_image(old_image)
                raise
            self._serving = new
            await self._settle(new)
            return new
        finally:
            self._blocked = None
            log.info("drain-mode swap window closed",
                     extra={"seconds": round(time.monotonic() - window, 2)})

    def _retire(self, old: Serving) -> None:
        """Lets the old image's calls finish (up to drain_timeout), then stops its engine."""
        task = asyncio.get_running_loop().create_task(self._retire_now(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire_now(self, old: Serving) -> None:
        started = time.monotonic()
        label, engine = old.label, old.engine
        del old  # the engine holds the runtime: its last reference goes with `engine`
        await self._wait_idle(engine, self.config.drain_timeout)
        await asyncio.to_thread(engine.stop)
        self._engines.discard(engine)
        runtime = weakref.ref(engine.runtime)
        del engine
        # the frames that handed the old image over (the swap, the admin call) may hold it
        # a little longer: its memory goes back once it is garbage, not before
        for _ in range(RETIRE_COLLECT_TRIES):
            await asyncio.to_thread(release_memory)
            if runtime() is None:
                break
            await asyncio.sleep(0.5)
        log.info("old image retired", extra={"image": label, "freed": runtime() is None,
                                             "seconds": round(time.monotonic() - started, 2)})

    async def _wait_idle(self, engine: Engine, timeout: float) -> None:
        """Waits until the engine has no call in flight (up to timeout)."""
        loop = asyncio.get_running_loop()
        idle = asyncio.Event()

        def wake() -> None:  # runs on the executor thread
            loop.call_soon_threadsafe(idle.set)

        engine.on_idle = wake
        if engine.stats.in_flight == 0:
            return
        try:
            await asyncio.wait_for(idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain timeout: cutting off in-flight calls",
                        extra={"in_flight": engine.stats.in_flight})

    # ---- shutdown ------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Refuses new calls and waits (up to timeout) for in-flight ones to finish."""
        self._set_state(State.DRAINING)
        engine = self.engine
        if engine is not None:
            await self._wait_idle(engine, timeout)

    def stop(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for engine in list(self._engines):
            engine.stop()
        self._engines.clear()

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started


SWAP_SELF_TEST_BYTES = 64 << 20  # an image's self-test and first steps, beside the weights
RETIRE_COLLECT_TRIES = 20  # 0.5 s apart: how long an old image's memory is waited for


def process_age() -> float:
    """Seconds since this process was exec'd (Linux /proc; 0.0 elsewhere)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return 0.0
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the comm
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def release_memory() -> None:
    """Collects unreachable objects, then hands freed heap pages back to the OS
    (glibc's malloc_trim; a no-op elsewhere): an unloaded model's memory shows as free."""
    gc.collect()
    trim_heap()


def engine_config(config: Config) -> EngineConfig:
    """The engine's limits, policies and admission from the daemon's settings."""
    unlimited = 1e15  # finite, so bucket arithmetic never meets inf - inf
    rate = config.uid_tokens_per_second or unlimited
    burst = rate * 4 if config.uid_tokens_per_second else unlimited
    admission = AdmissionConfig(
        priority_limits={0: config.max_queue, 1: config.max_queue + config.kv_slots,
                         2: config.max_queue + config.kv_slots},
        quota=UidQuota(max_concurrent=config.uid_max_concurrent, tokens_per_second=rate,
                       burst_tokens=burst, max_queued=config.uid_max_queued,
                       max_running=config.max_running(),
                       max_tokens_in_flight=config.uid_max_tokens_in_flight),
        max_priority=config.class_caps())  # uid_max_class: a uid's most urgent priority
    return EngineConfig(
        kv_slots=config.kv_slots, token_budget=config.step_token_budget,
        prefill_chunk=config.prefill_chunk, max_queue=config.max_queue,
        max_batch_texts=config.max_batch_texts, max_batch_media=config.max_batch_media,
        kv_tokens=config.kv_pool_tokens or None, admission=admission,
        min_run_tokens=config.min_run_tokens, park_tokens=config.kv_park_tokens,
        prefix_cache_tokens=config.prefix_cache_tokens,
        backpressure=BackpressureConfig(config.stream_pause_tokens, config.stream_stall_seconds),
        policy=(make_policy(config.queue_policy, aging=config.aging_seconds or None)
                if config.queue_policy != "fcfs" else "fcfs"))


class SelfTestFailed(FailedPrecondition):
    """The image's self-test did not pass on this daemon (FAILED_PRECONDITION for an admin)."""
