"""systemd integration for the daemon's life cycle (startup → serve → shutdown), no libsystemd.

* `listen_fds()`: the listening sockets systemd passed (socket activation), by the names
  the socket units give them with FileDescriptorName= ("app", "admin"). The same protocol
  as sd_listen_fds_with_names(unset_environment=1): LISTEN_PID must be this process,
  LISTEN_FDS descriptors start at 3, LISTEN_FDNAMES holds ':'-separated names; the
  variables are removed once read so children do not inherit them.
* `notify()`: sd_notify, a datagram to $NOTIFY_SOCKET (a path, or '@' for an abstract
  socket): READY=1, STATUS=..., STOPPING=1, WATCHDOG=1, MAINPID=...
* `watchdog_interval()`: WatchdogSec= as systemd passes it (WATCHDOG_USEC, WATCHDOG_PID);
  ping with notify("WATCHDOG=1") every `watchdog_ping_interval()` (half of it).

Outside systemd every function is a no-op: no sockets, notify() returns False, no watchdog.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import MutableMapping

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SystemdError(RuntimeError):
    """systemd passed something this process cannot use, or could not be notified."""


def _parse_int(name: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise SystemdError(f"${name} is not a number ({value!r})") from None
    if number < 0:
        raise SystemdError(f"${name} is negative ({value!r})")
    return number


def listen_fds_with_names(environ: MutableMapping[str, str] | None = None,
                          unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """(name, socket) for each descriptor systemd passed, in order; [] when none are ours.

    Names default to "unknown" (as in systemd) when LISTEN_FDNAMES is missing. Each
    descriptor gets close-on-exec. A descriptor that is not a socket is an error.
    """
    env = os.environ if environ is None else environ
    try:
        raw_pid = env.get("LISTEN_PID")
        if raw_pid is None:
            return []
        if _parse_int("LISTEN_PID", raw_pid) != os.getpid():
            return []  # meant for another process (e.g. our parent)
        count = _parse_int("LISTEN_FDS", env.get("LISTEN_FDS", "0"))
        raw_names = env.get("LISTEN_FDNAMES")
        names = raw_names.split(":") if raw_names is not None else ["unknown"] * count
        if len(names) != count:
            raise SystemdError(f"LISTEN_FDNAMES has {len(names)} names for {count} "
                               f"descriptors ({raw_names!r})")
        out: list[tuple[str, socket.socket]] = []
        for fd, name in zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count), names,
                            strict=True):
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
                out.append((name, socket.socket(fileno=fd)))
            except OSError as exc:
                raise SystemdError(f"descriptor {fd} ({name!r}) from systemd is not a usable "
                                   f"socket: {exc.strerror}; check the .socket unit") from None
        return out
    finally:
        if unset_environment:
            for var in _LISTEN_VARS:
                env.pop(var, None)


def listen_fds(environ: MutableMapping[str, str] | None = None,
               unset_environment: bool = True) -> dict[str, socket.socket]:
    """name → listening socket passed by systemd; {} outside socket activation.

    Names must be unique: give each socket unit its own FileDescriptorName=.
    """
    pairs = listen_fds_with_names(environ, unset_environment)
    out: dict[str, socket.socket] = {}
    for name, sock in pairs:
        if name in out:
            raise SystemdError(f"systemd passed two descriptors named {name!r}; give each "
                               "socket unit a distinct FileDescriptorName=")
        out[name] = sock
    return out


def _notify_address(value: str) -> str:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise SystemdError(f"$NOTIFY_SOCKET {value!r} is not a Unix socket path or @abstract name")


def notify(*lines: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Sends `KEY=value` lines to systemd; False when not run by systemd (no $NOTIFY_SOCKET).

    Raises SystemdError when a line is malformed or the datagram cannot be sent.
    """
    env = os.environ if environ is None else environ
    value = env.get("NOTIFY_SOCKET")
    if not value:
        return False
    for line in lines:
        if "\n" in line or "=" not in line:
            raise SystemdError(f"notify lines are KEY=value without newlines (got {line!r})")
    address = _notify_address(value)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError as exc:
            raise SystemdError(f"cannot notify systemd at {value}: {exc.strerror}") from None
    return True


def ready(status: str | None = None) -> bool:
    """READY=1 (and MAINPID, so Type=notify works behind a wrapper script too)."""
    lines = ["READY=1", f"MAINPID={os.getpid()}"]
    if status:
        lines.append(f"STATUS={status}")
    return notify(*lines)


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """WatchdogSec= in seconds, or None when the watchdog is off or meant for another pid.

    This is the limit, not the ping period: ping every `watchdog_ping_interval()`.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    usec = _parse_int("WATCHDOG_USEC", raw_usec)
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid is not None and _parse_int("WATCHDOG_PID", raw_pid) != os.getpid():
        return None
    return usec / 1e6 if usec > 0 else None


def watchdog_ping_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """How often to send WATCHDOG=1: half of WatchdogSec= (as systemd recommends)."""
    interval = watchdog_interval(environ)
    return None if interval is None else interval / 2


__all__ = ["SD_LISTEN_FDS_START", "SystemdError", "listen_fds", "listen_fds_with_names",
           "notify", "ready", "status", "stopping", "watchdog_interval",
           "watchdog_ping", "watchdog_ping_interval"]
