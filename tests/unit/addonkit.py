"""Tiny add-ons for the add-on format and store tests: a tiny base image (imagekit), adapter
files of a few bytes (the format and the store never parse them), written and signed by the
real writer with development keys the tests generate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from m4image.addon_io import VerifiedAddon, write_addon
from m4image.verify import verify_image

from tests.unit.imagekit import make_image, payload

WEIGHTS = "backbone/model.safetensors"
BASE_TASKS = [{"id": "generate", "path": 2, "description": "Text.", "modules": ["backbone"],
               "head": "lm_head", "inputs": [{"name": "prompt", "kind": "text"}],
               "outputs": [{"name": "text", "kind": "text"}], "rpc": "Generate"}]


def base_image(root: Path, seed: str = "one") -> tuple[Path, str]:
    """A tiny image with a backbone and a text encoder and one task; (path, digest)."""
    image = make_image(root, seed=seed, components={
        "backbone": {"kind": "llama", "weights": WEIGHTS},
        "text_encoder": {"kind": "bert", "weights": "text_encoder/model.safetensors"}},
        tasks=BASE_TASKS)
    return image, verify_image(image).digest


def backbone_sha(seed: str = "one") -> str:
    return hashlib.sha256(payload(seed)[WEIGHTS]).hexdigest()


def lora_task(task_id: str, adapter: str) -> dict[str, Any]:
    return {"id": task_id, "path": 2, "description": "Travel requests as JSON.",
            "modules": ["backbone"], "head": "lm_head", "adapter": adapter,
            "prompt_template": "{prompt}", "rpc": "Generate", "streaming": True,
            "inputs": [{"name": "prompt", "kind": "text"}],
            "outputs": [{"name": "text", "kind": "text"}]}


def make_addon(out: Path, src: Path, base: str, *, key: Path | None, name: str = "travel",
               version: str = "1.0.0", weights: bytes = b"lora weights",
               tasks: list[dict[str, Any]] | None = None, lora_base: str | None = None,
               component: str = "travel-lora") -> VerifiedAddon:
    """A signed (unless `key` is None) add-on with one lora component and its task."""
    folder = src / f"{name}-{version}-{component}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    spec = {"kind": "lora", "module": "backbone", "dir": f"adapters/{component}", "rank": 4,
            "alpha": 8, "targets": ["q_proj"], "base": lora_base or backbone_sha(),
            "metrics": {"eval": {"exact_match": 0.5}}}
    return write_addon(out, name=name, version=version, base=base, components={component: spec},
                       tasks=tasks if tasks is not None else [lora_task(f"{name}-plan", component)],
                       payload={f"adapters/{component}/{f.name}": f for f in folder.iterdir()},
                       key=key)
