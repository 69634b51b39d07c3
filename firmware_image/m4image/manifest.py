"""Firmware image, manifest: the typed, strictly validated contents of ``manifest.json``.

The manifest is the image's table of contents and its contract with the daemon: files and
their hashes, components with their configs, the task table ``ListTasks`` serves, and the
self-test the daemon runs before an image is marked good. Parsing rejects anything it does not
understand (unknown format, missing or unknown keys, wrong types), naming the offending key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from m4image.fsutil import canonical_json

FORMAT = "m4-image/1"
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_SIGNATURE_BYTES = 4096  # manifest.sig is a small JSON document (see m4image.signature)

IO_KINDS = ("text", "chat", "texts", "image", "audio", "tensor")
TASK_RPCS = ("Generate", "Embed", "Classify", "PredictNext", "Run")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ImageError(Exception):
    """Base of every firmware image failure."""


class ManifestError(ImageError):
    """manifest.json is missing, too large, not JSON, or does not match the m4-image/1 schema."""


# ---------------------------------------------------------------------------------------------
# Validation helpers: each names the key path in its message.

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}


def _check(d: Any, where: str, required: dict[str, type], optional: dict[str, type] | None = None) -> None:
    optional = optional or {}
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    for key in d:
        if key not in required and key not in optional:
            raise ManifestError(f"{where}.{key}: unknown key (format {FORMAT} does not define it)")
    for key in required:
        if key not in d:
            raise ManifestError(f"{where}.{key}: missing required key")
    for key, typ in {**required, **optional}.items():
        if key in d:
            _check_type(d[key], typ, f"{where}.{key}", allow_none=key in optional)


def _check_type(value: Any, typ: type, where: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ManifestError(f"{where}: expected {_TYPE_NAMES.get(typ, typ.__name__)}, got {type(value).__name__}")


def _str_list(value: list[Any], where: str) -> list[str]:
    for i, v in enumerate(value):
        _check_type(v, str, f"{where}[{i}]")
    return list(value)


def _int_list(value: list[Any], where: str) -> list[int]:
    for i, v in enumerate(value):
        _check_type(v, int, f"{where}[{i}]")
    return list(value)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        _check(d, where, {"size": int, "sha256": str})
        if d["size"] < 0:
            raise ManifestError(f"{where}.size: must be >= 0")
        if not _SHA256.match(d["sha256"]):
            raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits")
        return cls(size=d["size"], sha256=d["sha256"])

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a task (mirrors m4.inference.v1.IOSpec)."""

    name: str
    kind: str
    description: str = ""
    required: bool = True
    dtype: str = ""
    shape: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> IOSpec:
        _check(d, where, {"name": str, "kind": str}, {"description": str, "required": bool, "dtype": str, "shape": list})
        if d["kind"] not in IO_KINDS:
            raise ManifestError(f"{where}.kind: {d['kind']!r} is not one of {', '.join(IO_KINDS)}")
        return cls(
            name=d["name"],
            kind=d["kind"],
            description=d.get("description") or "",
            required=True if d.get("required") is None else d["required"],
            dtype=d.get("dtype") or "",
            shape=_int_list(d.get("shape") or [], f"{where}.shape"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "required": self.required,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }


def _json_object_text(text: str, where: str) -> str:
    """`text` when it is empty or a JSON object (a JSON schema); ManifestError otherwise."""
    if not text:
        return ""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"{where}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: must be a JSON object (a JSON schema)")
    return text


