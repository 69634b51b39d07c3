"""LoRA on the text encoder through a real m4d (M4 path 3 with a LoRA): an image whose task
head names the encoder LoRA it was trained with, and whose Embed task names one, served from
a signed copy of the default image's text encoder; then add-ons holding encoder LoRAs,
packed by the real `m4ctl adapter pack`, installed, called and removed.

The LoRAs are made on the real MiniLM's shapes with a random B (untrained: they visibly move
the vectors) and pinned to its weights; the head has random weights. The answers are checked
against the same files computed in this process (``m4d.adapters.encoder_lora.vectors``, the
served per-row path, which tests/model/test_encoder_lora_serving.py checks against the torch
reference), in float32 (the daemon runs with --compute-dtype float32).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from m4client import AdminClient, Client, M4Error
from m4image.fsutil import sha256_file
from m4image.sign import sign_image

from tests.conftest import DaemonProcess
from tests.integration.imagetools import dev_keys, m4ctl, random_lora, start_store_daemon, variant

TEXTS = ["switch the lamp on please", "it's far too dark in here", "will it rain tomorrow"]
LABELS = ["lights_off", "lights_on", "weather"]


def _lora_folder(image: Path, out: Path, seed: int, targets: list[str]) -> Path:
    return random_lora(image, out, "text_encoder", targets, rank=4, seed=seed)


def _head_folder(out: Path, seed: int, lora: str = "") -> Path:
    from m4d.adapters.heads import Head, write_head

    gen = torch.Generator().manual_seed(seed)
    write_head(out, Head(LABELS, torch.randn(3, 384, generator=gen) * 4, torch.zeros(3), lora))
    return out


def _image(default_image: Path, dst: Path, key: Path, adapters: Path) -> Path:
    """The default image's text encoder alone, with two adapters and their tasks: the head
    "enc-head" (trained, says its head.json, with the LoRA "enc-lora") and an Embed task
    through "enc-lora"; signed with `key`."""
    data = json.loads((default_image / "manifest.json").read_bytes())
    files = {p: e for p, e in data["files"].items() if p.startswith("text_encoder/")}
    tasks = [t for t in data["tasks"] if t["id"] in ("embed", "classify")]
    variant(default_image, dst, None, components={"text_encoder": data["components"]["text_encoder"]},
            tasks=tasks, files=files, self_test=[c for c in data["self_test"] if c["task"] == "embed"],
            version="1.0.0")
    from m4d.adapters.heads import read_head
    from m4d.adapters.lora import read_peft
    from m4d.adapters.pack import component_spec

    data = json.loads((dst / "manifest.json").read_bytes())
    base = data["files"]["text_encoder/model.safetensors"]["sha256"]
    for name in ("enc-lora", "enc-head"):
        src = adapters / name
        spec = (component_spec(src, name, read_peft(src, "text_encoder"), base) if name == "enc-lora"
                else component_spec(src, name, read_head(src)))
        data["components"][name] = spec
        for f in sorted(src.iterdir()):
            rel = f"adapters/{name}/{f.name}"
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(f.read_bytes())
            data["files"][rel] = {"size": f.stat().st_size, "sha256": sha256_file(dst / rel)}
    io = {"inputs": [{"name": "text", "kind": "text", "description": "The text."}],
          "outputs": [{"name": "labels", "kind": "texts", "description": "The labels."}]}
    data["tasks"] += [
        {"id": "lamp-intent", "path": 3, "modules": ["text_encoder"], "head": "linear_head",
         "adapter": "enc-head", "labels": LABELS, "rpc": "Classify", "streaming": False,
         "description": "The head, through its LoRA on the encoder.", **io},
        {"id": "embed-tuned", "path": 3, "modules": ["text_encoder"], "head": "mean_pool_l2",
         "adapter": "enc-lora", "rpc": "Embed", "streaming": False,
         "description": "Embeddings through the LoRA.",
         "inputs": [{"name": "texts", "kind": "texts", "description": "The texts."}],
         "outputs": [{"name": "embeddings", "kind": "tensor", "description": "The vectors."}]}]
    (dst / "manifest.json").write_bytes(
        (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode())
    sign_image(dst, key)
    return dst


@pytest.fixture(scope="module")
def kit(default_image: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from m4d.adapters.encoder_lora import load_encoder

    root = tmp_path_factory.mktemp("encoder-lora")
    key = dev_keys(root / "dev")
    adapters = root / "adapters"
    _lora_folder(default_image, adapters / "enc-lora", 1, ["query", "value", "dense"])
    _head_folder(adapters / "enc-head", 2, lora="enc-lora")
    image = _image(default_image, root / "v1", key, adapters)
    return {"root": root, "key": key, "keys": root / "dev" / "keys", "image": image,
            "adapters": adapters, "encoder": load_encoder(image)}


@pytest.fixture(scope="module")
def daemon(kit: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[DaemonProcess]:
    d = start_store_daemon(kit["image"], tmp_path_factory.mktemp("run"),
                           tmp_path_factory.mktemp("m4d") / "state", kit["keys"],
                           "--compute-dtype", "float32")
    yield d
    d.stop()


def _expected(kit: dict[str, Any], text: str, head_dir: Path, lora_dir: Path | None) -> list[float]:
    """The head's probabilities (in LABELS order) over the encoder's vector, through the LoRA."""
    from m4d.adapters.encoder_lora import vectors
    from m4d.adapters.heads import read_head
    from m4d.adapters.lora import read_peft

    lora = read_peft(lora_dir, "text_encoder") if lora_dir is not None else None
    head = read_head(head_dir)
    logits = head.logits(vectors(kit["encoder"], [text], lora))[0]
    return [float(p) for p in torch.softmax(logits.double(), -1)]


def _scores(result: Any) -> list[float]:
    by_label = {s.label: s.score for s in result.labels}
    return [by_label[label] for label in LABELS]


def _far(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_a_head_classifies_through_the_encoder_lora_it_names(daemon: DaemonProcess,
                                                             kit: dict[str, Any]) -> None:
    adapters = kit["adapters"]
    with Client(daemon.address, timeout=60) as c:
        table = {t.id: t for t in c.list_tasks()}
        assert table["lamp-intent"].adapter == "enc-head"
        for text in TEXTS:
            got = _scores(c.classify(text, task="lamp-intent"))
            tuned = _expected(kit, text, adapters / "enc-head", adapters / "enc-lora")
            frozen = _expected(kit, text, adapters / "enc-head", None)
            assert math.isclose(sum(got), 1, abs_tol=1e-4)
            assert _far(got, tuned) <= 1e-4, (text, got, tuned)  # the head's answer, with its LoRA
            assert _far(got, frozen) > 1e-2, (text, got, frozen)  # not the frozen encoder's
    manifest = json.loads((kit["image"] / "manifest.json").read_bytes())
    spec = manifest["components"]["enc-lora"]
    assert (spec["kind"], spec["module"]) == ("lora", "text_encoder")
    assert spec["base"] == manifest["files"]["text_encoder/model.safetensors"]["sha256"]
    assert manifest["components"]["enc-head"]["lora"] == "enc-lora"


def test_an_embed_task_runs_through_its_lora_beside_plain_calls(daemon: DaemonProcess,
                                                                kit: dict[str, Any]) -> None:
    from m4d.adapters.encoder_lora import vectors
    from m4d.adapters.lora import read_peft

    lora = read_peft(kit["adapters"] / "enc-lora", "text_encoder")
    tuned_ref = vectors(kit["encoder"], TEXTS, lora)
    plain_ref = vectors(kit["encoder"], TEXTS)
    calls = [("embed-tuned", TEXTS), ("embed", TEXTS), ("lamp-intent", TEXTS[0]),
             ("embed-tuned", TEXTS[1:]), ("embed", TEXTS[:1])]

    def call(c: tuple[str, Any]) -> Any:
        with Client(daemon.address, timeout=60) as client:
            if c[0] == "lamp-intent":
                return torch.tensor(_scores(client.classify(c[1], task=c[0])))
            return torch.tensor(client.embed(c[1], task=c[0]).vectors)

    alone = [call(c) for c in calls]
    with ThreadPoolExecutor(len(calls)) as pool:  # in the encoder's batches together
        together = list(pool.map(call, calls))
    for (task, _), a, b in zip(calls, alone, together, strict=True):
        assert (a - b).abs().max().item() <= 1e-5, task
    assert (alone[0] - tuned_ref).abs().max().item() <= 1e-4
    assert (alone[1] - plain_ref).abs().max().item() <= 1e-4
    assert (alone[0] - alone[1]).abs().max().item() > 1e-2
    assert (alone[3] - tuned_ref[1:]).abs().max().item() <= 1e-4


def test_an_addon_with_a_head_and_its_encoder_lora_installs_and_removes(
        daemon: DaemonProcess, kit: dict[str, Any]) -> None:
    root, env = kit["root"], daemon.env()
    lora = _lora_folder(kit["image"], root / "lamp-lora", 7, ["key", "dense"])
    head = _head_folder(root / "lamp-head", 8)
    tar = root / "lamp.tar"
    done = m4ctl("adapter", "pack", "--base-image", str(kit["image"]), "--name", "lamp",
                 "--peft", str(lora), "--head", str(head), "--task-id", "lamp",
                 "--key", str(kit["key"]), "--out", str(tar))
    assert done.returncode == 0, done.stderr
    vec = root / "vec.tar"
    done = m4ctl("adapter", "pack", "--base-image", str(kit["image"]), "--name", "vec",
                 "--peft", str(kit["adapters"] / "enc-lora"), "--task-id", "vec-embed",
                 "--key", str(kit["key"]), "--out", str(vec))
    assert done.returncode == 0, done.stderr
    for path in (tar, vec):
        done = m4ctl("adapter", "install", str(path), env=env)
        assert done.returncode == 0, done.stderr
    with Client(daemon.address, timeout=60) as c:
        got = _scores(c.classify(TEXTS[0], task="lamp"))
        embedded = torch.tensor(c.embed(TEXTS, task="vec-embed").vectors)
        same = torch.tensor(c.embed(TEXTS, task="embed-tuned").vectors)
        table = {t.id: t for t in c.list_tasks()}
    assert _far(got, _expected(kit, TEXTS[0], head, lora)) <= 1e-4
    assert _far(got, _expected(kit, TEXTS[0], head, None)) > 1e-2
    assert (embedded - same).abs().max().item() <= 1e-5  # the image's LoRA, shipped apart
    assert table["vec-embed"].rpc == "Embed" and table["lamp"].adapter.startswith("lamp/lamp-head@")
    listing = json.loads(m4ctl("--json", "adapter", "list", env=env).stdout)
    lamp = next(a for a in listing["addons"] if a["name"] == "lamp")
    assert lamp["applies"] and sorted(c["name"] for c in lamp["components"]) == ["lamp-head", "lamp-lora"]

    with AdminClient(daemon.admin_address) as admin:
        admin.remove_addon("lamp")
        admin.remove_addon("vec")
    with Client(daemon.address, timeout=60) as c, pytest.raises(M4Error) as e:
        c.classify(TEXTS[0], task="lamp")
    assert e.value.code == "INVALID_ARGUMENT" and "unknown task 'lamp'" in e.value.message
    with Client(daemon.address, timeout=60) as c:  # the image's own go on as before
        assert _far(_scores(c.classify(TEXTS[0], task="lamp-intent")), _expected(
            kit, TEXTS[0], kit["adapters"] / "enc-head", kit["adapters"] / "enc-lora")) <= 1e-4
