"""Build hook of mobilefm-client: the gRPC stubs are generated before anything is built, and
grpcio and protobuf are required at least at the versions they were generated for.

Metadata (the dependencies) comes before any build step, so the stubs are made here, when
setuptools loads this file, by the one command that makes them (`protos/generate.py`, run
with the build environment's grpcio-tools). A source tree that already has them (a clone
after `make protos`, an sdist) builds as it is.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
GENERATE = HERE.parent.parent / "protos" / "generate.py"
SERVICES = ("inference", "admin")
# What older grpcio-tools, which do not write their versions into the stubs, need at least.
FLOOR = {"grpcio": "1.60", "protobuf": "5.26"}


def _stubs() -> list[Path]:
    return [HERE / "m4" / s / "v1" / f"{s}{suffix}" for s in SERVICES
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def ensure_stubs() -> None:
    if all(p.exists() for p in _stubs()):
        return
    if not GENERATE.exists():
        sys.exit(f"the gRPC stubs are missing and {GENERATE} is not there to make them: "
                 "build from a clone of MobileFM, or run `python protos/generate.py` first")
    subprocess.run([sys.executable, str(GENERATE)], check=True)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split("."))


def requirements() -> list[str]:
    """grpcio and protobuf, each at least what the generated stubs check for at import."""
    found = dict(FLOOR)
    patterns = {"protobuf": r"^# Protobuf Python Version: (\d+(?:\.\d+)*)",
                "grpcio": r"^GRPC_GENERATED_VERSION = '(\d+(?:\.\d+)*)'"}
    for path in _stubs():
        text = path.read_text(encoding="utf-8") if path.suffix == ".py" else ""
        for name, pattern in patterns.items():
            m = re.search(pattern, text, re.MULTILINE)
            if m and _version(m.group(1)) > _version(found[name]):
                found[name] = m.group(1)
    return [f"{name}>={version}" for name, version in sorted(found.items())]


ensure_stubs()
setup(install_requires=requirements())
