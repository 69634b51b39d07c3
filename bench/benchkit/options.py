"""Benchmark helpers (outside the serving pipeline): the command-line options that mean the
same in every bench script that has them.

`--image DIR` (the firmware image, default build/images/default), `--json` (the result as
JSON instead of the table), `--self-test` (m4d's, warn by default) and `--kernel-variant
NAME` / `--llama-cpp DIR` (which m4 kernels the daemon runs, which llama.cpp build it is
compared with). `--threads` and `--repeats` differ in meaning per script and stay there.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchkit.imports import DEFAULT_IMAGE
from benchkit.report import emit


def add_image(parser: argparse.ArgumentParser,
              help: str = "firmware image directory (default build/images/default)") -> None:
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help=help)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def add_self_test(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--self-test", choices=("strict", "warn", "off"), default="warn",
                        help="m4d's --self-test; warn (default) serves and reports failed "
                             "checks in the notes, so speed is measured either way")


def add_variant_options(parser: argparse.ArgumentParser) -> None:
    """--kernel-variant and --llama-cpp (bench_daemon.py and bench_scheduling.py)."""
    parser.add_argument("--kernel-variant", default=None, metavar="NAME",
                        help="m4 kernel variant the daemon runs (avx512vnni, avxvnni, avx2, "
                             "neon_dotprod, scalar; default: the daemon's choice, the best "
                             "this CPU runs)")
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                        help="compare with the llama_cpp package installed in DIR (pip "
                             "--target), e.g. a build for another instruction set (default: "
                             "the installed llama-cpp-python)")


def daemon_bench_main(description: str, measure: Callable[[argparse.Namespace], Any],
                      render: Callable[[Any], str], argv: Sequence[str] | None,
                      add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The main of a script that measures one m4d: --image, --self-test, --json and its own
    options, then prints `measure(args)` as `render` makes it (or as JSON)."""
    parser = argparse.ArgumentParser(description=description)
    add_image(parser)
    add_self_test(parser)
    add_json(parser)
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    emit(measure(args), render, args.json)
    return 0
