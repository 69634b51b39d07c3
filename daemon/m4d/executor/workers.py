"""One executor per device: a thread that runs a device's torch work, one job at a time.

The engine's step loop is the executor of the backbone's device (it owns the scheduler and
runs generation itself). Every other device in use (config `placement`: say, the text
encoder on cuda:0 while the backbone runs on the cpu) gets a `DeviceExecutor`; the engine
hands it whole jobs and the job posts its results back to the engine. Torch never runs on
the event loop.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Job = Callable[[], None]


class DeviceExecutor:
    """A worker thread named `m4-executor-<device>` running submitted jobs in order."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.jobs_run = 0
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def thread_name(self) -> str:
        return f"m4-executor-{self.device}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues a job; it must catch its own errors and post its own results."""
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"the {self.device} executor has stopped")
            self._jobs.append(job)
            self._cond.notify()

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def stop(self, timeout: float = 30) -> None:
        """Runs the jobs already queued, then ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        log.info("executor started", extra={"device": self.device})
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception:  # a job reports its own failures; this is a bug's last stop
                log.exception("executor job failed", extra={"device": self.device})
            self.jobs_run += 1


def executors_for(runtime: Any) -> dict[str, DeviceExecutor]:
    """An executor for each device the runtime's components are placed on (its
    `placement`), except the step loop's own: the backbone's device, `runtime.device`."""
    placement = getattr(runtime, "placement", None)
    devices = placement.devices_in_use() if placement is not None else []
    loop_device = str(runtime.device)
    return {d: DeviceExecutor(d) for d in devices if d != loop_device}


__all__ = ["DeviceExecutor", "executors_for"]