@dataclass(frozen=True)
class Task:
    """One entry of the task table (mirrors m4.inference.v1.Task)."""

    id: str
    path: int
    description: str
    modules: list[str]
    head: str
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    rpc: str
    m4_id: str = ""
    adapter: str = ""
    prompt_template: str = ""
    labels: list[str] = field(default_factory=list)
    streaming: bool = False
    response_schema: str = ""  # JSON schema (text) the output keeps to, enforced while decoding

    _REQUIRED: ClassVar[dict[str, type]] = {"id": str, "path": int, "description": str, "modules": list, "head": str,
                 "inputs": list, "outputs": list, "rpc": str}  # fmt: skip
    _OPTIONAL: ClassVar[dict[str, type]] = {"m4_id": str, "adapter": str, "prompt_template": str, "labels": list, "streaming": bool,
                                            "response_schema": str}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Task:
        _check(d, where, cls._REQUIRED, cls._OPTIONAL)
        if d["path"] not in (1, 2, 3):
            raise ManifestError(f"{where}.path: must be 1, 2 or 3 (the M4 path), got {d['path']}")
        if d["rpc"] not in TASK_RPCS:
            raise ManifestError(f"{where}.rpc: {d['rpc']!r} is not one of {', '.join(TASK_RPCS)}")
        if not d["id"]:
            raise ManifestError(f"{where}.id: must not be empty")
        return cls(
            id=d["id"],
            path=d["path"],
            description=d["description"],
            modules=_str_list(d["modules"], f"{where}.modules"),
            head=d["head"],
            inputs=[IOSpec.from_dict(x, f"{where}.inputs[{i}]") for i, x in enumerate(d["inputs"])],
            outputs=[IOSpec.from_dict(x, f"{where}.outputs[{i}]") for i, x in enumerate(d["outputs"])],
            rpc=d["rpc"],
            m4_id=d.get("m4_id") or "",
            adapter=d.get("adapter") or "",
            prompt_template=d.get("prompt_template") or "",
            labels=_str_list(d.get("labels") or [], f"{where}.labels"),
            streaming=bool(d.get("streaming")),
            response_schema=_json_object_text(d.get("response_schema") or "", f"{where}.response_schema"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "m4_id": self.m4_id,
            "path": self.path,
            "description": self.description,
            "modules": list(self.modules),
            "adapter": self.adapter,
            "head": self.head,
            "prompt_template": self.prompt_template,
            "labels": list(self.labels),
            "inputs": [x.to_dict() for x in self.inputs],
            "outputs": [x.to_dict() for x in self.outputs],
            "rpc": self.rpc,
            "streaming": self.streaming,
            **({"response_schema": self.response_schema} if self.response_schema else {}),
        }


@dataclass(frozen=True)
class SelfTest:
    """A check the daemon runs after loading an image, before marking it good.

    Generation checks: ``input`` is the prompt (``generate``) or a list of chat messages
    ``[{"role", "content"}]`` (``chat``); ``expected_token_ids``/``expected_text`` are the greedy
    output of the float32 reference path for ``max_tokens`` new tokens.
    Embedding checks: ``input`` is ``{"query": str, "candidates": [str, ...]}``;
    ``expected_best`` is the index of the candidate nearest the query (cosine) and
    ``expected_scores`` the reference similarities (informative, rounded).
    """

    task: str
    input: Any
    max_tokens: int | None = None
    expected_text: str | None = None
    expected_token_ids: list[int] | None = None
    expected_best: int | None = None
    expected_scores: list[float] | None = None

    _OPTIONAL: ClassVar[dict[str, type]] = {"max_tokens": int, "expected_text": str,
                                            "expected_token_ids": list, "expected_best": int,
                                            "expected_scores": list}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any, where: str) -> SelfTest:
        _check(d, where, {"task": str, "input": object}, cls._OPTIONAL)
        if not isinstance(d["input"], (str, list, dict)):
            raise ManifestError(f"{where}.input: expected a string, a list or an object")
        scores = d.get("expected_scores")
        if scores is not None:
            for i, s in enumerate(scores):
                if not isinstance(s, (int, float)) or isinstance(s, bool):
                    raise ManifestError(f"{where}.expected_scores[{i}]: expected a number")
        ids = d.get("expected_token_ids")
        if ids is not None and d.get("max_tokens") is None:
            raise ManifestError(f"{where}.max_tokens: required with expected_token_ids")
        return cls(
            task=d["task"],
            input=d["input"],
            max_tokens=d.get("max_tokens"),
            expected_text=d.get("expected_text"),
            expected_token_ids=None if ids is None else _int_list(ids, f"{where}.expected_token_ids"),
            expected_best=d.get("expected_best"),
            expected_scores=None if scores is None else [float(s) for s in scores],
        )

    def to_dict(self) -> dict[str, Any]:
        """Only the keys that are set (the daemon dispatches on which keys are present)."""
        d: dict[str, Any] = {"task": self.task, "input": self.input}
        for key in self._OPTIONAL:
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of an m4-image/1 firmware image."""

    name: str
    version: str
    security_version: int
    compatible: str
    min_daemon_version: str
    created: str
    files: dict[str, FileEntry]
    components: dict[str, dict[str, Any]]
    tasks: list[dict[str, Any]]  # validated and normalised task dicts (Task.to_dict())
    self_test: list[dict[str, Any]]  # validated self-test dicts (SelfTest.to_dict())
    format: str = FORMAT

    _REQUIRED: ClassVar[dict[str, type]] = {"format": str, "name": str, "version": str, "security_version": int,
                 "compatible": str, "min_daemon_version": str, "created": str, "files": dict,
                 "components": dict, "tasks": list, "self_test": list}  # fmt: skip

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate manifest bytes; raises ``ManifestError`` naming the bad key."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{MANIFEST_NAME} is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit; "
                "this is not an image this daemon can load"
            )
        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{MANIFEST_NAME} is not valid UTF-8 JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{MANIFEST_NAME}: expected a JSON object at the top level")
        fmt = d.get("format")
        if fmt != FORMAT:
            raise ManifestError(f"format: {fmt!r} is not supported (expected {FORMAT!r}); use a newer daemon or rebuild the image")
        _check(d, "manifest", cls._REQUIRED)
        if d["security_version"] < 0:
            raise ManifestError("manifest.security_version: must be >= 0")
        files = {p: FileEntry.from_dict(e, f"files[{p!r}]") for p, e in d["files"].items()}
        for cname, comp in d["components"].items():
            where = f"components[{cname!r}]"
            if not isinstance(comp, dict):
                raise ManifestError(f"{where}: expected an object")
            if not isinstance(comp.get("kind"), str):
                raise ManifestError(f"{where}.kind: missing or not a string")
        tasks = [Task.from_dict(t, f"tasks[{i}]") for i, t in enumerate(d["tasks"])]
        ids = [t.id for t in tasks]
        for t in tasks:
            if ids.count(t.id) > 1:
                raise ManifestError(f"tasks: duplicate task id {t.id!r}")
            for m in t.modules:
                if m not in d["components"]:
                    raise ManifestError(f"tasks[{t.id!r}].modules: {m!r} is not a component of this image")
        self_test = [SelfTest.from_dict(s, f"self_test[{i}]") for i, s in enumerate(d["self_test"])]
        for i, s in enumerate(self_test):
            if s.task not in ids:
                raise ManifestError(f"self_test[{i}].task: {s.task!r} is not in the task table")
        return cls(
            format=fmt,
            name=d["name"],
            version=d["version"],
            security_version=d["security_version"],
            compatible=d["compatible"],
            min_daemon_version=d["min_daemon_version"],
            created=d["created"],
            files=files,
            components=d["components"],
            tasks=[t.to_dict() for t in tasks],
            self_test=[c.to_dict() for c in self_test],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "security_version": self.security_version,
            "compatible": self.compatible,
            "min_daemon_version": self.min_daemon_version,
            "created": self.created,
            "files": {p: e.to_dict() for p, e in sorted(self.files.items())},
            "components": self.components,
            "tasks": list(self.tasks),
            "self_test": list(self.self_test),
        }

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, 2-space indent, UTF-8, trailing newline."""
        return canonical_json(self.to_dict())

    def task(self, task_id: str) -> Task:
        """The typed view of one task."""
        for i, t in enumerate(self.tasks):
            if t["id"] == task_id:
                return Task.from_dict(t, f"tasks[{i}]")
        raise KeyError(task_id)

    def self_test_specs(self) -> list[SelfTest]:
        return [SelfTest.from_dict(c, f"self_test[{i}]") for i, c in enumerate(self.self_test)]


def build_manifest(
    *,
    name: str,
    version: str,
    security_version: int,
    compatible: str,
    min_daemon_version: str,
    created: str,
    files: dict[str, FileEntry],
    components: dict[str, dict[str, Any]],
    tasks: list[Task | dict[str, Any]],
    self_test: list[SelfTest | dict[str, Any]],
) -> Manifest:
    """Assemble a manifest and validate it exactly as a reader would (round trip through JSON)."""
    raw = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "security_version": security_version,
        "compatible": compatible,
        "min_daemon_version": min_daemon_version,
        "created": created,
        "files": {p: e.to_dict() for p, e in files.items()},
        "components": components,
        "tasks": [t.to_dict() if isinstance(t, Task) else t for t in tasks],
        "self_test": [c.to_dict() if isinstance(c, SelfTest) else c for c in self_test],
    }
    return Manifest.from_json(canonical_json(raw))
