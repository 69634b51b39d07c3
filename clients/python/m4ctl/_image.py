"""`m4ctl image ...`: firmware images, made and checked here (`build`, `sign`, `verify`) and
managed in the daemon's store (`install`, `list`, `activate`, `rollback`, `mark-good`,
`remove`).

The local verbs work on files with the daemon side's tools, imported when they run:
`build` needs torch (`m4d.builder`), `sign` and `verify` the image format (`m4image`); where
they are not installed the command says what to install. The store verbs call the Admin
service over the admin socket (`--admin-address`, env M4_ADMIN_ADDRESS) and need only the
client: an install streams the image directory as a tar (or a tar file as it is), progress
on stderr; the daemon verifies everything before it writes a byte.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from m4client import ImageInfo

from . import _output as out
from ._keys import KEYS_HELP, image_error, keyring
from ._parser import command, verbs
from ._tools import ToolError, UsageError, admin_client, daemon_side, tool_errors

DOWNGRADE_HELP = "accept a security_version below the device's anti-rollback floor"
COMPONENTS = ("gguf", "hf", "vlm", "encoder", "speech", "ocr", "clip", "sensor")


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Adds `image` and its verbs to m4ctl's subcommands."""
    image = verbs(command(sub, "image", "Build, sign, verify and install firmware images.",
                          parents), "image")
    _register_build(image, parents)
    p = command(image, "sign", "Sign a firmware image: write DIR/manifest.sig (ed25519 over "
                "manifest.json).", parents, cmd_image_sign)
    p.add_argument("dir", metavar="DIR", help="the image directory")
    p.add_argument("--key", required=True, metavar="KEY",
                   help="private key file (NAME.key from `m4ctl keys generate`)")
    p = command(image, "verify", "Verify a firmware image directory (signature, then every "
                "file).", parents, cmd_image_verify)
    p.add_argument("dir", metavar="DIR")
    g = p.add_argument_group("signature")
    g.add_argument("--keys", metavar="DIR", default=None, help=KEYS_HELP)
    g.add_argument("--unsigned", action="store_true",
                   help="development image: check the files' hashes only, not the signature")
    g.add_argument("--compatible", metavar="STR", default=None,
                   help="also require the manifest's compatible string to be STR")
    g.add_argument("--daemon-version", metavar="VER", default=None,
                   help="also require min_daemon_version <= VER")
    _register_store(image, parents)


def _register_build(image: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = command(image, "build", "Build a firmware image.", parents, cmd_image_build)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--default", action="store_true", help="the default M4 image")
    kind.add_argument("--gguf", metavar="FILE", help="a Llama-family backbone from a GGUF file")
    kind.add_argument("--hf", metavar="DIR",
                      help="a Llama backbone from a Hugging Face checkpoint folder")
    p.add_argument("--encoder", metavar="DIR", help="a sentence-transformers text encoder folder")
    p.add_argument("--speech", metavar="DIR", help="a Whisper speech model: a CTranslate2 "
                   "folder (model.bin) or a Hugging Face folder")
    p.add_argument("--ocr", metavar="DIR", help="an OCR model: a folder with EasyOCR's "
                   "craft_mlt_25k.pth and english_g2.pth")
    p.add_argument("--clip", metavar="DIR", help="a Hugging Face CLIP folder (image "
                   "classification, retrieval, embedding)")
    p.add_argument("--sensor", metavar="DIR", help="a sensor-window classifier head "
                   "(config.json + model.safetensors)")
    kind.add_argument("--vlm", metavar="DIR", help="a LLaVA (Hugging Face) or MobileVLM folder: "
                      "vision encoder, projector and backbone (image + question -> answer)")
    p.add_argument("--name", default="m4-custom", help="the image's name (not with --default)")
    p.add_argument("--version", default="1.0.0", help="the image's version")
    p.add_argument("--security-version", type=int, default=1, help="the anti-rollback counter")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="image directory")
    p.add_argument("--force", action="store_true", help="replace an existing DIR")


