"""m4ctl's local image-trust commands: `image sign|verify` and `keys generate|list|add|revoke`.

These work on files only (no daemon): sign an image directory with a private key, verify it
against a keyring, and manage the keyring directory (default /etc/m4/keys, env M4_KEYS_DIR).
The remote verbs (`image install|list|activate|rollback|mark-good`) arrive with the daemon's
admin RPCs.

Hooked into m4ctl by `register(subparsers, parents=[common])`, which adds the `keys` noun,
adds `sign` to the existing `image` noun and gives its `verify` the signature options; each
parser carries its function as `handler`. `m4image` is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _output as out
from ._admin import ImageToolError

KEYS_ENV = "M4_KEYS_DIR"
DEFAULT_KEYS = "/etc/m4/keys"


def _keys_help() -> str:
    return f"keyring directory (env {KEYS_ENV}, default {DEFAULT_KEYS})"


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    """The subcommand action of a parser, or None."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add `keys ...`, `image sign` and the signature options of `image verify`.

    `subparsers` is m4ctl's top-level subcommand action; `parents` the parser of global flags
    every command accepts. Works whether or not an `image` noun already exists.
    """

    def add(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help, parents=list(parents))
        return p

    image = subparsers.choices.get("image") or add(subparsers, "image", "Build, sign and verify firmware images.")
    image_sub = _subparsers(image) or image.add_subparsers(dest="image_command", metavar="VERB", required=True)

    p = add(image_sub, "sign", "Sign a firmware image: write DIR/manifest.sig (ed25519 over manifest.json).")
    p.add_argument("dir", metavar="DIR", help="the image directory")
    p.add_argument("--key", required=True, metavar="KEY", help="private key file (NAME.key from `m4ctl keys generate`)")
    p.set_defaults(handler=cmd_image_sign)

    p = image_sub.choices.get("verify") or add(image_sub, "verify", "Verify a firmware image directory (signature, then every file).")
    if not any(a.dest == "dir" for a in p._actions):
        p.add_argument("dir", metavar="DIR")
    g = p.add_argument_group("signature")
    g.add_argument("--keys", metavar="DIR", default=None, help=_keys_help())
    g.add_argument("--unsigned", action="store_true",
                   help="development image: check the files' hashes only, not the signature")
    g.add_argument("--compatible", metavar="STR", default=None,
                   help="also require the manifest's compatible string to be STR")
    g.add_argument("--daemon-version", metavar="VER", default=None,
                   help="also require min_daemon_version <= VER")
    p.set_defaults(handler=cmd_image_verify)

    keys = add(subparsers, "keys", "Manage signing keys and the keyring of trusted image keys.")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="VERB", required=True)
    p = add(keys_sub, "generate", "Generate an ed25519 key pair: PATH.key (0600) and PATH.pub.")
    p.add_argument("--output", "-o", required=True, metavar="PATH", help="PATH.key and PATH.pub are written")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(handler=cmd_keys_generate)
    p = add(keys_sub, "list", "List the keyring's keys, trusted and revoked.")
    p.add_argument("--keys", metavar="DIR", default=None, help=_keys_help())
    p.set_defaults(handler=cmd_keys_list)
    p = add(keys_sub, "add", "Trust a public key (writes KEYID.pub into the keyring).")
    p.add_argument("file", metavar="FILE", help="public key file (PEM or 32 raw bytes)")
    p.add_argument("--keys", metavar="DIR", default=None, help=_keys_help())
    p.set_defaults(handler=cmd_keys_add)
    p = add(keys_sub, "revoke", "Revoke a key id: images it signed are refused from now on.")
    p.add_argument("key_id", metavar="KEYID", help="16 hex digits, as `m4ctl keys list` shows")
    p.add_argument("--reason", default="", metavar="TEXT", help="recorded with the revocation")
    p.add_argument("--keys", metavar="DIR", default=None, help=_keys_help())
    p.set_defaults(handler=cmd_keys_revoke)


# ---- commands --------------------------------------------------------------------------------


def _image_error() -> type[Exception]:
    try:
        from m4image.manifest import ImageError
    except ImportError as exc:
        raise ImageToolError(f"image tooling is not available: {exc}") from None
    return ImageError


def _keyring(args: argparse.Namespace) -> Any:
    from m4image.keys import Keyring

    return Keyring(args.keys or os.environ.get(KEYS_ENV) or DEFAULT_KEYS)


def _emit(args: argparse.Namespace, info: dict[str, Any], quiet: str, lines: list[str]) -> None:
    if args.json:
        out.write(json.dumps(info) + "\n")
    elif args.quiet:
        out.write(quiet + "\n")
    else:
        out.write("".join(line + "\n" for line in lines))


def cmd_image_sign(args: argparse.Namespace) -> int:
    error = _image_error()
    from m4image.sign import sign_image
    from m4image.verify import verify_image

    try:
        signed = sign_image(Path(args.dir), Path(args.key))
        image = verify_image(signed.path)
    except error as exc:
        raise ImageToolError(str(exc)) from None
    m = image.manifest
    info = {"path": str(signed.path), "name": m.name, "version": m.version,
            "digest": signed.digest, "key_id": signed.key_id}  # fmt: skip
    _emit(args, info, signed.key_id,
          [f"signed {m.name} {m.version} at {signed.path} with key {signed.key_id}",
           f"digest: {signed.digest}"])  # fmt: skip
    return 0


def cmd_image_verify(args: argparse.Namespace) -> int:
    _image_error()
    from m4image import verify

    error = verify.ImageError
    progress = out.Progress(args.quiet)
    try:
        keyring = None if args.unsigned else _keyring(args)
        image = verify.verify_image(Path(args.dir), keyring=keyring, expected_compatible=args.compatible,
                                    daemon_version=args.daemon_version, progress=progress)  # fmt: skip
    except error as exc:
        raise ImageToolError(str(exc)) from None
    finally:
        progress.finish()
    m = image.manifest
    signed = image.signed_by or "not checked (--unsigned)"
    info = {"path": str(image.path), "name": m.name, "version": m.version,
            "digest": image.digest, "signed_by": image.signed_by}  # fmt: skip
    _emit(args, info, image.digest,
          [f"verified {m.name} {m.version} at {image.path}", f"digest: {image.digest}",
           f"signed by: {signed}"])  # fmt: skip
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    error = _image_error()
    from m4image.sign import generate_keypair

    try:
        kp = generate_keypair(Path(args.output), force=args.force)
    except error as exc:
        raise ImageToolError(str(exc)) from None
    info = {"key_id": kp.key_id, "private_key": str(kp.private_key), "public_key": str(kp.public_key)}
    _emit(args, info, kp.key_id,
          [f"key id: {kp.key_id}", f"private key: {kp.private_key} (keep it secret; sign with it)",
           f"public key: {kp.public_key} (install on devices: m4ctl keys add {kp.public_key})"])  # fmt: skip
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    error = _image_error()
    try:
        keyring = _keyring(args)
        keys = keyring.list()
    except error as exc:
        raise ImageToolError(str(exc)) from None
    if args.json:
        for k in keys:
            out.write(json.dumps({"key_id": k.key_id, "status": "revoked" if k.revoked else "trusted",
                                  "path": str(k.path) if k.path else None}) + "\n")  # fmt: skip
        return 0
    if args.quiet:
        out.write("".join(k.key_id + "\n" for k in keys if not k.revoked))
        return 0
    if not keys:
        out.err(f"no keys in {keyring.directory}; add one with `m4ctl keys add FILE`")
        return 0
    rows = [("KEY ID", "STATUS", "FILE")]
    rows += [(k.key_id, "revoked" if k.revoked else "trusted", str(k.path or "-")) for k in keys]
    out.write("".join(line + "\n" for line in out.table(rows)))
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    error = _image_error()
    try:
        key = _keyring(args).add(Path(args.file))
    except error as exc:
        raise ImageToolError(str(exc)) from None
    info = {"key_id": key.key_id, "status": "trusted", "path": str(key.path)}
    _emit(args, info, key.key_id, [f"trusted key {key.key_id} ({key.path})"])
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    error = _image_error()
    try:
        keyring = _keyring(args)
        key = keyring.revoke(args.key_id, reason=args.reason)
    except error as exc:
        raise ImageToolError(str(exc)) from None
    info = {"key_id": key.key_id, "status": "revoked", "path": str(key.path) if key.path else None}
    _emit(args, info, key.key_id,
          [f"revoked key {key.key_id}: images it signed are refused from now on"])
    return 0
