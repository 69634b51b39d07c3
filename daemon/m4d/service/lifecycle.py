"""The process life cycle's parts that know the daemon and systemd but no transport.

`m4d.__main__` puts them together with the gRPC servers: startup → serve → graceful
shutdown. Here: sd_notify that never stops the daemon, the watchdog that pings systemd only
while the executor makes progress, and the stop signals (the first SIGTERM or SIGINT
drains, a second one exits at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from m4d.service import systemd
from m4d.service.daemon import Daemon

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def notify(send: Callable[[], bool]) -> None:
    """sd_notify that never stops the daemon: a failure is logged."""
    try:
        send()
    except systemd.SystemdError as exc:
        log.warning("cannot notify systemd: %s", exc)


async def watchdog(daemon: Daemon) -> None:
    """WATCHDOG=1 at half systemd's interval, but only while the executor makes progress:
    a frozen worker thread stops the pings and systemd restarts the daemon."""
    interval = systemd.watchdog_ping_interval()
    if interval is None:
        return
    stale_after = max(2 * interval, 3.0)  # an idle executor reports progress every second
    while True:
        await asyncio.sleep(interval)
        _watchdog_check(daemon, stale_after)  # no engine kept across the sleep (a swap)


def _watchdog_check(daemon: Daemon, stale_after: float) -> None:
    engine = daemon.engine
    if engine is None:
        if daemon.swapping:  # a drain-mode swap: no engine for a few seconds, on purpose
            notify(systemd.watchdog_ping)
        return
    stalled = time.monotonic() - engine.stats.last_progress
    if stalled < stale_after:
        notify(systemd.watchdog_ping)
    else:
        log.error("executor made no progress: withholding the watchdog ping",
                  extra={"stalled_seconds": round(stalled, 1)})


class StopSignals:
    """SIGTERM and SIGINT on the running loop: the first sets `stop`, a second exits at once."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._received = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def restore(self) -> None:
        """Gives the signals their default handlers back."""
        if self._loop is not None:
            for sig in STOP_SIGNALS:
                self._loop.remove_signal_handler(sig)

    def _on_signal(self, signum: int) -> None:
        self._received += 1
        if self._received == 1:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            self.stop.set()
        else:
            log.warning("second signal: exiting now")
            os._exit(1)
