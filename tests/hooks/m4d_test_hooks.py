"""Test hooks for m4d processes the tests start, installed from outside the daemon's code.

Production modules hold no test switches; the tests that need a daemon to misbehave on cue
put this directory on the daemon's PYTHONPATH (`hooks_env()`), so that `sitecustomize`
calls `install_from_environment()` at interpreter start. It wraps the production objects
when they are first imported, driven by the environment of the daemon:

- `M4D_TEST_HOOKS=1`: once the daemon loads, SIGUSR1 freezes the executor thread and
  SIGUSR2 thaws it, so the watchdog can be shown to stop pinging for a stuck worker.
- `M4D_TEST_STORE_CRASH_AFTER_READY=K`: once the daemon has booted (ready to serve), the
  image store SIGKILLs the process at its K-th durable step from then on
  (`m4image.durable.crashpoint`), so fault injection hits admin operations, never the boot;
  after each install, activation (now) and rollback the daemon logs the durable steps taken
  since it became ready ("test hook: durable store steps since ready").

`kill_at_durable_step(n)` is the store's crash point for any test process (the store's own
fault-injection child uses it too). The systemd boot test loads this module from a .pth file
in the installed venv instead (its daemon runs `python -I`, which ignores PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

HOOKS_DIR = Path(__file__).resolve().parent
FREEZE_ENV = "M4D_TEST_HOOKS"
STORE_CRASH_ENV = "M4D_TEST_STORE_CRASH_AFTER_READY"

log = logging.getLogger("m4d.test_hooks")


def hooks_env(**env: str) -> dict[str, str]:
    """Environment additions for a daemon started with the hooks: PYTHONPATH plus `env`."""
    path = os.pathsep.join(p for p in (str(HOOKS_DIR), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **env}


def install_from_environment() -> None:
    """Installs the hooks the environment asks for (none: nothing changes)."""
    if os.environ.get(FREEZE_ENV) == "1":
        after_import("m4d.service.daemon", _freeze_on_signals)
    steps = os.environ.get(STORE_CRASH_ENV)
    if steps:
        after_import("m4d.service.images", lambda module: _crash_store_after_ready(module,
                                                                                  int(steps)))


# ---- patching a module when it is first imported --------------------------------------


class _AfterImport(MetaPathFinder):
    """Runs `patch(module)` right after the module named `name` has been executed."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the finder that would have found it
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        patch = self.patch

        def exec_module(module: ModuleType) -> None:
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Patches module `name` once it is imported (at once when it already is)."""
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, patch))


# ---- M4D_TEST_HOOKS: freeze the executor on SIGUSR1 ------------------------------------


def _freeze_on_signals(module: ModuleType) -> None:
    load = module.Daemon.load

    async def load_with_freeze_signals(daemon: Any, *args: Any, **kwargs: Any) -> None:
        loop = asyncio.get_running_loop()

        thawed = threading.Event()

        def freeze(on: bool) -> None:
            engine = daemon.engine
            if engine is None:
                return
            if on:  # the worker leaves its idle wait and blocks before its next step
                thawed.clear()
                engine._has_work = lambda: True
                admit = type(engine)._admit

                def stuck_admit(inbox: Any) -> None:
                    thawed.wait()
                    del engine._has_work, engine._admit
                    admit(engine, inbox)

                engine._admit = stuck_admit
            else:
                thawed.set()
            log.warning("test hook: executor %s", "frozen" if on else "thawed")

        loop.add_signal_handler(signal.SIGUSR1, freeze, True)
        loop.add_signal_handler(signal.SIGUSR2, freeze, False)
        await load(daemon, *args, **kwargs)

    module.Daemon.load = load_with_freeze_signals


# ---- crash points of the image store ---------------------------------------------------


def kill_at_durable_step(n: int) -> None:
    """From now on the store SIGKILLs this process at its n-th durable step, counted from
    the process's start (`m4image.durable.crashpoints_passed`)."""
    from m4image import durable

    for name in ("m4image.install", "m4image.store"):  # they call crashpoint() by name
        importlib.import_module(name)

    original = getattr(durable.crashpoint, "__wrapped__", durable.crashpoint)

    def crashpoint() -> None:
        original()
        if durable.crashpoints_passed() >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    crashpoint.__wrapped__ = original  # type: ignore[attr-defined]
    for module in list(sys.modules.values()):
        if getattr(module, "crashpoint", None) in (original, durable.crashpoint):
            module.crashpoint = crashpoint  # type: ignore[attr-defined]


def killed_at_durable_step(n: int, run: Callable[[], None]) -> int:
    """`run` in a forked child that the store SIGKILLs at its n-th durable step (counted as
    `kill_at_durable_step` counts); returns the child's exit code (-9 when killed, 1 when
    `run` raised, its traceback on stderr, 0 when it ran to the end first)."""
    import traceback

    pid = os.fork()
    if pid == 0:  # the process that gets killed
        kill_at_durable_step(n)
        try:
            run()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _crash_store_after_ready(module: ModuleType, steps: int) -> None:
    from m4image.durable import crashpoints_passed

    manager = module.ImageManager
    ready_steps = 0

    def note(operation: str) -> None:
        log.info("test hook: durable store steps since ready",
                 extra={"operation": operation, "steps": crashpoints_passed() - ready_steps})

    boot = manager.boot

    async def boot_then_arm(self: Any) -> Any:
        nonlocal ready_steps
        serving = await boot(self)
        ready_steps = crashpoints_passed()
        kill_at_durable_step(ready_steps + steps)
        log.warning("test hook: the store kills m4d at its durable step %s from now", steps)
        return serving

    install = manager.install

    async def install_then_note(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with contextlib.aclosing(install(self, *args, **kwargs)) as updates:
            async for update in updates:
                if not isinstance(update, module.InstallProgress):  # the installed image, last
                    note("install")
                yield update

    activate = manager.activate

    async def activate_then_note(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = await activate(self, *args, **kwargs)
        if kwargs.get("now"):  # a hot swap; without it only the store's records change
            note("activate")
        return entry

    rollback = manager.rollback

    async def rollback_then_note(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = await rollback(self, *args, **kwargs)
        note("rollback")
        return result

    manager.boot = boot_then_arm
    manager.install = install_then_note
    manager.activate = activate_then_note
    manager.rollback = rollback_then_note
