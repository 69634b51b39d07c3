"""Add-on packing (tooling for device makers, and the daemon's install check): a PEFT LoRA
folder (on the backbone or the text encoder), a trained task head, or a head with the LoRA
on the encoder it was trained with, checked against the image it is for, written as a
signed add-on pinned to that image's digest (``m4image.addon``).

    m4ctl adapter pack --base-image IMAGE --name travel --peft ./travel-lora \\
        --task-id travel-plan --prompt-template "{prompt}" --key vendor.key --out travel.tar

A PEFT folder is taken as the peft library writes it (``adapter_config.json`` +
``adapter_model.safetensors``; anything else in the folder, such as its README, stays out).
It must fit the module it adapts (the backbone, or the text encoder: which one its tensors'
names say): every LoRA pair a linear the module has, of its shape (``m4d.adapters.lora``),
and, when it records the module's weights digest (our trainers do), that digest must be the
image's. A head (linear or an MLP) must take the text encoder's vector with its first
layer. The same checks run again in the daemon on the files it is sent, before the add-on
is published (``check_component``).
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
from m4d.adapters.lora import (
    AdapterError,
    Lora,
    decode_tensors,
    fused_layers,
    peft_module,
    read_peft,
    sizes_for,
)
from m4d.model.bert import BertConfig
from m4d.model.llama import LlamaConfig
from m4d.prepare.prompts import TEMPLATES

__all__ = ["TaskFlags", "check_component", "check_template", "component_spec", "pack_addon"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
RESPONSE_SCHEMA = "response_schema.json"  # beside a LoRA's files: the JSON its answers keep to


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


MODULE_KINDS = {"backbone": "llama", "text_encoder": "bert"}  # what a LoRA's module is


def module_digest(image: Manifest, module: str) -> str:
    """The sha256 of the weights of the image's `module` (what its adapters are pinned to)."""
    return image.files[_component_of(image, MODULE_KINDS[module])["weights"]].sha256


def fit_lora(folder: Path, image: Manifest, module: str = "") -> Lora:
    """A PEFT folder's LoRA, checked to fit the image's module it adapts (`module`, or the
    one its tensors name): shapes, layers, and the weights digest it records, if any."""
    module = module or peft_module(folder)
    lora = read_peft(folder, module)
    spec = _component_of(image, MODULE_KINDS[module])
    weights = module_digest(image, module)
    if _SHA256.match(lora.base_model) and lora.base_model != weights:
        what = module.replace("_", " ")
        raise AdapterError(f"{folder} was trained on the {what} {lora.base_model[:12]}, not "
                           f"the image's {weights[:12]}: train it on this image's {what}")
    if module == "backbone":
        cfg = LlamaConfig.from_dict(spec["config"])
        decode_tensors(lora, cfg.n_layers, sizes_for(cfg))
    else:
        bert = BertConfig.from_dict(spec["config"])
        fused_layers(lora, bert.num_hidden_layers, sizes_for(bert))
    return lora


def fit_head(folder: Path, image: Manifest) -> Head:
    """A task head (linear or an MLP), checked to take the image's text-encoder vectors
    (its first layer's input)."""
    encoder = _component_of(image, "bert")
    head = read_head(folder)
    dim = int(encoder.get("dimensions") or encoder.get("config", {}).get("hidden_size", 0))
    if head.dim != dim:
        raise AdapterError(f"{folder}: the head takes {head.dim}-dimensional vectors, the "
                           f"image's text encoder gives {dim}")
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
        lora = fit_lora(folder, image, str(spec["module"]))
        if (lora.rank, lora.targets) != (spec["rank"], sorted(spec["targets"])):
            raise AdapterError(f"{folder}: rank {lora.rank} and targets {lora.targets} are "
                               f"not the manifest's {spec['rank']} and {spec['targets']}")
    else:
        head = fit_head(folder, image)
        if head.labels != list(spec["labels"]):
            raise AdapterError(f"{folder}: the head's labels are not the manifest's")


def component_spec(folder: Path, component: str, adapter: Lora | Head, base: str = "") -> dict[str, Any]:
    """The manifest entry (image or add-on) of an adapter whose files are in `folder` and go
    under ``adapters/<component>``: a LoRA on the backbone or the text encoder (`base`: the
    module's weights' sha256 it is pinned to) or a head on the text encoder (with the LoRA
    component it runs with, if any), with its held-out metrics."""
    spec: dict[str, Any]
    if isinstance(adapter, Lora):
        spec = {"kind": "lora", "module": adapter.module, "rank": adapter.rank,
                "alpha": adapter.alpha, "targets": adapter.targets, "base": base}
    else:
        spec = {"kind": "head", "module": "text_encoder", "labels": adapter.labels,
                **({"lora": adapter.lora} if adapter.lora else {})}
    return {**spec, "dir": f"adapters/{component}", "metrics": _metrics(folder),
            **_response_schema(folder)}


