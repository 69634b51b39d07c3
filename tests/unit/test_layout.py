"""The code's layout, checked: packages import only the ones below them, no import cycles, and
no production module a reader cannot hold in mind.

The layers of the daemon, from the weights up to the socket (a package may import its own
layer and the ones below; imports inside functions count, as they couple modules as much):

    m4image                      the firmware image format and store: torch-free, no m4d
    m4d.{config,errors,logs,requests}   settings, domain errors, logs, request/result types
    m4d.prepare                  request bytes -> model inputs (tokens, audio features, pixels)
    m4d.model, m4d.adapters      the networks and their kernels; task adapters (LoRA), their
                                 data and training
    m4d.builder, m4d.executor    image building; the runtime that runs the networks (peers)
    m4d.engine                   scheduling and the step loop
    m4d.service                  the daemon's life cycle: boot, self-test, hot swap
    m4d.server                   transport: gRPC servicers, protobuf <-> domain
    m4d.__main__                 the process

The client side (`clients/python`) is its own distribution: `m4client` imports only the
generated stubs (`m4`), `m4ctl` only those and `m4client`, except for the daemon-side tools
(`image build`, local signing) that it imports inside the command that needs them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "m4d": ROOT / "daemon" / "m4d",
    "m4image": ROOT / "firmware_image" / "m4image",
    "m4client": ROOT / "clients" / "python" / "m4client",
    "m4ctl": ROOT / "clients" / "python" / "m4ctl",
}
LAYERS: list[tuple[str, ...]] = [
    ("m4image",),
    ("m4d", "m4d.config", "m4d.errors", "m4d.logs", "m4d.requests"),
    ("m4d.prepare",),
    ("m4d.model", "m4d.adapters"),
    ("m4d.builder", "m4d.executor"),
    ("m4d.engine",),
    ("m4d.service",),
    ("m4d.server",),
    ("m4d.__main__",),
]
# Peers in one layer that must not import each other.
PEERS_APART = {("m4d.builder", "m4d.executor"), ("m4d.executor", "m4d.builder")}
MAX_LINES = 500


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (within our packages)
    line: int
    top_level: bool  # executed at import time (not inside a function)


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            if "_build" not in path.parts:
                found[_module_name(package, root, path)] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> Iterator[Import]:
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        inside_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                # `from pkg import mod` imports the submodule when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]
            for name in names:
                target = _owner(name, modules)
                if target and target != module:
                    yield Import(module, target, node.lineno, id(node) not in inside_function)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that an import name refers to (the longest known prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _group(module: str) -> str:
    """The layer group a module belongs to: its most specific prefix listed in LAYERS."""
    best = ""
    for layer in LAYERS:
        for group in layer:
            if (module == group or module.startswith(group + ".")) and len(group) > len(best):
                best = group
    return best


def _rank(group: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if group in layer)


MODULES = _modules()
IMPORTS = list(_imports(MODULES))


def test_the_walk_sees_the_packages_and_their_imports() -> None:
    # guard against a walk that finds nothing and so passes everything
    assert {"m4d.engine.scheduler", "m4d.server.app", "m4image.manifest", "m4client",
            "m4ctl.__main__"} <= set(MODULES)
    assert len(IMPORTS) > 200
    assert any(i.source.startswith("m4d.server") and i.target.startswith("m4d.engine")
               for i in IMPORTS)


def test_daemon_and_image_packages_import_only_downwards() -> None:
    upward = []
    for imp in IMPORTS:
        if imp.source.split(".")[0] not in ("m4d", "m4image"):
            continue
        src, dst = _group(imp.source), _group(imp.target)
        if dst.split(".")[0] not in ("m4d", "m4image"):
            upward.append(f"{imp.source}:{imp.line} imports the client side {imp.target}")
        elif _rank(dst) > _rank(src) or (src, dst) in PEERS_APART:
            upward.append(f"{imp.source}:{imp.line} ({src}) imports {imp.target} ({dst})")
    assert upward == []


def test_the_client_side_needs_no_daemon_to_import() -> None:
    wrong = []
    for imp in IMPORTS:
        top = imp.source.split(".")[0]
        target_top = imp.target.split(".")[0]
        if top == "m4client" and target_top != "m4client":
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target}")
        if top == "m4ctl" and target_top in ("m4d", "m4image") and imp.top_level:
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target} at import time")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        graph[imp.source].add(imp.target)
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_production_module_over_500_lines(package: str) -> None:
    long = {str(path.relative_to(ROOT)): n for m, path in MODULES.items()
            if m.split(".")[0] == package
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
