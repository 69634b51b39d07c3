"""m4image.manifest: round trip and every validation error, on small hand-made manifests."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from m4image.manifest import (
    FORMAT,
    MAX_MANIFEST_BYTES,
    FileEntry,
    IOSpec,
    Manifest,
    ManifestError,
    SelfTest,
    Task,
    build_manifest,
)

SHA = "ab" * 32


def task(**over: Any) -> dict[str, Any]:
    t = Task(
        id="embed", path=3, modules=["text_encoder"], head="mean_pool_l2", rpc="Embed",
        description="Embed texts.", inputs=[IOSpec("texts", "texts", "Texts.")],
        outputs=[IOSpec("embeddings", "tensor", "Vectors.", dtype="float32", shape=[-1, 4])],
    ).to_dict()
    t.update(over)
    return t


def raw(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "format": FORMAT,
        "name": "tiny",
        "version": "1.0.0",
        "security_version": 3,
        "compatible": "m4-cpu-v1",
        "min_daemon_version": "0.1.0",
        "created": "2025-01-01T00:00:00Z",
        "files": {"text_encoder/model.safetensors": {"size": 10, "sha256": SHA}},
        "components": {"text_encoder": {"kind": "bert", "weights": "text_encoder/model.safetensors"}},
        "tasks": [task()],
        "self_test": [{"task": "embed", "input": {"query": "q", "candidates": ["a", "b"]}, "expected_best": 1}],
    }
    d.update(over)
    return d


def parse(d: Any) -> Manifest:
    return Manifest.from_json(json.dumps(d).encode())


def test_round_trip_is_canonical() -> None:
    m = parse(raw())
    data = m.to_json()
    assert Manifest.from_json(data) == m
    assert Manifest.from_json(data).to_json() == data
    assert data == (json.dumps(json.loads(data), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    assert m.files["text_encoder/model.safetensors"] == FileEntry(10, SHA)
    assert m.task("embed").outputs[0].shape == [-1, 4]
    assert m.self_test_specs()[0].expected_best == 1
    assert "expected_token_ids" not in m.self_test[0]  # only set keys are written


def test_task_defaults_are_filled() -> None:
    t = task()
    for key in ("m4_id", "adapter", "prompt_template", "labels", "streaming"):
        del t[key]
    m = parse(raw(tasks=[t]))
    assert m.tasks[0]["m4_id"] == "" and m.tasks[0]["labels"] == [] and m.tasks[0]["streaming"] is False
    assert "response_schema" not in m.tasks[0]  # written only when a task has one
    t["response_schema"] = '{"type": "object"}'
    assert parse(raw(tasks=[t])).task("embed").response_schema == '{"type": "object"}'


def test_build_manifest_accepts_dataclasses() -> None:
    m = build_manifest(
        name="x", version="1", security_version=0, compatible="c", min_daemon_version="0",
        created="now", files={"a/b": FileEntry(1, SHA)}, components={"text_encoder": {"kind": "bert"}},
        tasks=[Task.from_dict(task(), "t")],
        self_test=[SelfTest(task="embed", input="x", max_tokens=2, expected_token_ids=[1, 2])],
    )
    assert m.self_test[0]["expected_token_ids"] == [1, 2]


def test_unicode_is_utf8_not_escaped() -> None:
    m = parse(raw(name="modèle"))
    assert "modèle".encode() in m.to_json()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="m4-image/2"), "format"),
        (lambda d: d.pop("format"), "format"),
        (lambda d: d.pop("name"), "manifest.name: missing"),
        (lambda d: d.pop("files"), "manifest.files: missing"),
        (lambda d: d.pop("self_test"), "manifest.self_test: missing"),
        (lambda d: d.update(version=1), "manifest.version: expected a string"),
        (lambda d: d.update(security_version="3"), "manifest.security_version: expected an integer"),
        (lambda d: d.update(security_version=True), "manifest.security_version: expected an integer"),
        (lambda d: d.update(security_version=-1), "security_version: must be >= 0"),
        (lambda d: d.update(tasks={}), "manifest.tasks: expected a list"),
        (lambda d: d.update(surprise=1), "manifest.surprise: unknown key"),
        (lambda d: d["files"]["text_encoder/model.safetensors"].pop("sha256"), "sha256: missing"),
        (lambda d: d["files"]["text_encoder/model.safetensors"].update(size="10"), "size: expected an integer"),
        (lambda d: d["files"]["text_encoder/model.safetensors"].update(size=-1), "size: must be >= 0"),
        (lambda d: d["files"]["text_encoder/model.safetensors"].update(sha256="XYZ"), "64 lowercase hex"),
        (lambda d: d["components"].update(x=[]), "components['x']: expected an object"),
        (lambda d: d["components"]["text_encoder"].pop("kind"), "components['text_encoder'].kind"),
        (lambda d: d["tasks"][0].pop("rpc"), "tasks[0].rpc: missing"),
        (lambda d: d["tasks"][0].update(path=4), "tasks[0].path: must be 1, 2 or 3"),
        (lambda d: d["tasks"][0].update(rpc="Fly"), "tasks[0].rpc"),
        (lambda d: d["tasks"][0].update(id=""), "tasks[0].id"),
        (lambda d: d["tasks"][0].update(streaming="yes"), "tasks[0].streaming: expected a boolean"),
        (lambda d: d["tasks"][0].update(labels=[1]), "tasks[0].labels[0]: expected a string"),
        (lambda d: d["tasks"][0].update(modules=["vision"]), "'vision' is not a component"),
        (lambda d: d["tasks"][0].update(color="red"), "tasks[0].color: unknown key"),
        (lambda d: d["tasks"][0].update(response_schema="{not json"), "tasks[0].response_schema: not JSON"),
        (lambda d: d["tasks"][0].update(response_schema="[1]"), "tasks[0].response_schema: must be a JSON object"),
        (lambda d: d["tasks"][0]["inputs"][0].update(kind="smell"), "tasks[0].inputs[0].kind"),
        (lambda d: d["tasks"][0]["inputs"][0].pop("name"), "tasks[0].inputs[0].name: missing"),
        (lambda d: d["tasks"][0]["outputs"][0].update(shape=["a"]), "tasks[0].outputs[0].shape[0]"),
        (lambda d: d["tasks"].append(task()), "duplicate task id 'embed'"),
        (lambda d: d["self_test"][0].update(task="chat"), "self_test[0].task: 'chat' is not in the task table"),
        (lambda d: d["self_test"][0].pop("input"), "self_test[0].input: missing"),
        (lambda d: d["self_test"][0].update(input=3), "self_test[0].input"),
        (lambda d: d["self_test"][0].update(expected_token_ids=[1, "2"]), "self_test[0].max_tokens"),
        (lambda d: d["self_test"][0].update(max_tokens=3, expected_token_ids=[1, "2"]),
         "self_test[0].expected_token_ids[1]"),
        (lambda d: d["self_test"][0].update(expected_scores=["x"]), "self_test[0].expected_scores[0]"),
    ],
)
def test_validation_names_the_key(mutate: Any, message: str) -> None:
    d = copy.deepcopy(raw())
    mutate(d)
    with pytest.raises(ManifestError, match=None) as err:
        parse(d)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"{not json", "not valid UTF-8 JSON"),
        (b"[]", "top level"),
        (b"null", "top level"),
    ],
)
def test_bad_bytes(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(data)


def test_size_cap() -> None:
    d = raw(name="x" * MAX_MANIFEST_BYTES)
    with pytest.raises(ManifestError, match="over the 1048576-byte limit"):
        parse(d)