def _response_schema(folder: Path) -> dict[str, str]:
    """{"response_schema": JSON text} when the adapter's folder has the JSON schema its
    answers keep to (``response_schema.json``; its tasks enforce it), else {}."""
    path = folder / RESPONSE_SCHEMA
    if not path.is_file():
        return {}
    try:
        schema = json.loads(path.read_text())
    except ValueError as exc:
        raise AdapterError(f"{path}: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise AdapterError(f"{path}: must be a JSON object (a JSON schema)")
    return {"response_schema": json.dumps(schema, separators=(",", ":"), sort_keys=False)}


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
    if spec["module"] == "text_encoder":
        if flags.rpc not in ("", "Embed"):
            raise AdapterError("a LoRA on the text encoder serves Embed (--rpc Embed)")
        return {"id": task_id, "path": 3, "modules": ["text_encoder"], "head": "mean_pool_l2",
                "adapter": component, "rpc": "Embed",
                "description": flags.description or f"Sentence embeddings through the {name} "
                "add-on's LoRA on the text encoder.",
                "inputs": [{"name": "texts", "kind": "texts", "description": "The texts."}],
                "outputs": [{"name": "embeddings", "kind": "tensor", "dtype": "float32",
                             "shape": [-1, -1], "description": "One vector per text."}]}
    if flags.rpc not in ("", "Generate"):
        raise AdapterError("a backbone adapter serves Generate (--rpc Generate)")
    return {"id": task_id, "path": 2, "modules": ["backbone"], "head": "lm_head",
            "adapter": component, "prompt_template": check_template(flags.prompt_template or
                                                                    "chat"),
            "rpc": "Generate", "streaming": True,
            **({"response_schema": spec["response_schema"]} if spec.get("response_schema") else {}),
            "description": flags.description or f"Generation through the {name} add-on's "
            "adapter.",
            "inputs": [{"name": "prompt", "kind": "text", "description": "The request."}],
            "outputs": [{"name": "text", "kind": "text", "description": "The answer."}]}


def pack_addon(base_image: Path, out: Path, *, name: str, version: str, key: Path | None,
               peft: Path | None = None, head: Path | None = None, component: str = "",
               tasks: list[dict[str, Any]] | None = None, flags: TaskFlags = TaskFlags(),
               force: bool = False) -> VerifiedAddon:
    """Checks the adapter against `base_image` and writes the add-on at `out`: a directory,
    or its install tar when `out` ends in .tar. A head with a PEFT folder (a LoRA on the text
    encoder) ships both, the head running with that LoRA (`component`: the head's name; the
    LoRA's is NAME-lora). `tasks` (the image manifest's task schema; a missing adapter is
    this component) or else `flags` say what it serves."""
    if peft is None and head is None:
        raise AdapterError("give an adapter: a PEFT folder (--peft), a task head (--head), "
                           "or a head with the LoRA on the text encoder it was trained with")
    image = verify_image(base_image)  # every hash: the digest pinned is that of these bytes
    component = check_name(component or f"{name}-{'head' if head else 'lora'}", "component")
    specs: dict[str, dict[str, Any]] = {}
    folders: dict[str, Path] = {}
    if peft is not None:
        lora = fit_lora(peft, image.manifest)
        lora_name = check_name(f"{name}-lora", "component") if head else component
        if head is not None and lora.module != "text_encoder":
            raise AdapterError(f"{peft} adapts the {lora.module}: a head runs with a LoRA on "
                               "the text encoder")
        specs[lora_name] = component_spec(peft, lora_name, lora,
                                          base=module_digest(image.manifest, lora.module))
        folders[lora_name] = peft
    if head is not None:
        spec = component_spec(head, component, fit_head(head, image.manifest))
        spec.pop("lora", None)  # the LoRA it runs with is the one shipped beside it, if any
        specs[component] = {**spec, **({"lora": f"{name}-lora"} if peft else {})}
        folders[component] = head
    served = [dict(t, adapter=t.get("adapter") or component) for t in tasks] if tasks \
        else [_task(flags, component, specs[component], name)]
    for t in served:
        if t.get("rpc") == "Generate":
            check_template(str(t.get("prompt_template") or ""))
    payload = {f"adapters/{c}/{f}": folders[c] / f for c, spec in specs.items()
               for f in COMPONENT_FILES[spec["kind"]]}

    def write(directory: Path, replace: bool) -> VerifiedAddon:
        return write_addon(directory, name=check_name(name, "add-on"), version=version,
                           base=image.digest, components=specs, tasks=served,
                           payload=payload, key=key, force=replace)

    if out.suffix != ".tar":
        return write(out, force)
    if out.exists() and not force:
        raise AdapterError(f"{out} already exists; pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=out.parent) as tmp:
        addon = write(Path(tmp) / "addon", False)
        write_addon_tar(addon.path, out)
    return dataclasses.replace(addon, path=out.resolve())  # the tar: the directory is gone
