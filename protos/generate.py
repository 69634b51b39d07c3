"""Generates the Python gRPC stubs (package `m4`) from the .proto files beside this script.

The one command for it: `python protos/generate.py`. The output lands next to each .proto
file (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`), is ignored by git and never edited by hand.
Stubs for other languages come from the same files with each language's protoc plugin.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from grpc_tools import protoc  # a build-time dependency (the `dev` extra)

    protos = sorted(str(p.relative_to(HERE)) for p in HERE.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    print(f"generated stubs for {len(protos)} files: {', '.join(protos)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
