"""The daemon's life cycle: start-up (verify, load, warm, self-test), serving, draining.

Holds what the servicers share: the state, the engine and the converter of the active
image. The gRPC servers listen from the start, so health answers NOT_SERVING and
inference answers UNAVAILABLE while the model loads; READY follows the self-test.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

from m4image.verify import VerifiedImage, verify_image

from m4d import __version__
from m4d.config import Config
from m4d.engine.admission import AdmissionConfig, UidQuota
from m4d.engine.engine import Engine
from m4d.engine.policy import make_policy
from m4d.errors import Unavailable
from m4d.executor.runtime import Runtime
from m4d.server.convert import Converter, ImageInfo
from m4d.server.selftest import run_self_test

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = __version__
        self.state = State.LOADING
        self.started = time.monotonic()
        self.image: VerifiedImage | None = None
        self.runtime: Runtime | None = None
        self.engine: Engine | None = None
        self._converter: Converter | None = None
        self.on_state_change: list[Callable[[State], None]] = []

    # ---- what the servicers use ----------------------------------------------------

    def engine_for_requests(self) -> Engine:
        if self.state is State.DRAINING:
            raise Unavailable("the daemon is shutting down; retry on the next start",
                              retry_after=5.0)
        if self.state is not State.READY or self.engine is None:
            raise Unavailable("the model is loading; retry shortly", retry_after=2.0)
        return self.engine

    def converter(self) -> Converter:
        self.engine_for_requests()  # same availability rule
        assert self._converter is not None
        return self._converter

    # ---- life cycle ----------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        self.state = state
        log.info("daemon state", extra={"state": state.value})
        for callback in self.on_state_change:
            callback(state)

    async def load(self) -> None:
        """Verifies and loads the image, warms the model and runs the self-test."""
        started = time.monotonic()
        image = await asyncio.to_thread(verify_image, self.config.image)
        manifest = image.manifest
        log.info("image verified", extra={"image": manifest.name, "version": manifest.version,
                                          "digest": image.digest, "path": str(image.path)})
        runtime = Runtime(image, self.config)
        await asyncio.to_thread(runtime.load)
        engine = Engine(runtime, kv_slots=self.config.kv_slots,
                        policy=make_policy(self.config.queue_policy,
                                           aging=self.config.aging_seconds or None)
                        if self.config.queue_policy != "fcfs" else "fcfs",
                        kv_tokens=self.config.kv_pool_tokens or None,
                        admission=admission_config(self.config),
                        token_budget=self.config.step_token_budget,
                        prefill_chunk=self.config.prefill_chunk,
                        max_queue=self.config.max_queue,
                        max_batch_texts=self.config.max_batch_texts)
        engine.start()
        self.image, self.runtime, self.engine = image, runtime, engine
        self._converter = Converter(
            self.config, manifest.tasks, ImageInfo(manifest.name, manifest.version, image.digest),
            runtime.tokenizer, runtime.chat_template, runtime.max_context)
        if self.config.self_test != "off":
            results = await run_self_test(manifest.self_test, self._converter, engine)
            failed = [r for r in results if not r.passed]
            for r in results:
                log.info("self-test", extra={"check": r.name, "passed": r.passed,
                                             "detail": r.detail})
            if failed and self.config.self_test == "strict":
                engine.stop()
                raise SelfTestFailed(
                    f"image {manifest.name} {manifest.version} failed its self-test with "
                    f"weight_format={self.config.weight_format}, compute_dtype="
                    f"{self.config.compute_dtype}: " + "; ".join(r.detail for r in failed))
        self._set_state(State.READY)
        log.info("ready", extra={"seconds": round(time.monotonic() - started, 2)})

    async def drain(self, timeout: float) -> None:
        """Refuses new calls and waits (up to timeout) for in-flight ones to finish."""
        self._set_state(State.DRAINING)
        engine = self.engine
        if engine is None:
            return
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

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started


def admission_config(config: Config) -> AdmissionConfig:
    """The engine's admission limits from the daemon's settings."""
    unlimited = 1e15  # finite, so bucket arithmetic never meets inf - inf
    rate = config.uid_tokens_per_second or unlimited
    burst = rate * 4 if config.uid_tokens_per_second else unlimited
    return AdmissionConfig(
        class_limits={0: config.max_queue, 1: config.max_queue + config.kv_slots,
                      2: config.max_queue + config.kv_slots},
        quota=UidQuota(max_concurrent=config.uid_max_concurrent, tokens_per_second=rate,
                       burst_tokens=burst))


class SelfTestFailed(RuntimeError):
    """The image's self-test did not pass on this daemon."""
