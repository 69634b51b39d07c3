"""Add-on packing (tooling for device makers, and the daemon's install check): a PEFT LoRA
folder or a trained task head, checked against the image it is for, written as a signed
add-on pinned to that image's digest (``m4image.addon``).

    m4ctl adapter pack --base-image IMAGE --name travel --peft ./travel-lora \\
        --task-id travel-plan --prompt-template "{prompt}" --key vendor.key --out travel.tar

A PEFT folder is taken as the peft library writes it (``adapter_config.json`` +
``adapter_model.safetensors``; anything else in the folder, such as its README, stays out).
It must fit the image's backbone: every LoRA pair a linear the backbone has, of its shape
(``m4d.adapters.lora``), and, when it records a backbone digest (our trainer does), that
digest must be the image's. A head must take the text encoder's vector. The same checks run
again in the daemon on the files it is sent, before the add-on is published
(``check_component``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m4image.addon import COMPONENT_FILES, check_name
from m4image.addon_io import VerifiedAddon, write_addon, write_addon_tar
from m4image.manifest import Manifest
from m4image.verify import verify_image

from m4d.adapters.heads import Head, read_head
from m4d.adapters.lora import AdapterError, Lora, decode_tensors, read_peft, sizes_for
from m4d.model.llama import LlamaConfig
from m4d.prepare.prompts import TEMPLATES

__all__ = ["TaskFlags", "check_component", "check_template", "component_spec", "pack_addon"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TaskFlags:
    """The task an add-on serves, as `m4ctl adapter pack` flags give it (empty: defaults)."""

    task_id: str = ""
    rpc: str = ""
    prompt_template: str = ""
    description: str = ""


def _component_of(image: Manifest, kind: str) -> dict[str, Any]:
    spec = next((s for s in image.components.values() if s.get("kind") == kind), None)
    if spec is None:
        what = "backbone (llama)" if kind == "llama" else "text encoder (bert)"
        raise AdapterError(f"the image {image.name} {image.version} has no {what} to adapt")
    return dict(spec)


def fit_lora(folder: Path, image: Manifest) -> Lora:
    """A PEFT folder's LoRA, checked to fit the image's backbone (shapes, layers, and the
    backbone digest it records, if any)."""
    backbone = _component_of(image, "llama")
    cfg = LlamaConfig.from_dict(backbone["config"])
    lora = read_peft(folder, "backbone")
    weights = image.files[backbone["weights"]].sha256
    if _SHA256.match(lora.base_model) and lora.base_model != weights:
        raise AdapterError(f"{folder} was trained on the backbone {lora.base_model[:12]}, not "
                           f"the image's {weights[:12]}: train it on this image's backbone")
    decode_tensors(lora, cfg.n_layers, sizes_for(cfg))
    return lora


def fit_head(folder: Path, image: Manifest) -> Head:
    """A task head, checked to take the image's text-encoder vectors."""
    encoder = _component_of(image, "bert")
    head = read_head(folder)
    dim = int(encoder.get("dimensions") or encoder.get("config", {}).get("hidden_size", 0))
    if head.weight.shape[1] != dim:
        raise AdapterError(f"{folder}: the head takes {head.weight.shape[1]}-dimensional "
                           f"vectors, the image's text encoder gives {dim}")
    return head


def check_template(template: str) -> str:
    """A generation task's prompt template: "" (the prompt as it is), "chat", a template
    the daemon knows, or a text with {prompt}."""
    if template in ("", "chat") or template in TEMPLATES or "{prompt}" in template:
        return template
    raise AdapterError(f"prompt template {template!r} is not \"chat\", a known template "
                       f"({', '.join(sorted(TEMPLATES))}), or a text with {{prompt}} in it")


def check_component(spec: Mapping[str, Any], folder: Path, image: Manifest) -> None:
    """An add-on component's files (under `folder`) fit `image` and match its spec."""
    if spec["kind"] == "lora":
        lora = fit_lora(folder, image)
        if (lora.rank, lora.targets) != (spec["rank"], sorted(spec["targets"])):
            raise AdapterError(f"{folder}: rank {lora.rank} and targets {lora.targets} are "
                               f"not the manifest's {spec['rank']} and {spec['targets']}")
    else:
        head = fit_head(folder, image)
        if head.labels != list(spec["labels"]):
            raise AdapterError(f"{folder}: the head's labels are not the manifest's")


