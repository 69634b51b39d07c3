"""`m4ctl keys generate|list|add|revoke`: signing keys and the keyring of trusted image keys.

Local files only: a key pair for the vendor who signs images, and the device's keyring
directory (default /etc/m4/keys, env M4_KEYS_DIR) that `image verify` and the daemon check
signatures against. The work is `m4image`'s (the daemon's distribution), imported when a
command runs; without it the command says what to install.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _output as out
from ._parser import command, verbs
from ._tools import daemon_side, tool_errors

KEYS_ENV = "M4_KEYS_DIR"
DEFAULT_KEYS = "/etc/m4/keys"
KEYS_HELP = f"keyring directory (env {KEYS_ENV}, default {DEFAULT_KEYS})"


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Adds `keys` and its verbs to m4ctl's subcommands."""
    keys = verbs(command(sub, "keys", "Manage signing keys and the keyring of trusted image "
                         "keys.", parents), "keys")
    p = command(keys, "generate", "Generate an ed25519 key pair: PATH.key (0600) and PATH.pub.",
                parents, cmd_keys_generate)
    p.add_argument("--output", "-o", required=True, metavar="PATH",
                   help="PATH.key and PATH.pub are written")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p = command(keys, "list", "List the keyring's keys, trusted and revoked.", parents,
                cmd_keys_list)
    p.add_argument("--keys", metavar="DIR", default=None, help=KEYS_HELP)
    p = command(keys, "add", "Trust a public key (writes KEYID.pub into the keyring).", parents,
                cmd_keys_add)
    p.add_argument("file", metavar="FILE", help="public key file (PEM or 32 raw bytes)")
    p.add_argument("--keys", metavar="DIR", default=None, help=KEYS_HELP)
    p = command(keys, "revoke", "Revoke a key id: images it signed are refused from now on.",
                parents, cmd_keys_revoke)
    p.add_argument("key_id", metavar="KEYID", help="16 hex digits, as `m4ctl keys list` shows")
    p.add_argument("--reason", default="", metavar="TEXT", help="recorded with the revocation")
    p.add_argument("--keys", metavar="DIR", default=None, help=KEYS_HELP)


def image_error(command: str) -> type[Exception]:
    """The image tooling's base error (every failure of m4image derives from it)."""
    error: type[Exception] = daemon_side("m4image.verify", command).ImageError
    return error


def keyring(args: argparse.Namespace, command: str) -> Any:
    """The keyring --keys (else M4_KEYS_DIR, else /etc/m4/keys) names."""
    keys = daemon_side("m4image.keys", command)
    return keys.Keyring(args.keys or os.environ.get(KEYS_ENV) or DEFAULT_KEYS)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    sign = daemon_side("m4image.sign", "keys generate")
    with tool_errors(image_error("keys generate")):
        kp = sign.generate_keypair(Path(args.output), force=args.force)
    info = {"key_id": kp.key_id, "private_key": str(kp.private_key),
            "public_key": str(kp.public_key)}
    out.result(args, info, kp.key_id, [
        f"key id: {kp.key_id}",
        f"private key: {kp.private_key} (keep it secret; sign with it)",
        f"public key: {kp.public_key} (install on devices: m4ctl keys add {kp.public_key})"])
    return 0


def _status(key: Any) -> str:
    return "revoked" if key.revoked else "trusted"


def cmd_keys_list(args: argparse.Namespace) -> int:
    with tool_errors(image_error("keys list")):
        ring = keyring(args, "keys list")
        keys = ring.list()
    if args.json:
        for k in keys:
            out.write(json.dumps({"key_id": k.key_id, "status": _status(k),
                                  "path": str(k.path) if k.path else None}) + "\n")
        return 0
    if args.quiet:
        out.write("".join(k.key_id + "\n" for k in keys if not k.revoked))
        return 0
    if not keys:
        out.err(f"no keys in {ring.directory}; add one with `m4ctl keys add FILE`")
        return 0
    rows = [("KEY ID", "STATUS", "FILE")]
    rows += [(k.key_id, _status(k), str(k.path or "-")) for k in keys]
    out.write("".join(line + "\n" for line in out.table(rows)))
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    with tool_errors(image_error("keys add")):
        key = keyring(args, "keys add").add(Path(args.file))
    info = {"key_id": key.key_id, "status": "trusted", "path": str(key.path)}
    out.result(args, info, key.key_id, [f"trusted key {key.key_id} ({key.path})"])
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with tool_errors(image_error("keys revoke")):
        key = keyring(args, "keys revoke").revoke(args.key_id, reason=args.reason)
    info = {"key_id": key.key_id, "status": "revoked",
            "path": str(key.path) if key.path else None}
    out.result(args, info, key.key_id,
               [f"revoked key {key.key_id}: images it signed are refused from now on"])
    return 0