def _register_store(image: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    p = command(image, "install", "Install a firmware image on the daemon (streamed over the "
                "admin socket, with progress); it is verified before anything is written.",
                parents, cmd_image_install)
    p.add_argument("path", metavar="PATH", help="image directory (or an image tar file)")
    p.add_argument("--allow-downgrade", action="store_true", help=DOWNGRADE_HELP)
    p.add_argument("--activate", action="store_true",
                   help="also make it the trial (tried at the next start; see `image activate`)")
    p = command(image, "list", "List the installed images, their state, and the store's "
                "history.", parents, cmd_image_list)
    p.add_argument("--history", type=int, default=10, metavar="N",
                   help="show the last N events (default 10; 0: none)")
    p = command(image, "activate", "Switch to an installed image now, without stopping service "
                "(it must pass its self-test, else the current image stays).", parents,
                cmd_image_activate)
    p.add_argument("image", metavar="VERSION|DIGEST",
                   help="version, name@version, digest or 8+ hex digits of it")
    p.add_argument("--allow-downgrade", action="store_true", help=DOWNGRADE_HELP)
    p.add_argument("--next-boot", action="store_true",
                   help="only make it the trial: it is tried at the daemon's next start")
    p = command(image, "rollback", "Go back to the previous good image, without stopping "
                "service.", parents, cmd_image_rollback)
    p.add_argument("--allow-downgrade", action="store_true",
                   help="accept a previous image below the anti-rollback floor")
    p = command(image, "mark-good", "Mark the image on trial good by hand (the daemon does it "
                "itself when the self-test passes).", parents, cmd_image_mark_good)
    p.add_argument("image", metavar="DIGEST", nargs="?", default="",
                   help="the image expected on trial (default: whichever is)")
    p = command(image, "remove", "Delete an installed image that is not active, previous or "
                "on trial.", parents, cmd_image_remove)
    p.add_argument("image", metavar="VERSION|DIGEST")


# ---- local: build, sign, verify ------------------------------------------------------------


def _local(args: argparse.Namespace, verb: str, image: Any, *more: str) -> None:
    m = image.manifest
    info = {"path": str(image.path), "name": m.name, "version": m.version,
            "digest": image.digest}
    lines = [f"{verb} {m.name} {m.version} at {image.path}", f"digest: {image.digest}"]
    out.result(args, info, image.digest, lines + list(more))


def cmd_image_build(args: argparse.Namespace) -> int:
    if not args.default and not any(getattr(args, c) for c in COMPONENTS):
        raise UsageError("say what to build: --default, or any of --gguf/--hf/--vlm, "
                         "--encoder, --speech, --ocr, --clip, --sensor")
    build = daemon_side("m4d.builder.build", "image build")
    progress = out.Progress(args.quiet)
    try:
        with tool_errors(image_error("image build")):
            if args.default:
                image = build.build_default_image(Path(args.output), progress=progress,
                                                  force=args.force)
            else:
                paths = {c: Path(getattr(args, c)) if getattr(args, c) else None
                         for c in COMPONENTS}
                image = build.build_image(
                    Path(args.output), backbone_gguf=paths.pop("gguf"),
                    backbone_hf=paths.pop("hf"), **paths, name=args.name,
                    version=args.version, security_version=args.security_version,
                    progress=progress, force=args.force)
    finally:
        progress.finish()
    _local(args, "built", image)
    return 0


def cmd_image_sign(args: argparse.Namespace) -> int:
    sign = daemon_side("m4image.sign", "image sign")
    verify = daemon_side("m4image.verify", "image sign")
    with tool_errors(verify.ImageError):
        signed = sign.sign_image(Path(args.dir), Path(args.key))
        image = verify.verify_image(signed.path)
    m = image.manifest
    info = {"path": str(signed.path), "name": m.name, "version": m.version,
            "digest": signed.digest, "key_id": signed.key_id}
    out.result(args, info, signed.key_id, [
        f"signed {m.name} {m.version} at {signed.path} with key {signed.key_id}",
        f"digest: {signed.digest}"])
    return 0


def cmd_image_verify(args: argparse.Namespace) -> int:
    verify = daemon_side("m4image.verify", "image verify")
    progress = out.Progress(args.quiet)
    try:
        with tool_errors(verify.ImageError):
            ring = None if args.unsigned else keyring(args, "image verify")
            image = verify.verify_image(Path(args.dir), keyring=ring,
                                        expected_compatible=args.compatible,
                                        daemon_version=args.daemon_version, progress=progress)
    finally:
        progress.finish()
    m = image.manifest
    info = {"path": str(image.path), "name": m.name, "version": m.version,
            "digest": image.digest, "signed_by": image.signed_by}
    out.result(args, info, image.digest, [
        f"verified {m.name} {m.version} at {image.path}", f"digest: {image.digest}",
        f"signed by: {image.signed_by or 'not checked (--unsigned)'}"])
    return 0


# ---- the daemon's store (admin socket) ------------------------------------------------------


def _line(image: ImageInfo) -> str:
    return f"{image.name} {image.version} ({image.digest[:12]})"


def _json(image: ImageInfo) -> dict[str, Any]:
    return {k: getattr(image, k) for k in ("digest", "name", "version", "security_version",
                                           "compatible", "size_bytes", "signed_by",
                                           "installed_at", "state")}


def _tar_source(path: Path) -> tuple[Iterator[bytes], int]:
    """The tar's chunks and size (0 when unknown) for a directory or a tar file."""
    if path.is_dir():
        tarstream = daemon_side("m4image.tarstream", "image install DIR")
        try:
            chunks: Iterator[bytes] = tarstream.iter_image_tar(path)
        except (tarstream.ImageError, OSError) as exc:
            raise ToolError(f"{path}: {exc}") from None
        return chunks, 0
    if not path.is_file():
        raise ToolError(f"{path} is neither an image directory nor a tar file")

    def blocks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    return blocks(), path.stat().st_size


def cmd_image_install(args: argparse.Namespace) -> int:
    chunks, size = _tar_source(Path(args.path))
    progress = out.Progress(args.quiet)
    started = time.monotonic()

    def show(p: Any) -> None:
        if p.stage in ("files", "publish"):
            progress(p.stage, p.written_bytes, p.image_bytes)
        else:
            progress("checking signature and manifest", p.received_bytes, p.total_bytes)

    try:
        with admin_client(args) as admin:
            image = admin.install_image(chunks, total_bytes=size,
                                        allow_downgrade=args.allow_downgrade,
                                        activate=args.activate, progress=show)
    finally:
        progress.finish()
    seconds = time.monotonic() - started
    what = "on trial (tried at the next start)" if image.state == "trial" else image.state
    out.result(args, _json(image), image.digest, [
        f"installed {_line(image)}: {what}, {out.human_bytes(image.size_bytes)} in "
        f"{seconds:.1f} s", f"digest: {image.digest}"])
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
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
        lines.append(f"trial: {_line(trial)}, boot attempts {listing.trial_attempts}"
                     f"/{listing.max_trial_attempts}")
    lines.append(f"anti-rollback floor: security_version {listing.max_security_version}")
    if listing.history:
        lines.append("history:")
        lines += [f"  {h.time}  {h.event:<12} {h.digest[:12] or '-':<12}  {h.detail}"
                  for h in listing.history[-args.history:]]
    out.write("".join(line + "\n" for line in lines))
    return 0


def cmd_image_activate(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        image = admin.activate_image(args.image, allow_downgrade=args.allow_downgrade,
                                     now=not args.next_boot)
    if image.state == "active":
        line = f"activated {_line(image)}: it passed its self-test and serves now"
    else:
        when = "at the daemon's next start" if args.next_boot else "now; mark it good by hand"
        line = f"{_line(image)} is on trial: it is tried {when}"
    out.result(args, _json(image), image.digest, [line])
    return 0


def cmd_image_rollback(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        active, previous = admin.rollback(allow_downgrade=args.allow_downgrade)
    info = {"active": _json(active), "previous": _json(previous) if previous else None}
    before = f" (previous: {_line(previous)})" if previous else ""
    out.result(args, info, active.digest,
               [f"rolled back to {_line(active)}: it serves now{before}"])
    return 0


def cmd_image_mark_good(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        image = admin.mark_good(args.image)
    out.result(args, _json(image), image.digest,
               [f"marked {_line(image)} good: it is the active image"])
    return 0


def cmd_image_remove(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        digest = admin.remove_image(args.image)
    out.result(args, {"digest": digest}, digest, [f"removed {digest}"])
    return 0