def component_spec(folder: Path, component: str, adapter: Lora | Head, base: str = "") -> dict[str, Any]:
    """The manifest entry (image or add-on) of an adapter whose files are in `folder` and go
    under ``adapters/<component>``: a LoRA on the backbone (`base`: the backbone weights'
    sha256 it is pinned to) or a head on the text encoder, with its held-out metrics."""
    spec: dict[str, Any]
    if isinstance(adapter, Lora):
        spec = {"kind": "lora", "module": "backbone", "rank": adapter.rank,
                "alpha": adapter.alpha, "targets": adapter.targets, "base": base}
    else:
        spec = {"kind": "head", "module": "text_encoder", "labels": adapter.labels}
    return {**spec, "dir": f"adapters/{component}", "metrics": _metrics(folder)}


def _metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    return dict(metrics.get("eval", metrics)) if isinstance(metrics, dict) else {}


def _task(flags: TaskFlags, component: str, spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    task_id = flags.task_id or name
    if spec["kind"] == "head":
        if flags.rpc not in ("", "Classify"):
            raise AdapterError("a task head serves Classify (--rpc Classify)")
        return {"id": task_id, "path": 3, "modules": ["text_encoder"], "head": "linear_head",
                "adapter": component, "labels": list(spec["labels"]), "rpc": "Classify",
                "description": flags.description or f"Classify a text with the {name} "
                "add-on's head.",
                "inputs": [{"name": "text", "kind": "text", "description": "The text."}],
                "outputs": [{"name": "labels", "kind": "texts",
                             "description": "Every label with its probability, best first."}]}
    if flags.rpc not in ("", "Generate"):
        raise AdapterError("a backbone adapter serves Generate (--rpc Generate)")
    return {"id": task_id, "path": 2, "modules": ["backbone"], "head": "lm_head",
            "adapter": component, "prompt_template": check_template(flags.prompt_template or
                                                                    "chat"),
            "rpc": "Generate", "streaming": True,
            "description": flags.description or f"Generation through the {name} add-on's "
            "adapter.",
            "inputs": [{"name": "prompt", "kind": "text", "description": "The request."}],
            "outputs": [{"name": "text", "kind": "text", "description": "The answer."}]}


def pack_addon(base_image: Path, out: Path, *, name: str, version: str, key: Path | None,
               peft: Path | None = None, head: Path | None = None, component: str = "",
               tasks: list[dict[str, Any]] | None = None, flags: TaskFlags = TaskFlags(),
               force: bool = False) -> VerifiedAddon:
    """Checks the adapter against `base_image` and writes the add-on at `out`: a directory,
    or its install tar when `out` ends in .tar. `tasks` (the image manifest's task schema;
    a missing adapter is this component) or else `flags` say what it serves."""
    if (peft is None) == (head is None):
        raise AdapterError("give one adapter: a PEFT folder (--peft) or a task head (--head)")
    image = verify_image(base_image)  # every hash: the digest pinned is that of these bytes
    component = check_name(component or f"{name}-{'lora' if peft else 'head'}", "component")
    folder = peft or head
    assert folder is not None
    if peft is not None:
        backbone = _component_of(image.manifest, "llama")
        spec = component_spec(folder, component, fit_lora(peft, image.manifest),
                              base=image.manifest.files[backbone["weights"]].sha256)
    else:
        spec = component_spec(folder, component, fit_head(folder, image.manifest))
    kind = spec["kind"]
    served = [dict(t, adapter=t.get("adapter") or component) for t in tasks] if tasks \
        else [_task(flags, component, spec, name)]
    for t in served:
        if t.get("rpc") == "Generate":
            check_template(str(t.get("prompt_template") or ""))
    payload = {f"adapters/{component}/{f}": folder / f for f in COMPONENT_FILES[kind]}

    def write(directory: Path, replace: bool) -> VerifiedAddon:
        return write_addon(directory, name=check_name(name, "add-on"), version=version,
                           base=image.digest, components={component: spec}, tasks=served,
                           payload=payload, key=key, force=replace)

    if out.suffix != ".tar":
        return write(out, force)
    if out.exists() and not force:
        raise AdapterError(f"{out} already exists; pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=out.parent) as tmp:
        addon = write(Path(tmp) / "addon", False)
        write_addon_tar(addon.path, out)
    return dataclasses.replace(addon, path=out.resolve())  # the tar: the directory is gone
