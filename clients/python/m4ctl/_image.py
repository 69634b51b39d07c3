"""m4ctl's image commands: local trust (`image sign|verify`, `keys generate|list|add|revoke`)
and the daemon's image store (`image install|list|activate|rollback|mark-good|remove`).

The local verbs work on files only: sign an image directory with a private key, verify it
against a keyring, and manage the keyring directory (default /etc/m4/keys, env M4_KEYS_DIR).
The store verbs call the Admin service over the admin socket (`--admin-address`, env
M4_ADMIN_ADDRESS): an install streams the image directory as a tar
(`m4image.tarstream.iter_image_tar`), progress on stderr; the daemon verifies everything.

Hooked into m4ctl by `register(subparsers, parents=[common])`, which adds the `keys` noun,
adds `sign` to the existing `image` noun and gives its `verify` the signature options; each
parser carries its function as `handler`. `m4image` is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
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

    _register_store_verbs(image_sub, add)

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


# ---- the daemon's image store (admin socket) ------------------------------------------------


def _register_store_verbs(image_sub: Any, add: Any) -> None:
    p = add(image_sub, "install", "Install a firmware image on the daemon (streamed over the "
            "admin socket, with progress); it is verified before anything is written.")
    p.add_argument("path", metavar="PATH", help="image directory (or an image tar file)")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a security_version below the device's anti-rollback floor")
    p.add_argument("--activate", action="store_true",
                   help="also make it the trial (tried at the next start; see `image activate`)")
    p.set_defaults(handler=cmd_image_install)

    p = add(image_sub, "list", "List the installed images, their state, and the store's history.")
    p.add_argument("--history", type=int, default=10, metavar="N",
                   help="show the last N events (default 10; 0: none)")
    p.set_defaults(handler=cmd_image_list)

    p = add(image_sub, "activate", "Switch to an installed image now, without stopping service "
            "(it must pass its self-test, else the current image stays).")
    p.add_argument("image", metavar="VERSION|DIGEST", help="version, name@version, digest or "
                   "8+ hex digits of it")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a security_version below the device's anti-rollback floor")
    p.add_argument("--next-boot", action="store_true",
                   help="only make it the trial: it is tried at the daemon's next start")
    p.set_defaults(handler=cmd_image_activate)

    p = add(image_sub, "rollback", "Go back to the previous good image, without stopping service.")
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a previous image below the anti-rollback floor")
    p.set_defaults(handler=cmd_image_rollback)

    p = add(image_sub, "mark-good", "Mark the image on trial good by hand (the daemon does it "
            "itself when the self-test passes).")
    p.add_argument("image", metavar="DIGEST", nargs="?", default="",
                   help="the image expected on trial (default: whichever is)")
    p.set_defaults(handler=cmd_image_mark_good)

    p = add(image_sub, "remove", "Delete an installed image that is not active, previous or on "
            "trial.")
    p.add_argument("image", metavar="VERSION|DIGEST")
    p.set_defaults(handler=cmd_image_remove)


def _admin(args: argparse.Namespace) -> Any:
    from m4client import AdminClient

    return AdminClient(args.admin_address, app_name=args.app_name or None, timeout=args.timeout)


def _image_line(image: Any) -> str:
    return f"{image.name} {image.version} ({image.digest[:12]})"


def _image_json(image: Any) -> dict[str, Any]:
    return {k: getattr(image, k) for k in ("digest", "name", "version", "security_version",
                                           "compatible", "size_bytes", "signed_by",
                                           "installed_at", "state")}


def _tar_source(path: Path) -> tuple[Any, int]:
    """The tar's chunks and size (0 when unknown) for a directory or a tar file."""
    if path.is_dir():
        error = _image_error()
        from m4image.tarstream import iter_image_tar

        try:
            return iter_image_tar(path), 0
        except (error, OSError) as exc:
            raise ImageToolError(f"{path}: {exc}") from None
    if not path.is_file():
        raise ImageToolError(f"{path} is neither an image directory nor a tar file")

    def chunks() -> Any:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    return chunks(), path.stat().st_size


