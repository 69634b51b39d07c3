"""Firmware image, command line: ``python -m m4image build|verify``.

``m4ctl image build`` calls the same library functions; this entry point exists so the image
tooling can be used and tested without the daemon's client.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from m4image.manifest import ImageError


def _progress_printer(quiet: bool) -> Callable[[str, int, int], None]:
    """One line per stage when it starts and when it completes, with counts."""
    seen: set[str] = set()

    def progress(stage: str, done: int, total: int) -> None:
        if quiet:
            return
        if stage not in seen or done >= total:
            seen.add(stage)
            print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)

    return progress


def _build(args: argparse.Namespace) -> int:
    from m4image.build import build_default_image

    if not args.default:
        print("error: only --default images can be built for now", file=sys.stderr)
        return 2
    started = time.monotonic()
    image = build_default_image(Path(args.output), progress=_progress_printer(args.quiet),
                                force=args.force)
    m = image.manifest
    print(f"OK {image.path} {m.name} {m.version} sha256:{image.digest} "
          f"({len(m.files)} files, {len(m.tasks)} tasks, {time.monotonic() - started:.0f} s)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from m4image.verify import verify_image

    image = verify_image(Path(args.directory))
    print(f"OK {image.manifest.name} {image.manifest.version} sha256:{image.digest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m4image", description="Build and verify M4 firmware images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a firmware image directory")
    b.add_argument("--default", action="store_true", help="the default image from the PyPI model packages")
    b.add_argument("--output", required=True, help="the image directory to create")
    b.add_argument("--force", action="store_true", help="replace an existing output directory")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_build)
    v = sub.add_parser("verify", help="check an image's manifest and every file hash")
    v.add_argument("directory")
    v.set_defaults(func=_verify)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ImageError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
