"""Caller identity, the kernel's part: the Unix sockets the relay serves on and whose they are.

`Peer` is a client process as SO_PEERCRED (and SO_PEERGROUPS) reported it at connect() time.
Listening sockets are bound fresh (a stale socket left by a dead daemon is removed, a live
one refused) or adopted from systemd (checked to be listening AF_UNIX stream sockets);
backend sockets live in a `private_dir()` that only the daemon's uid can enter. `peer_name`
reads the socket name back out of a grpc peer string. Used by `m4d.server.relay` and, for
the private backend sockets, by `m4d.server.app`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in Python 3.11


class RelayError(RuntimeError):
    """The relay cannot start: bad listening socket, socket in use, unsafe private dir."""


@dataclass(frozen=True)
class Peer:
    """A client process as the kernel saw it at connect() time."""

    pid: int
    uid: int
    gid: int
    conn_id: int
    # Supplementary groups (SO_PEERGROUPS); None where the kernel cannot say.
    groups: tuple[int, ...] | None = None

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or (self.groups is not None and gid in self.groups)


def private_dir(path: Path) -> Path:
    """Creates (or checks) a directory only this uid can enter, for backend sockets.

    Refuses a directory owned by another uid or reachable through a symlink: whoever can
    connect to the backend could choose the peer names the server sees.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RelayError(f"{path} is not a directory; remove it so m4d can create it")
    if st.st_uid != os.geteuid():
        raise RelayError(f"{path} is owned by uid {st.st_uid}, not {os.geteuid()}; remove it "
                         "so m4d can create its own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def read_peer_credentials(sock: socket.socket, conn_id: int) -> Peer:
    """SO_PEERCRED (and SO_PEERGROUPS where available) of a connected AF_UNIX socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    groups: tuple[int, ...] | None = None
    for size in (64, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break  # ENOPROTOOPT: an old kernel; groups stay unknown
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
        break
    return Peer(pid=pid, uid=uid, gid=gid, conn_id=conn_id, groups=groups)


def clear_socket_path(path: Path) -> None:
    """Makes way for a new socket at path: creates its directory and removes a stale socket
    (its daemon is gone); refuses a live socket or any other file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise RelayError(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink()  # stale: its daemon is gone
    else:
        raise RelayError(f"{path} is in use by a running daemon; stop it or choose another path")
    finally:
        probe.close()


def bind_listening(path: Path, mode: int, backlog: int) -> socket.socket:
    """Binds a fresh listening socket at path; removes a stale socket, refuses a live one."""
    clear_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def check_listening(sock: socket.socket) -> None:
    """An adopted socket (from systemd) must be a listening AF_UNIX stream socket."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise RelayError(f"the relay needs an AF_UNIX SOCK_STREAM socket (got {sock.family!r}, "
                         f"{sock.type!r}); check ListenStream= in the .socket unit")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise RelayError("the adopted socket is not listening; use Accept=no in the .socket "
                         "unit")


def peer_name(peer: str) -> str | None:
    """The socket name in a grpc peer string: `unix-abstract:NAME` or `unix:PATH`."""
    if peer.startswith("unix-abstract:"):
        return peer[len("unix-abstract:"):]
    if peer.startswith("unix:"):
        name = peer[len("unix:"):]
        return name[2:] if name.startswith("///") else name
    return None


__all__ = ["Peer", "RelayError", "bind_listening", "check_listening", "clear_socket_path",
           "peer_name", "private_dir", "read_peer_credentials"]
