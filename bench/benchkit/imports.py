"""Benchmark helpers (outside the serving pipeline): where the benches find what the
environment does not install, without editing sys.path.

Two things live outside the venv: the repository's test helpers (`tests.speech`,
`tests.rendering`, `tests.torchvision_compat`), and a llama_cpp build installed with
`pip install --no-deps --target DIR <wheel>` (the package and its own dependencies, side by
side). Both are served by a `DirectoryFinder`: an entry of sys.meta_path that answers for a
few named top-level packages from one directory, ahead of the environment, and for nothing
else.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Iterable, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = REPO / "build" / "images" / "default"


class DirectoryFinder(importlib.abc.MetaPathFinder):
    """Finds the top-level packages `names` in `directory` (their submodules then come from
    the package's own __path__, as usual)."""

    def __init__(self, directory: Path, names: Iterable[str]) -> None:
        self.directory = str(directory.resolve())
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if path is not None or fullname not in self.names:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.directory])


def serve_from(directory: Path, names: Iterable[str]) -> None:
    """Makes `import NAME` load NAME from `directory` for every NAME in `names`."""
    sys.meta_path.insert(0, DirectoryFinder(directory, names))


def top_level_names(directory: Path) -> set[str]:
    """The importable top-level names in a `pip --target` directory."""
    names = set()
    for entry in directory.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.suffix in (".py", ".so"):
            names.add(entry.name.split(".", 1)[0])
    return names


def tests_module(name: str) -> ModuleType:
    """`tests.<name>` from this repository: a test helper a bench shares with the tests."""
    if not any(isinstance(f, DirectoryFinder) and "tests" in f.names for f in sys.meta_path):
        serve_from(REPO, ["tests"])
    return importlib.import_module(f"tests.{name}")
