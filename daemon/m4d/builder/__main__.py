"""Image building, command line: ``python -m m4d.builder --default --output DIR``.

``m4ctl image build`` calls the same function. Building needs the daemon's model code (torch,
gguf, safetensors), which is why it lives here and not in the torch-free ``m4image``.
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m4d.builder",
                                     description="Build an M4 firmware image directory.")
    parser.add_argument("--default", action="store_true",
                        help="the default image from the PyPI model packages")
    parser.add_argument("--output", required=True, help="the image directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-adapters", action="store_true",
                        help="without the trained adapters (the base to retrain them on)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.default:
        print("error: only --default images can be built for now", file=sys.stderr)
        return 2
    from m4d.builder.build import build_default_image

    started = time.monotonic()
    try:
        image = build_default_image(Path(args.output), progress=_progress_printer(args.quiet),
                                    force=args.force, adapters=not args.no_adapters)
    except ImageError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    m = image.manifest
    print(f"OK {image.path} {m.name} {m.version} sha256:{image.digest} "
          f"({len(m.files)} files, {len(m.tasks)} tasks, {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
