"""LoRAs on the text encoder in the task table, the request holds and the add-on format,
without a model: an Embed task names its LoRA, a head the LoRA it was trained with; what the
image (or an add-on) lacks is refused with the reason; a request holds its encoder LoRA like
its head; an add-on's encoder LoRA is pinned to the image's encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from m4d.config import Config
from m4d.errors import FailedPrecondition, InvalidArgument
from m4d.executor.adapters import EncoderLoraBank, HeadBank, encoder_adapters, holding, release
from m4d.model.bert import BertConfig
from m4d.requests import Caller, Priority
from m4d.service.tasks import ImageInfo, Origin, Tasks
from m4image.addon import AddonManifestError, OtherBaseError, check_base
from m4image.addon_io import write_addon
from m4image.verify import verify_image

from tests.unit.addonkit import backbone_sha, base_image
from tests.unit.imagekit import payload

ORIGIN = Origin(Caller(uid=1000), Priority.FOREGROUND)
COMPONENTS: dict[str, dict[str, Any]] = {
    "text_encoder": {"kind": "bert"},
    "slu": {"kind": "lora", "module": "backbone", "dir": "adapters/slu"},
    "intent-lora": {"kind": "lora", "module": "text_encoder", "dir": "adapters/intent-lora"},
    "intent-head": {"kind": "head", "module": "text_encoder", "dir": "adapters/intent-head",
                    "labels": ["on", "off"], "lora": "intent-lora"},
    "plain-head": {"kind": "head", "module": "text_encoder", "dir": "adapters/plain-head",
                   "labels": ["on", "off"]},
}
TASKS: list[dict[str, Any]] = [
    {"id": "embed", "rpc": "Embed"},
    {"id": "embed-tuned", "rpc": "Embed", "adapter": "intent-lora"},
    {"id": "embed-slu", "rpc": "Embed", "adapter": "slu"},
    {"id": "intent", "rpc": "Classify", "head": "linear_head", "adapter": "intent-head",
     "labels": ["on", "off"]},
    {"id": "plain", "rpc": "Classify", "head": "linear_head", "adapter": "plain-head",
     "labels": ["on", "off"]},
    {"id": "similar-tuned", "rpc": "Classify", "head": "similarity", "adapter": "intent-lora"},
]


def _tasks(components: dict[str, dict[str, Any]] = COMPONENTS) -> Tasks:
    return Tasks(Config(), TASKS, ImageInfo("test", "1.0", "ab" * 32), None, None,
                 max_context=64, adapters=("slu",), encoder_adapters=encoder_adapters(components))


def test_tasks_name_the_encoder_lora_they_run_with() -> None:
    tasks = _tasks()
    assert tasks.embed("embed", ORIGIN, ["x"]).encoder_lora == ""
    assert tasks.embed("embed-tuned", ORIGIN, ["x"]).encoder_lora == "intent-lora"
    request = tasks.classify("intent", ORIGIN, "lights on", [])
    assert (request.head, request.encoder_lora) == ("intent-head", "intent-lora")
    request = tasks.classify("plain", ORIGIN, "lights on", [])
    assert (request.head, request.encoder_lora) == ("plain-head", "")
    request = tasks.classify("similar-tuned", ORIGIN, "lights on", ["on", "off"])
    assert (request.head, request.encoder_lora) == ("", "intent-lora")


def test_what_the_image_lacks_is_refused_with_the_reason() -> None:
    with pytest.raises(FailedPrecondition, match="adapter 'slu', which is not a LoRA on the text"):
        _tasks().embed("embed-slu", ORIGIN, ["x"])
    without = {k: v for k, v in COMPONENTS.items() if k != "intent-lora"}
    with pytest.raises(FailedPrecondition, match="its head 'intent-head' was trained with the "
                       "text encoder's LoRA 'intent-lora', which this image does not hold"):
        _tasks(without).classify("intent", ORIGIN, "lights on", [])
    with pytest.raises(FailedPrecondition, match="'intent-lora', which is not a LoRA"):
        _tasks(without).embed("embed-tuned", ORIGIN, ["x"])


def test_an_addons_encoder_adapters_join_and_leave_the_table() -> None:
    tasks = _tasks({"text_encoder": {"kind": "bert"}})
    served = {"vec-lora": "vec/vec-lora@abc", "vec-head": "vec/vec-head@abc"}
    addon = {"vec-lora": {"kind": "lora", "module": "text_encoder"},
             "vec-head": {"kind": "head", "labels": ["a", "b"], "lora": "vec-lora"}}
    task = {"id": "vec", "rpc": "Classify", "head": "linear_head", "adapter": "vec/vec-head@abc",
            "labels": ["a", "b"]}
    tasks.extend("vec", [task], [], encoder_adapters(addon, served))
    assert tasks.classify("vec", ORIGIN, "x", []).encoder_lora == "vec/vec-lora@abc"
    assert tasks.withdraw("vec") == ["vec"]
    assert tasks.encoder_adapters == {}
    with pytest.raises(InvalidArgument, match="unknown task 'vec'"):
        tasks.classify("vec", ORIGIN, "x", [])


class Runtime:
    def __init__(self, heads: HeadBank, encoder_loras: EncoderLoraBank) -> None:
        self.adapters = None
        self.heads, self.encoder_loras = heads, encoder_loras


def test_a_request_holds_its_encoder_lora_until_it_ends(tmp_path: Path) -> None:
    heads = HeadBank(COMPONENTS, lambda rel: tmp_path / rel)
    loras = EncoderLoraBank(COMPONENTS, BertConfig(), lambda rel: tmp_path / rel, 1 << 20)
    assert loras.names == ["intent-lora"] and heads.names == ["intent-head", "plain-head"]
    loras.add("vec/vec-lora@abc", {"kind": "lora", "module": "text_encoder", "dir": "a"}, tmp_path)
    runtime = Runtime(heads, loras)
    request = _tasks().classify("intent", ORIGIN, "lights on", [])
    request.encoder_lora = "vec/vec-lora@abc"
    with holding(runtime, request):
        pass
    gone: list[int] = []
    assert loras.retire("vec/vec-lora@abc", lambda: gone.append(1)) == 1 and gone == []
    with pytest.raises(InvalidArgument, match=r"its lora 'vec/vec-lora@abc' was removed"), \
            holding(runtime, request):
        pass
    assert heads.retire("intent-head", lambda: None) == 1  # the failed hold let its head go again
    release(runtime, request)
    assert gone == [1] and "vec/vec-lora@abc" not in loras.specs


def _addon(tmp_path: Path, base: str, lora_base: str, head_lora: str = "enc-lora") -> Any:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.json", "head.safetensors"):
        (folder / name).write_bytes(name.encode())
    components = {
        "enc-lora": {"kind": "lora", "module": "text_encoder", "dir": "adapters/enc-lora",
                     "rank": 4, "alpha": 8, "targets": ["query"], "base": lora_base},
        "enc-head": {"kind": "head", "module": "text_encoder", "dir": "adapters/enc-head",
                     "labels": ["a", "b"], "lora": head_lora}}
    tasks = [{"id": "enc", "path": 3, "description": "Classify.", "modules": ["text_encoder"],
              "head": "linear_head", "adapter": "enc-head", "labels": ["a", "b"],
              "inputs": [{"name": "text", "kind": "text"}],
              "outputs": [{"name": "labels", "kind": "texts"}], "rpc": "Classify"}]
    payload_files = {f"adapters/enc-lora/{n}": folder / n
                     for n in ("adapter_config.json", "adapter_model.safetensors")}
    payload_files |= {f"adapters/enc-head/{n}": folder / n for n in ("head.json", "head.safetensors")}
    out = tmp_path / f"addon-{lora_base[:4]}-{head_lora}"
    return write_addon(out, name="enc", version="1.0.0", base=base, components=components,
                       tasks=tasks, payload=payload_files, key=None)


def test_an_addons_encoder_lora_is_pinned_to_the_images_encoder(tmp_path: Path) -> None:
    image, digest = base_image(tmp_path / "image")
    manifest = verify_image(image).manifest
    encoder = hashlib.sha256(payload("one")["text_encoder/model.safetensors"]).hexdigest()
    check_base(_addon(tmp_path, digest, encoder).manifest, manifest, digest)
    with pytest.raises(OtherBaseError, match="trained on the text encoder"):
        check_base(_addon(tmp_path, digest, backbone_sha()).manifest, manifest, digest)
    with pytest.raises(AddonManifestError, match="head 'enc-head' runs with 'nowhere'"):
        check_base(_addon(tmp_path, digest, encoder, "nowhere").manifest, manifest, digest)
