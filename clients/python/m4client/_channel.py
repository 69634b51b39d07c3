"""Connection settings shared by every client: addresses, channel options, call metadata.

The first stage of a call from an app: where m4d listens (defaults, environment overrides,
filesystem paths turned into `unix://` targets), which options every channel gets and which
metadata every call carries.
"""

from __future__ import annotations

import os

#: Where m4d serves apps unless told otherwise.
DEFAULT_ADDRESS = "unix:///run/m4/app.sock"
#: Where m4d serves the administrator unless told otherwise.
DEFAULT_ADMIN_ADDRESS = "unix:///run/m4/admin.sock"
#: Environment variables that override the defaults.
ADDRESS_ENV = "M4_ADDRESS"
ADMIN_ADDRESS_ENV = "M4_ADMIN_ADDRESS"
#: Metadata key for the optional app name (a label only: m4d takes identity from the kernel).
APP_NAME_METADATA = "m4-app-name"
#: Largest message either way (a batch of embeddings or an image fits well inside).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Bytes of a stream the client's transport takes in before the app reads them (the HTTP/2
#: stream window it announces). m4d sees a slow reader only once this is full: gRPC's
#: default (64 KiB, grown by bandwidth probing to megabytes) holds thousands of generated
#: tokens, so a stream the app stopped reading would keep decoding. 4 KiB is about 100
#: tokens; a larger message (embeddings, an image) still arrives in one read, since gRPC
#: opens the window to the size of the message being read.
STREAM_WINDOW_BYTES = 4096

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ("grpc.http2.bdp_probe", 0),  # keeps the window at STREAM_WINDOW_BYTES
)

_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


def to_target(address: str) -> str:
    """Turn an address into a gRPC target.

    `/tmp/x.sock` → `unix:///tmp/x.sock`; a relative path (`./x.sock`, `x.sock`, `run/x`) is
    made absolute first; `unix:…` and other gRPC targets (`dns:…`, `host:port`) pass through.
    """
    address = address.strip()
    if not address:
        raise ValueError("empty address")
    if address.startswith(_SCHEMES) or "://" in address:
        return address
    looks_like_path = (
        address.startswith(("/", "./", "../", "~"))
        or address.endswith(".sock")
        or ("/" in address and ":" not in address)
    )
    if looks_like_path:
        path = os.path.abspath(os.path.expanduser(address))
        return f"unix://{path}"
    return address


def resolve_address(address: str | None, *, admin: bool = False) -> str:
    """The target to dial: `address` if given, else the environment, else the default."""
    if address is None or not address.strip():
        env = ADMIN_ADDRESS_ENV if admin else ADDRESS_ENV
        address = os.environ.get(env) or (DEFAULT_ADMIN_ADDRESS if admin else DEFAULT_ADDRESS)
    return to_target(address)


def call_metadata(app_name: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call."""
    return ((APP_NAME_METADATA, app_name),) if app_name else ()
