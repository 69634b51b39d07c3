"""Caller identity, stage 0 of the request path: the relay in front of each gRPC server.

grpcio tells a server nothing about who is on the other end of a Unix socket
(`context.peer()` is `"unix:"`) and cannot serve on a descriptor passed by systemd. The
`PeerRelay` owns the public socket instead (a path it binds, or a listening socket adopted
from systemd) and, for each accepted connection:

1. reads the client's credentials from the kernel (SO_PEERCRED: pid, uid, gid; SO_PEERGROUPS:
   supplementary groups), as they were when the client called connect();
2. opens a connection to the real grpc.aio server on a private socket (a 0700 directory),
   after binding its own end to a fresh unique name, so that the server's
   `context.peer()` for every call on that connection is that name
   (`unix-abstract:m4-peer-<random>-<n>` for abstract names, `unix:<path>` for paths);
3. keeps name → `Peer` in a table for as long as the backend connection is open, and pipes
   bytes both ways without parsing HTTP/2 (bounded write buffers, pause/resume reading for
   backpressure, half-close propagated with shutdown(SHUT_WR)).

`m4d.server.identity` turns `context.peer()` back into a `Peer` with `PeerRelay.peer_of`.
Nothing the client sends (metadata, HTTP/2 headers) takes part in this: a client can only
be the process the kernel says it is. Any stock gRPC stub works unchanged.

Security rests on one property: only the daemon can connect to the backend socket, so only
the relay can choose the names the server sees. Keep the backend in a directory created by
`private_dir()` (mode 0700, owned by the daemon's uid), not on an abstract address. The
socket plumbing (credentials, binding, adopting, private directories) is `m4d.server.sockets`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from m4d.server.sockets import (
    Peer,
    RelayError,
    bind_listening,
    check_listening,
    peer_name,
    private_dir,
    read_peer_credentials,
)

log = logging.getLogger(__name__)

PEER_PREFIX = "m4-peer-"
WRITE_HIGH_WATER = 256 * 1024  # bytes queued towards one side before the other side pauses
DEFAULT_MAX_CONNECTIONS = 1024


@dataclass(frozen=True)
class RelayStats:
    """The relay's counters since it started; bytes_up is client → daemon, bytes_down the
    reverse."""

    connections_total: int
    connections_open: int
    connections_refused: int
    backend_failures: int
    bytes_up: int
    bytes_down: int


class _Side(asyncio.Protocol):
    """One end of a relayed connection; forwards everything to the other end."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.full = False  # our outgoing buffer is above the high-water mark
        self.other: _Side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.link.made(self)

    def data_received(self, data: bytes) -> None:
        self.link.forward(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.link.ready:  # else connect() passes the EOF on after the buffered bytes
            self.link.write_eof(self.other)
        if self.other.eof:
            self.link.close()
        return True  # keep our writing direction open until the other side is done too

    def pause_writing(self) -> None:  # our outgoing buffer is full: stop reading the other
        self.full = True
        if self.other.transport is not None and not self.other.lost:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.full = False
        if self.other.transport is not None and not self.other.lost and self.link.ready:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.side_lost(self, exc)


class _Link:
    """A client connection, its backend connection and the peer-table entry between them."""

    def __init__(self, relay: PeerRelay, conn_id: int) -> None:
        self.relay = relay
        self.conn_id = conn_id
        self.client = _Side(self)
        self.backend = _Side(self)
        self.client.other, self.backend.other = self.backend, self.client
        self.peer: Peer | None = None
        self.key: str | None = None  # the name the server sees, while registered
        # Client bytes that arrived before the backend connection was ready. uvloop starts
        # reading after connection_made() returns, whatever it paused, so a few reads can
        # come in early; forward() pauses again at once, which bounds this to one read.
        self.pending: list[bytes] = []
        self.ready = False  # the backend is connected and `pending` is flushed
        self.task: asyncio.Task[None] | None = None

    def made(self, side: _Side) -> None:
        if side is not self.client:
            return
        transport = self.client.transport
        assert transport is not None
        transport.pause_reading()  # until the backend connection exists
        try:
            self.peer = read_peer_credentials(transport.get_extra_info("socket"), self.conn_id)
        except OSError as exc:
            log.warning("no peer credentials; closing the connection",
                        extra={"relay": self.relay.name, "conn_id": self.conn_id,
                               "error": str(exc)})
            transport.abort()
            return
        if not self.relay.admit(self):
            transport.abort()
            return
        self.task = asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        relay = self.relay
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound: Path | None = None
        try:
            sock.setblocking(False)
            bound = self.bind_unique(sock)
            await loop.sock_connect(sock, relay.backend_sockaddr)
            if bound is not None:
                bound.unlink()  # the kernel keeps the name on the socket; no file litter
                bound = None
            if self.client.lost:
                raise ConnectionAbortedError("the client left before the backend answered")
            await loop.create_unix_connection(lambda: self.backend, sock=sock)
        except (OSError, asyncio.CancelledError) as exc:
            self.unregister()
            sock.close()
            if bound is not None:
                with contextlib.suppress(OSError):
                    bound.unlink()
            if self.client.lost:
                relay.release(self)
            else:
                relay.backend_failures += 1
                log.warning("backend unreachable; closing the client connection",
                            extra={"relay": relay.name, "conn_id": self.conn_id,
                                   "error": repr(exc)})
                assert self.client.transport is not None
                self.client.transport.abort()  # its connection_lost releases the link
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        client, backend = self.client.transport, self.backend.transport
        assert client is not None and backend is not None
        if self.client.lost or self.backend.lost:  # one end left during the set-up
            if not backend.is_closing():
                backend.close()
            return
        for chunk in self.pending:
            backend.write(chunk)
        self.pending.clear()
        self.ready = True
        if self.backend.eof:  # the backend hung up before we were ready
            self.write_eof(self.client)
        if self.client.eof:
            self.write_eof(self.backend)
        elif not self.backend.full:  # else the backend's resume_writing() resumes it
            client.resume_reading()

    def write_eof(self, side: _Side) -> None:
        """shutdown(SHUT_WR) towards `side` once its queued bytes are written."""
        transport = side.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def bind_unique(self, sock: socket.socket) -> Path | None:
        """Binds sock to a fresh unguessable name and registers the peer under it."""
        assert self.peer is not None
        relay = self.relay
        for _ in range(8):
            name = f"{PEER_PREFIX}{secrets.token_hex(8)}-{self.conn_id}"
            address: str = ("\0" + name if relay.peer_names == "abstract"
                            else str(relay.peer_dir / name))
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue  # someone took the name; draw another
                raise
            self.key = name if relay.peer_names == "abstract" else address
            relay.peers[self.key] = self.peer
            return None if relay.peer_names == "abstract" else Path(address)
        raise OSError(errno.EADDRINUSE, "no free peer name after 8 tries")

    def unregister(self) -> None:
        if self.key is not None:
            self.relay.peers.pop(self.key, None)
            self.key = None

    def forward(self, side: _Side, data: bytes) -> None:
        target = side.other.transport
        if side is self.client:
            self.relay.bytes_up += len(data)
            if not self.ready:
                self.pending.append(data)
                assert side.transport is not None
                side.transport.pause_reading()
                return
        else:
            self.relay.bytes_down += len(data)
        if target is not None and not target.is_closing():
            target.write(data)

    def close(self) -> None:
        for side in (self.client, self.backend):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.backend:
            self.unregister()  # the name is free again: forget it at once
        other = side.other.transport
        if other is not None and not other.is_closing():
            if exc is None:
                other.close()  # flushes what is queued, then closes
            else:
                other.abort()
        connecting = self.task is not None and not self.task.done()
        if self.client.lost and (self.backend.lost
                                 or (self.backend.transport is None and not connecting)):
            self.relay.release(self)  # else connect() or the backend's loss releases it


class PeerRelay:
    """Serves a public Unix socket by relaying each connection to a private gRPC socket.

    listen: a path to bind (with `mode`), or a listening AF_UNIX socket (from systemd).
    backend: the path of the grpc.aio server's socket (keep it in a `private_dir()`), or
    `"@name"` for an abstract socket (any local process can reach that one; tests only).
    peer_names: bind the relay's outgoing ends to abstract names (default) or to paths in
    `peer_dir` (which must be private; each path is removed right after connect()).
    """

    def __init__(self, listen: Path | socket.socket, backend: Path | str, *, mode: int = 0o666,
                 peer_names: Literal["abstract", "path"] = "abstract",
                 peer_dir: Path | None = None, backlog: int = 128,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, name: str = "relay") -> None:
        if peer_names not in ("abstract", "path"):
            raise ValueError(f"peer_names must be 'abstract' or 'path' (got {peer_names!r})")
        if isinstance(backend, str) and backend.startswith("@"):
            self.backend_sockaddr = "\0" + backend[1:]
            self.backend_target = f"unix-abstract:{backend[1:]}"
        else:
            self.backend_sockaddr = str(backend)
            self.backend_target = f"unix://{Path(backend).absolute()}"
        if peer_names == "path" and peer_dir is None:
            if isinstance(backend, str) and backend.startswith("@"):
                raise ValueError("peer_names='path' needs peer_dir with an abstract backend")
            peer_dir = Path(backend).parent
        self.listen = listen
        self.mode = mode
        self.peer_names = peer_names
        self.peer_dir = peer_dir or Path()
        self.backlog = backlog
        self.max_connections = max_connections
        self.name = name
        self.peers: dict[str, Peer] = {}
        self.connections_total = 0
        self.connections_refused = 0
        self.backend_failures = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._links: set[_Link] = set()
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._bound_path: Path | None = None
        self._idle: asyncio.Event | None = None

    @property
    def address(self) -> str:
        """The public socket's address (a path, or `@name` for an abstract socket)."""
        sock = self.listen if isinstance(self.listen, socket.socket) else None
        if sock is None:
            return str(self.listen)
        try:
            name = sock.getsockname()
        except OSError:
            return "<closed>"
        if isinstance(name, bytes):
            return "@" + name[1:].decode(errors="replace")
        return str(name)

    async def start(self) -> None:
        """Starts accepting; the grpc.aio server on the backend should already be serving."""
        if self._server is not None:
            raise RelayError(f"{self.name} is already started")
        if isinstance(self.listen, socket.socket):
            sock = self.listen
            check_listening(sock)
        else:
            sock = bind_listening(self.listen, self.mode, self.backlog)
            self._bound_path = self.listen
        self._idle = asyncio.Event()
        self._idle.set()
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._accept, sock=sock, backlog=self.backlog)
        log.debug("relay listening", extra={"relay": self.name, "address": self.address,
                                            "backend": self.backend_target})

    def _accept(self) -> _Side:
        return _Link(self, next(self._ids)).client

    def admit(self, link: _Link) -> bool:
        if len(self._links) >= self.max_connections:
            self.connections_refused += 1
            log.warning("too many connections; refusing one",
                        extra={"relay": self.name, "max_connections": self.max_connections})
            return False
        self._links.add(link)
        self.connections_total += 1
        if self._idle is not None:
            self._idle.clear()
        peer = link.peer
        log.debug("connection open", extra={
            "relay": self.name, "conn_id": link.conn_id,
            "pid": peer.pid if peer else None, "uid": peer.uid if peer else None})
        return True

    def release(self, link: _Link) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        link.unregister()
        log.debug("connection closed", extra={"relay": self.name, "conn_id": link.conn_id})
        if not self._links and self._idle is not None:
            self._idle.set()

    def peer_of(self, peer: str) -> Peer | None:
        """The client behind a grpc `context.peer()` string; None when it did not come
        through this relay (or its connection is already gone)."""
        name = peer_name(peer)
        return None if name is None else self.peers.get(name)

    def stats(self) -> RelayStats:
        return RelayStats(connections_total=self.connections_total,
                          connections_open=len(self._links),
                          connections_refused=self.connections_refused,
                          backend_failures=self.backend_failures,
                          bytes_up=self.bytes_up, bytes_down=self.bytes_down)

    async def wait_idle(self) -> None:
        """Returns once no connection is open (at once when none is)."""
        if self._idle is not None:
            await self._idle.wait()

    async def stop(self, grace: float = 0.0) -> None:
        """Stops accepting, lets open connections end for up to `grace` seconds (the gRPC
        server closes them when it stops), then cuts the rest. Removes only a socket path
        this relay bound; a systemd socket stays with systemd."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._bound_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._bound_path.unlink()
            self._bound_path = None
        assert self._idle is not None
        if grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for link in list(self._links):
            for side in (link.client, link.backend):
                if side.transport is not None:
                    side.transport.abort()
            if link.task is not None:
                link.task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 1.0)
        for link in list(self._links):  # a link whose transports never reported back
            self.release(link)
        await server.wait_closed()
        log.debug("relay stopped", extra={"relay": self.name})


# Peer, RelayError, peer_name and private_dir: re-exported for the relay's callers
__all__ = ["Peer", "PeerRelay", "RelayError", "RelayStats", "peer_name", "private_dir"]