def cmd_image_install(args: argparse.Namespace) -> int:
    path = Path(args.path)
    chunks, size = _tar_source(path)
    progress = out.Progress(args.quiet)
    started = time.monotonic()

    def show(p: Any) -> None:
        if p.stage == "files" or p.stage == "publish":
            progress(p.stage, p.written_bytes, p.image_bytes)
        else:
            progress("checking signature and manifest", p.received_bytes, p.total_bytes)

    try:
        with _admin(args) as admin:
            image = admin.install_image(chunks, total_bytes=size,
                                        allow_downgrade=args.allow_downgrade,
                                        activate=args.activate, progress=show)
    finally:
        progress.finish()
    seconds = time.monotonic() - started
    if args.json:
        out.write(json.dumps(_image_json(image)) + "\n")
    elif args.quiet:
        out.write(image.digest + "\n")
    else:
        what = "on trial (tried at the next start)" if image.state == "trial" else image.state
        out.write(f"installed {_image_line(image)}: {what}, {out.human_bytes(image.size_bytes)} "
                  f"in {seconds:.1f} s\n")
        out.write(f"digest: {image.digest}\n")
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        listing = admin.list_images(history=args.history > 0)
    if args.json:
        out.json_line(listing.raw)
        return 0
    if args.quiet:
        out.write("".join(f"{i.digest} {i.state}\n" for i in listing.images))
        return 0
    if not listing.images:
        out.write("no images installed; install one with `m4ctl image install DIR`\n")
        return 0
    rows = [("STATE", "NAME", "VERSION", "SECURITY", "DIGEST", "SIZE", "SIGNED BY", "INSTALLED")]
    rows += [(i.state + ("+trial" if i.digest == listing.trial_digest and i.state != "trial"
                         else ""), i.name, i.version, str(i.security_version), i.digest[:12],
              out.human_bytes(i.size_bytes), i.signed_by or "-", i.installed_at)
             for i in listing.images]
    lines = out.table(rows)
    trial = listing.trial
    if trial is not None:
        lines.append(f"trial: {_image_line(trial)}, boot attempts {listing.trial_attempts}"
                     f"/{listing.max_trial_attempts}")
    lines.append(f"anti-rollback floor: security_version {listing.max_security_version}")
    if listing.history:
        lines.append("history:")
        lines += [f"  {h.time}  {h.event:<12} {h.digest[:12] or '-':<12}  {h.detail}"
                  for h in listing.history[-args.history:]]
    out.write("".join(line + "\n" for line in lines))
    return 0


def cmd_image_activate(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        image = admin.activate_image(args.image, allow_downgrade=args.allow_downgrade,
                                     now=not args.next_boot)
    if args.json:
        out.write(json.dumps(_image_json(image)) + "\n")
    elif args.quiet:
        out.write(image.digest + "\n")
    elif image.state == "active":
        out.write(f"activated {_image_line(image)}: it passed its self-test and serves now\n")
    else:
        when = "at the daemon's next start" if args.next_boot else "now; mark it good by hand"
        out.write(f"{_image_line(image)} is on trial: it is tried {when}\n")
    return 0


def cmd_image_rollback(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        active, previous = admin.rollback(allow_downgrade=args.allow_downgrade)
    if args.json:
        out.write(json.dumps({"active": _image_json(active),
                              "previous": _image_json(previous) if previous else None}) + "\n")
    elif args.quiet:
        out.write(active.digest + "\n")
    else:
        out.write(f"rolled back to {_image_line(active)}: it serves now"
                  + (f" (previous: {_image_line(previous)})" if previous else "") + "\n")
    return 0


def cmd_image_mark_good(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        image = admin.mark_good(args.image)
    if args.json:
        out.write(json.dumps(_image_json(image)) + "\n")
    elif args.quiet:
        out.write(image.digest + "\n")
    else:
        out.write(f"marked {_image_line(image)} good: it is the active image\n")
    return 0


def cmd_image_remove(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        digest = admin.remove_image(args.image)
    if args.json:
        out.write(json.dumps({"digest": digest}) + "\n")
    else:
        out.write((digest if args.quiet else f"removed {digest}") + "\n")
    return 0
