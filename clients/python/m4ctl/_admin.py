"""m4ctl's admin nouns: `status` (admin socket) and `image build|verify` (local files).

`m4image` is imported inside the image commands only, so the user verbs start fast and
work where the image tooling (and its heavy dependencies) is not installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from m4client import AdminClient

from . import _output as out
from ._parser import UsageError


class ImageToolError(Exception):
    """An image command failed; the message is the whole story (exit code 1)."""


def cmd_status(args: argparse.Namespace) -> int:
    with AdminClient(
        args.admin_address, app_name=args.app_name or None, timeout=args.timeout
    ) as admin:
        s = admin.status()
    if args.json:
        out.json_line(s.raw)
        return 0
    rows = [
        ("image", f"{s.image_name} {s.image_version}".strip() or "-"),
        ("digest", s.image_digest or "-"),
        (
            "daemon",
            f"{s.daemon_version or '?'}, {s.state}, up {out.human_duration(s.uptime_seconds)}",
        ),
        ("memory", f"{out.human_bytes(s.memory_rss_bytes)} RSS, {s.threads} threads"),
        (
            "requests",
            f"{s.requests_in_flight} in flight, {s.requests_total:,} total, "
            f"{s.requests_cancelled:,} cancelled, {s.requests_rejected:,} rejected",
        ),
        ("tokens", f"{s.tokens_generated:,} generated, {s.tokens_prompted:,} prompted"),
        ("sequences", f"{s.active_sequences} active / {s.kv_slots} KV slots"),
    ]
    if args.quiet:
        rows = [rows[0], ("state", s.state)]
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    if s.components and not args.quiet:
        lines.append("components:")
        comp = [
            (
                c.name,
                c.kind,
                f"{out.human_count(c.parameters)} params",
                f"{c.weight_format}/{c.compute_dtype}" + (f" ({c.kernels})" if c.kernels else ""),
                c.device,
            )
            for c in s.components
        ]
        lines += ["  " + line for line in out.table(comp)]
    if not args.quiet:
        lines += _load_lines(s)
    out.write("".join(line + "\n" for line in lines))
    return 0


def _load_lines(s: Any) -> list[str]:
    """Devices and placement, engine load, and per-uid usage (from the same Status)."""
    lines: list[str] = []
    if s.devices:
        lines.append("devices:")
        rows: list[tuple[str, ...]] = [(d.name, d.description or "-",
                 f"{d.cores} cores" if d.cores else out.human_bytes(d.memory_bytes),
                 " ".join(d.flags) or "-",
                 ("runs " + ", ".join(d.components) + f" ({d.executor})") if d.components
                 else "unused")
                for d in s.devices]
        lines += ["  " + line for line in out.table(rows)]
    load = s.load
    if load is not None:
        queues = ", ".join(f"{c} {n}" for c, n in load.queues.items())
        lines.append(f"queues: {queues}")
        lines.append(f"batch: {load.running_sequences} running, last decode step "
                     f"{load.decode_batch_size}, KV blocks {load.kv_blocks_used}/"
                     f"{load.kv_blocks_total}")
        lines.append(f"rate: {load.decode_tokens_per_second:.1f} tok/s decode over "
                     f"{load.window_seconds:g} s; TTFT p50 {load.ttft_p50_ms:.0f} ms, p99 "
                     f"{load.ttft_p99_ms:.0f} ms ({load.ttft_samples} samples)")
    if s.uids:
        lines.append("callers:")
        rows = [("uid", "user", "apps", "class", "ok", "failed", "rejected", "tokens in",
                 "tokens out", "tok/s", "in flight", "queued")]
        rows += [(str(u.uid), u.user or "-", ",".join(u.apps) or "-", u.priority_class or "-",
                  str(u.requests_ok), str(u.requests_failed), str(u.requests_rejected),
                  f"{u.tokens_in:,}", f"{u.tokens_out:,}", f"{u.tokens_per_second:.1f}",
                  str(u.in_flight), str(u.queued)) for u in s.uids]
        lines += ["  " + line for line in out.table(rows)]
    return lines


def _image_modules() -> tuple[Any, Any]:
    """m4d.builder.build and m4image.verify, imported now; ImageToolError when missing."""
    try:
        import m4d.builder.build as build
        import m4image.verify as verify
    except ImportError as exc:
        raise ImageToolError(f"image tooling is not available: {exc}") from None
    return build, verify


def _image_summary(image: Any) -> dict[str, str]:
    return {
        "path": str(image.path),
        "name": image.manifest.name,
        "version": image.manifest.version,
        "digest": image.digest,
    }


def _print_image(verb: str, image: Any, args: argparse.Namespace) -> None:
    info = _image_summary(image)
    if args.json:
        out.write(json.dumps(info) + "\n")
    elif args.quiet:
        out.write(info["digest"] + "\n")
    else:
        out.write(f"{verb} {info['name']} {info['version']} at {info['path']}\n")
        out.write(f"digest: {info['digest']}\n")


def cmd_image_build(args: argparse.Namespace) -> int:
    build, verify = _image_modules()
    progress = out.Progress(args.quiet)
    try:
        if args.default:
            image = build.build_default_image(Path(args.output), progress=progress,
                                              force=args.force)
        else:
            if not any((args.gguf, args.hf, args.vlm, args.encoder, args.speech, args.ocr,
                        args.clip, args.sensor)):
                raise UsageError("say what to build: --default, or any of --gguf/--hf/--vlm, "
                                 "--encoder, --speech, --ocr, --clip, --sensor")
            image = build.build_image(
                Path(args.output), backbone_gguf=Path(args.gguf) if args.gguf else None,
                backbone_hf=Path(args.hf) if args.hf else None,
                encoder=Path(args.encoder) if args.encoder else None,
                speech=Path(args.speech) if args.speech else None,
                ocr=Path(args.ocr) if args.ocr else None,
                clip=Path(args.clip) if args.clip else None,
                vlm=Path(args.vlm) if args.vlm else None,
                sensor=Path(args.sensor) if args.sensor else None, name=args.name,
                version=args.version, security_version=args.security_version,
                progress=progress, force=args.force)
    except verify.ImageError as exc:
        raise ImageToolError(str(exc)) from None
    finally:
        progress.finish()
    _print_image("built", image, args)
    return 0


def cmd_image_verify(args: argparse.Namespace) -> int:
    _, verify = _image_modules()
    progress = out.Progress(args.quiet)
    try:
        image = verify.verify_image(Path(args.dir), progress=progress)
    except verify.ImageError as exc:
        raise ImageToolError(str(exc)) from None
    finally:
        progress.finish()
    _print_image("verified", image, args)
    return 0
