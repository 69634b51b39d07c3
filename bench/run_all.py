"""Benchmark runner (outside the serving pipeline): every bench script, one after the other.

`make bench` calls `bench/run_all.py --image build/images/default`. The scripts run one at a
time (never together: they would share the two cores and spoil each other's timings), each
in its own interpreter, with `--image` passed through to the scripts whose `--help` lists it
(bench_backbone.py builds its model from the GGUF and takes no image). Scripts that do not
exist yet are skipped. The exit status is non-zero when any script failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SCRIPTS = ("bench_daemon.py", "bench_scheduling.py", "bench_backbone.py", "bench_media.py",
           "bench_gil.py", "bench_kernels.py", "bench_footprint.py", "bench_adapters.py",
           "bench_tasks.py")


def takes_image(script: Path) -> bool:
    """Whether the script has an --image option (asked through its own --help)."""
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, check=False)
    return "--image" in result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=Path("build/images/default"),
                        help="firmware image directory passed to every script")
    args = parser.parse_args(argv)

    failed: list[str] = []
    for name in SCRIPTS:
        script = BENCH_DIR / name
        if not script.is_file():
            print(f"== {name}: skipped (not present)\n", flush=True)
            continue
        command = [sys.executable, str(script)]
        if takes_image(script):
            command += ["--image", str(args.image)]
        print(f"== {' '.join(command[1:])}", flush=True)
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            failed.append(f"{name} (exit {result.returncode})")
        print(flush=True)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
