"""Caller identity, stage 1 of the request path: grpc context → who is calling.

The uid, gid and pid come only from the kernel, through the `PeerRelay` the call came in
by (`m4d.server.relay`): `context.peer()` names the relay's end of the backend connection
and the relay knows whose connection that is. The `m4-app-name` metadata is a label for
logs and status, never an identity. A call that did not come through the relay (a direct
connection to the private backend socket, which only the daemon's own uid can make, or a
call whose client has already gone) gets uid -1.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from m4d.requests import Caller
from m4d.server.sockets import Peer

APP_NAME_KEY = "m4-app-name"
APP_NAME_MAX = 64
UNKNOWN_UID = -1


class PeerLookup(Protocol):
    """Anything that maps a grpc peer string to a Peer (a PeerRelay, or a test double)."""

    def peer_of(self, peer: str) -> Peer | None: ...


def app_name(context: grpc.aio.ServicerContext) -> str:
    """The app's self-chosen label: printable characters only, at most 64 of them."""
    for key, value in context.invocation_metadata() or ():
        if key == APP_NAME_KEY and isinstance(value, str):
            return "".join(c for c in value if c.isprintable())[:APP_NAME_MAX]
    return ""


def peer_from_context(context: grpc.aio.ServicerContext,
                      relay: PeerLookup | None) -> Peer | None:
    """The kernel's view of the caller (pid, uid, gid, groups), or None when unknown."""
    if relay is None:
        return None
    return relay.peer_of(context.peer())


def caller_from_context(context: grpc.aio.ServicerContext, relay: PeerLookup | None) -> Caller:
    """The Caller for engine requests: uid and pid from the kernel, app name as a label."""
    peer = peer_from_context(context, relay)
    if peer is None:
        return Caller(uid=UNKNOWN_UID, pid=0, app=app_name(context))
    return Caller(uid=peer.uid, pid=peer.pid, app=app_name(context))


__all__ = ["APP_NAME_KEY", "UNKNOWN_UID", "PeerLookup", "app_name", "caller_from_context",
           "peer_from_context"]
