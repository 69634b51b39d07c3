"""m4image stays light: every module of the firmware image package imports without torch,
numpy or the daemon (m4d), so signing, verifying and installing images work on a host or in a
tool that has none of them. Checked in a fresh interpreter, where nothing else imported them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import m4image

PACKAGE = Path(m4image.__file__).resolve().parent
HEAVY = ("torch", "numpy", "m4d")

# imports the modules one by one; prints, per module, the heavy packages it was first to load
SCRIPT = """
import importlib, json, sys
heavy = set(json.loads(sys.argv[2]))
loaded = lambda: {m.split(".")[0] for m in sys.modules} & heavy
pulled = {}
for name in json.loads(sys.argv[1]):
    before = loaded()
    importlib.import_module(name)
    if loaded() - before:
        pulled[name] = sorted(loaded() - before)
print(json.dumps({"pulled": pulled, "loaded": sorted(loaded())}))
"""


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(["m4image", *parts]))
    return names


def test_the_walk_finds_the_package() -> None:
    modules = _modules()
    assert {"m4image", "m4image.manifest", "m4image.verify", "m4image.store",
            "m4image.install", "m4image.sign", "m4image.keys"} <= set(modules)


def test_every_m4image_module_imports_without_torch_numpy_or_m4d() -> None:
    modules = _modules()
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(modules), json.dumps(HEAVY)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["loaded"] == [], f"m4image modules that import {HEAVY}: {out['pulled']}"
