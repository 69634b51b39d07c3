"""Add-on, manifest: task adapters shipped apart from a firmware image, pinned to one image.

An add-on is a directory (or the uncompressed tar of it, for transfer) signed like an image::

    addon.json    the manifest (format m4-addon/1, below); its exact bytes are signed
    addon.sig     ed25519 over those bytes by a vendor key (format m4-sig/1, m4image.signature)
    adapters/<component>/...   each component's files, as ``files`` lists them

``addon.json``::

    {"format": "m4-addon/1", "name": "travel", "version": "1.0.0", "created": RFC 3339,
     "base": "<digest of the image it is for: sha256 of that image's manifest.json>",
     "components": {"<name>": {"kind": "lora", "module": "backbone", "dir": "adapters/<name>",
                               "rank": 8, "alpha": 16, "targets": [...],
                               "base": "<sha256 of the image's backbone weights file>",
                               "metrics": {...}},
                    "<name>": {"kind": "lora", "module": "text_encoder", ...,
                               "base": "<sha256 of the image's text encoder weights file>"},
                    "<name>": {"kind": "head", "module": "text_encoder", "dir": ...,
                               "labels": [...], "lora": "<a text_encoder lora it runs with>",
                               "metrics": {...}}},
     "tasks": [<task, the image manifest's schema (m4image.manifest.Task)>, ...],
     "files": {"<path>": {"size": int, "sha256": hex}, ...}}

A component is what an image's ``lora`` and ``head`` components are (the PEFT files
``adapter_config.json`` + ``adapter_model.safetensors``, or ``head.json`` +
``head.safetensors``), its ``dir`` relative to the add-on. A task's ``adapter`` names a
component of the add-on or of the base image; so does a head's ``lora`` (optional: the LoRA on
the text encoder the head was trained with, which its Classify runs the encoder through).

``AddonManifest.from_json`` checks what the add-on says of itself; ``check_base`` checks it
against the image it would join (its digest, its backbone, its components, the task ids
already served), with one exception class per refusal. Verifying the files and the
signature is ``m4image.addon_io``; the store is ``m4image.addon_store``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from m4image.fsutil import canonical_json
from m4image.layout import Layout
from m4image.manifest import FileEntry, ImageError, Manifest, ManifestError, Task

__all__ = [
    "ADDON",
    "ADDON_FORMAT",
    "COMPONENT_FILES",
    "AdapterMismatchError",
    "AddonError",
    "AddonManifest",
    "AddonManifestError",
    "ComponentClashError",
    "OtherBaseError",
    "TaskClashError",
    "build_addon_manifest",
    "check_base",
    "check_name",
]

ADDON_FORMAT = "m4-addon/1"
MAX_ADDON_MANIFEST_BYTES = 256 * 1024
ADDON = Layout(
    kind="add-on", manifest="addon.json", signature="addon.sig",
    max_manifest_bytes=MAX_ADDON_MANIFEST_BYTES,
    sign="`m4ctl adapter pack ... --key VENDOR.key`",
    rebuild="pack the add-on again (m4ctl adapter pack)",
    remove="remove unused add-ons with `m4ctl adapter remove NAME`",
    tar="`m4ctl adapter pack ... --out FILE.tar`")
# the files each component kind holds, under its dir
COMPONENT_FILES = {"lora": ("adapter_config.json", "adapter_model.safetensors"),
                   "head": ("head.json", "head.safetensors")}
COMPONENT_MODULES = {"lora": ("backbone", "text_encoder"), "head": ("text_encoder",)}
MODULE_KINDS = {"backbone": "llama", "text_encoder": "bert"}  # the image component a module is
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPACK = "pack it again with `m4ctl adapter pack`"


class AddonError(ImageError):
    """Base of the add-on refusals (FAILED_PRECONDITION, like the image's)."""


class AddonManifestError(ManifestError, AddonError):
    """addon.json is not JSON or does not match the m4-addon/1 schema."""


class OtherBaseError(AddonError):
    """The add-on is pinned to another image (or its adapter to another backbone)."""


class TaskClashError(AddonError):
    """A task id of the add-on is already served (by the image or another add-on)."""


class ComponentClashError(AddonError):
    """A component of the add-on is named like one of the base image's."""


class AdapterMismatchError(AddonError):
    """An adapter's files do not fit the image (shapes, layers, labels) or its manifest."""


def check_name(name: str, what: str) -> str:
    """An add-on or component name: lower-case letters, digits, '.', '_' and '-'."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AddonManifestError(
            f"{what} {name!r} is not a name: 1 to 64 lower-case letters, digits, '.', '_' or "
            f"'-', starting with a letter or digit; {_REPACK}")
    return name


def _need(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    value = d.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise AddonManifestError(f"{where}.{key}: missing or of the wrong type; {_REPACK}")
    return value


def _component(name: str, spec: Any, files: Collection[str]) -> dict[str, Any]:
    where = f"components[{name!r}]"
    check_name(name, "component")
    if not isinstance(spec, dict):
        raise AddonManifestError(f"{where}: expected an object")
    kind = _need(spec, "kind", str, where)
    if kind not in COMPONENT_FILES:
        raise AddonManifestError(f"{where}.kind: {kind!r}; an add-on holds "
                                 f"{' and '.join(COMPONENT_FILES)} components")
    module = _need(spec, "module", str, where)
    if module not in COMPONENT_MODULES[kind]:
        raise AddonManifestError(f"{where}.module: a {kind} adapts the "
                                 f"{' or the '.join(COMPONENT_MODULES[kind])}, not {module!r}")
    folder = _need(spec, "dir", str, where).rstrip("/")
    for needed in COMPONENT_FILES[kind]:
        if f"{folder}/{needed}" not in files:
            raise AddonManifestError(f"{where}: {folder}/{needed} is not among the add-on's "
                                     f"files; {_REPACK}")
    if not isinstance(spec.get("metrics", {}), dict):
        raise AddonManifestError(f"{where}.metrics: expected an object")
    if kind == "lora":
        _need(spec, "rank", int, where)
        alpha = _need(spec, "alpha", (int, float), where)
        if not math.isfinite(alpha):
            raise AddonManifestError(f"{where}.alpha: must be a finite number")
        if not all(isinstance(t, str) for t in _need(spec, "targets", list, where)):
            raise AddonManifestError(f"{where}.targets: expected a list of strings")
        if not _SHA256.match(_need(spec, "base", str, where)):
            raise AddonManifestError(f"{where}.base: expected the sha256 of the {module} "
                                     "weights it was trained on")
    else:
        labels = _need(spec, "labels", list, where)
        if len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise AddonManifestError(f"{where}.labels: expected two or more label strings")
        if "lora" in spec:
            check_name(_need(spec, "lora", str, where), "component")
    return dict(spec, dir=folder)


@dataclass(frozen=True)
class AddonManifest:
    """``addon.json`` of an m4-addon/1 add-on, validated on its own (``check_base`` checks
    it against an image)."""

    name: str
    version: str
    base: str  # the image digest it is pinned to
    created: str
    components: dict[str, dict[str, Any]]
    tasks: list[dict[str, Any]]  # validated, normalised task dicts (Task.to_dict())
    files: dict[str, FileEntry]
    format: str = ADDON_FORMAT

    @classmethod
    def from_json(cls, data: bytes) -> AddonManifest:
        if len(data) > MAX_ADDON_MANIFEST_BYTES:
            raise AddonManifestError(f"addon.json is {len(data)} bytes, over the "
                                     f"{MAX_ADDON_MANIFEST_BYTES}-byte limit")
        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AddonManifestError(f"addon.json is not valid UTF-8 JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> AddonManifest:
        if not isinstance(d, dict) or d.get("format") != ADDON_FORMAT:
            got = d.get("format") if isinstance(d, dict) else None
            raise AddonManifestError(f"format: {got!r} is not supported (expected "
                                     f"{ADDON_FORMAT!r}); use a newer daemon or {_REPACK}")
        keys = {"format", "name", "version", "base", "created", "components", "tasks", "files"}
        if set(d) != keys:
            raise AddonManifestError(f"addon.json: keys {sorted(set(d) ^ keys)} are missing "
                                     f"or unknown (format {ADDON_FORMAT})")
        name = check_name(d["name"], "add-on")
        version = _need(d, "version", str, "addon")
        if not version:
            raise AddonManifestError("addon.version: must not be empty")
        if not _SHA256.match(_need(d, "base", str, "addon")):
            raise AddonManifestError("addon.base: expected the digest (64 hex digits) of the "
                                     "image the add-on is for")
        _need(d, "created", str, "addon")
        files = {p: FileEntry.from_dict(e, f"files[{p!r}]")
                 for p, e in _need(d, "files", dict, "addon").items()}
        components = {n: _component(n, s, files)
                      for n, s in _need(d, "components", dict, "addon").items()}
        if not components:
            raise AddonManifestError("addon.components: an add-on holds at least one adapter")
        tasks = [Task.from_dict(t, f"tasks[{i}]")
                 for i, t in enumerate(_need(d, "tasks", list, "addon"))]
        ids = [t.id for t in tasks]
        for t in tasks:
            if ids.count(t.id) > 1:
                raise AddonManifestError(f"tasks: duplicate task id {t.id!r}")
        return cls(name=name, version=version, base=d["base"], created=d["created"],
                   components=components, tasks=[t.to_dict() for t in tasks], files=files)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "name": self.name, "version": self.version,
                "base": self.base, "created": self.created, "components": self.components,
                "tasks": list(self.tasks),
                "files": {p: e.to_dict() for p, e in sorted(self.files.items())}}

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, 2-space indent, UTF-8, trailing newline."""
        return canonical_json(self.to_dict())


def build_addon_manifest(*, name: str, version: str, base: str, created: str,
                         components: dict[str, dict[str, Any]],
                         tasks: Sequence[Task | dict[str, Any]],
                         files: dict[str, FileEntry]) -> AddonManifest:
    """Assemble an add-on manifest and validate it as a reader would (JSON round trip)."""
    raw = {"format": ADDON_FORMAT, "name": name, "version": version, "base": base,
           "created": created, "components": components,
           "tasks": [t.to_dict() if isinstance(t, Task) else t for t in tasks],
           "files": {p: e.to_dict() for p, e in files.items()}}
    return AddonManifest.from_json(canonical_json(raw))


def check_base(addon: AddonManifest, image: Manifest, digest: str,
               served: Collection[str] = ()) -> None:
    """Whether `addon` may join `image` (whose digest is `digest`), beside the task ids
    `served` (other add-ons'; the image's own are checked here). Raises OtherBaseError,
    ComponentClashError, TaskClashError or AddonManifestError, each saying what to do."""
    label = f"{image.name} {image.version} ({digest[:12]})"
    if addon.base != digest:
        raise OtherBaseError(
            f"add-on {addon.name} {addon.version} is built for the image {addon.base[:12]}, "
            f"not for {label}, which this daemon serves; pack it again with "
            "`m4ctl adapter pack --base-image` pointing at the image served")
    for name, spec in addon.components.items():
        if name in image.components:
            raise ComponentClashError(
                f"add-on {addon.name}: component {name!r} is named like a component of the "
                f"image {label}; rename it and pack again")
        module = str(spec.get("module"))
        adapted = next((s for s in image.components.values()
                        if s.get("kind") == MODULE_KINDS.get(module)), None)
        weights = image.files.get(str(adapted.get("weights"))) if adapted else None
        what = module.replace("_", " ")
        if spec["kind"] == "lora" and (weights is None or spec["base"] != weights.sha256):
            raise OtherBaseError(
                f"add-on {addon.name}: adapter {name!r} was trained on the {what} "
                f"{spec['base'][:12]}, and the image {label} has "
                f"{weights.sha256[:12] if weights else f'no {what}'}; train it on this "
                f"image's {what} and pack it again")
        lora = spec.get("lora") or ""
        used = addon.components.get(lora) or image.components.get(lora) if lora else None
        if lora and (used is None or used.get("kind") != "lora"
                     or used.get("module") != "text_encoder"):
            raise AddonManifestError(
                f"add-on {addon.name}: head {name!r} runs with {lora!r}, which is neither a "
                "LoRA on the text encoder in the add-on nor one of the image's")
    own = {t["id"] for t in image.tasks}
    for task in addon.tasks:
        tid = task["id"]
        if tid in own or tid in served:
            whose = f"the image {label}" if tid in own else "another installed add-on"
            raise TaskClashError(
                f"add-on {addon.name}: task id {tid!r} is already served by {whose}; give "
                "the task another id and pack it again (or remove the other add-on)")
        _check_task(addon, image, task)


def _check_task(addon: AddonManifest, image: Manifest, task: dict[str, Any]) -> None:
    where = f"add-on {addon.name}: task {task['id']!r}"
    missing = [m for m in task["modules"] if m not in image.components]
    if missing:
        raise AddonManifestError(f"{where} runs on {', '.join(missing)}, which the image "
                                 "does not have")
    name = task.get("adapter") or ""
    if not name:
        return
    spec = addon.components.get(name) or image.components.get(name)
    if spec is None or spec.get("kind") not in COMPONENT_FILES:
        raise AddonManifestError(f"{where} names adapter {name!r}, which is neither a "
                                 "component of the add-on nor an adapter of the image")
    if spec["kind"] == "lora" and spec.get("module") not in task["modules"]:
        raise AddonManifestError(f"{where}: adapter {name!r} adapts the {spec.get('module')}, "
                                 "which the task does not run on")
    if spec["kind"] == "head":
        if task["head"] != "linear_head" or task["rpc"] != "Classify":
            raise AddonManifestError(f"{where}: a task head ({name!r}) serves Classify with "
                                     "head 'linear_head'")
        unknown = sorted(set(task["labels"]) - set(spec["labels"]))
        if unknown:
            raise AddonManifestError(f"{where}: labels {unknown} are not the head's")
