"""Generates the Python gRPC stubs (package `m4`) from the .proto files beside this script.

The one command for it: `python protos/generate.py`. The .proto sources stay here; the
stubs (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`) land in the client distribution, under
`clients/python/m4/` next to its tracked `__init__.py` files, are ignored by git and never
edited by hand. Building that distribution runs this script when the stubs are missing
(clients/python/setup.py), so its wheel always carries them. Stubs for other languages come
from the same files with each language's protoc plugin.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The package `m4` belongs to the client distribution (mobilefm-client).
OUT = HERE.parent / "clients" / "python"


def main() -> int:
    from grpc_tools import protoc  # a build-time dependency (the `dev` extra, the client's build)

    protos = sorted(str(p.relative_to(HERE)) for p in HERE.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    print(f"generated stubs for {len(protos)} files into {OUT}: {', '.join(protos)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
