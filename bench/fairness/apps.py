"""Benchmark (outside the serving pipeline): apps as other uids, for bench_fairness.py.

The daemon tells apps apart by the uid the kernel reports for their connection
(SO_PEERCRED), so each app of the bench is its own process running as its own uid.
`AppProcess` spawns a child as root that imports everything it needs while still root (the
interpreter and the venv live where other uids may not read), then drops to the app's uid
(groups, gid, uid: no way back; as tests/integration/uid_client.py does), and only then
connects to the app socket. The daemon's runtime directory must let other uids reach the
socket (`Daemon(..., other_uids=True)`).

The child runs one job at a time (`fairness.jobs`) on the asyncio client: `start()` sends
the job and returns once the job says it is ready (its streams decode, say); `stop()` asks
it to finish and returns its result. Times in results are `time.monotonic()`, the same
clock in every process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread's executor, loaded as root
import os
from multiprocessing.connection import Connection
from typing import Any

import grpc.aio  # noqa: F401 - loaded as root: nothing is imported after the drop
from benchkit.child import ChildProcess
from m4client import _calls, _convert, _stream, aio, errors, types  # noqa: F401

from fairness.jobs import JOBS


def _drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError(f"could not drop to uid {uid} (still {os.getuid()})")


def app_main(address: str, uid: int, app: str, conn: Connection) -> None:
    """The child: drops to `uid`, then serves jobs from the parent until "exit"."""
    _drop_to(uid)
    asyncio.run(_serve(address, app, conn))


async def _serve(address: str, app: str, conn: Connection) -> None:
    from m4client.aio import AsyncClient

    async with AsyncClient(address, app_name=app) as client:
        conn.send(("up", os.getuid()))
        while (command := await asyncio.to_thread(conn.recv)) != "exit":
            name, kwargs = command
            job = JOBS[name](client, **kwargs)
            task = asyncio.create_task(job.run())
            ready = asyncio.create_task(job.ready.wait())
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done() and task.exception() is not None:
                conn.send(("failed", repr(task.exception())))
                continue
            conn.send(("ready", None))
            if (command := await asyncio.to_thread(conn.recv)) != "stop":
                raise ValueError(f"expected stop, got {command!r}")
            job.stop.set()
            try:
                conn.send(("result", await task))
            except Exception as exc:  # the parent reports it; the child goes on
                conn.send(("failed", repr(exc)))


class AppProcess(ChildProcess):
    """The parent's handle on one app: a child process running as `uid`."""

    def __init__(self, address: str, uid: int, app: str) -> None:
        super().__init__(f"app uid {uid}", app_main, (address, uid, app))
        self.uid, self.app = uid, app
        self._up = False

    async def up(self) -> None:
        """Waits until the child runs as its uid and has a channel."""
        if not self._up:
            got = await self.answer("up")
            if got != self.uid:
                raise RuntimeError(f"app process runs as uid {got}, not {self.uid}")
            self._up = True

    async def start(self, job: str, **kwargs: Any) -> None:
        await self.up()
        self.conn.send((job, kwargs))
        await self.answer("ready")

    async def stop(self) -> Any:
        self.conn.send("stop")
        return await self.answer("result")
