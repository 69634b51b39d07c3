"""Packing add-ons (m4d.adapters.pack): a PEFT folder as the peft library writes it, our own
trainer's folders and heads, checked against the image they are pinned to; adapters that do
not fit are refused before anything is written. The base is a tiny image whose backbone and
text encoder have SmolLM2-135M's and MiniLM's shapes (no weights are read: only the
manifest's configs and hashes count)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from m4d.adapters.heads import Head, Hidden, read_head, write_head
from m4d.adapters.lora import AdapterError, write_peft
from m4d.adapters.modules import new_lora
from m4d.adapters.pack import TaskFlags, check_component, check_template, pack_addon
from m4d.model.llama import Llama, LlamaConfig
from m4image.addon_io import verify_addon
from m4image.addon_store import AddonStore
from m4image.keys import Keyring
from m4image.sign import generate_keypair
from m4image.verify import verify_image

from tests.unit.addonkit import WEIGHTS
from tests.unit.imagekit import make_image, payload

SMOLLM = {"bos_id": 1, "dim": 576, "eos_id": 2, "ffn_dim": 1536, "max_seq_len": 8192,
          "n_heads": 9, "n_kv_heads": 3, "n_layers": 30, "norm_eps": 1e-05,
          "rope_base": 100000.0, "tie_embeddings": True, "vocab_size": 49152}


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    image = make_image(tmp_path / "image", components={
        "backbone": {"kind": "llama", "weights": WEIGHTS, "config": SMOLLM},
        "text_encoder": {"kind": "bert", "dimensions": 384,
                         "weights": "text_encoder/model.safetensors"}})
    key = generate_keypair(tmp_path / "vendor")
    Keyring(tmp_path / "keys").add(key.public_key)
    import hashlib

    weights = hashlib.sha256(payload("one")[WEIGHTS]).hexdigest()
    return {"image": image, "key": key.private_key, "keys": tmp_path / "keys",
            "weights": weights, "tmp": tmp_path}


def _our_lora(folder: Path, base_model: str, dim: int = 576) -> None:
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_dict({**SMOLLM, "dim": dim, "n_layers": 2}))
    lora = new_lora(model, rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=1)
    lora.base_model = base_model
    write_peft(folder, lora)


def test_a_peft_library_folder_packs_as_it_is(base: dict[str, Any]) -> None:
    import peft
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=2, num_attention_heads=9,
                                   num_key_value_heads=3, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                           init_lora_weights=False, lora_dropout=0.0)
    peft.get_peft_model(model, lora).save_pretrained(base["tmp"] / "peft")
    (base["tmp"] / "peft" / "README.md").write_text("a model card the add-on leaves out")
    addon = pack_addon(base["image"], base["tmp"] / "travel", name="travel", version="2.0.0",
                       key=base["key"], peft=base["tmp"] / "peft",
                       flags=TaskFlags(task_id="travel-plan", prompt_template="Trip: {prompt}",
                                       description="Plans trips."))
    verified = verify_addon(addon.path, keyring=Keyring(base["keys"]))
    spec = verified.manifest.components["travel-lora"]
    assert (spec["rank"], spec["alpha"], spec["base"]) == (8, 16.0, base["weights"])
    assert spec["targets"] == ["down_proj", "k_proj", "q_proj"]
    assert sorted(verified.manifest.files) == ["adapters/travel-lora/adapter_config.json",
                                               "adapters/travel-lora/adapter_model.safetensors"]
    task = verified.manifest.tasks[0]
    assert (task["id"], task["adapter"], task["prompt_template"], task["description"]) == (
        "travel-plan", "travel-lora", "Trip: {prompt}", "Plans trips.")


def test_pack_writes_a_tar_the_store_installs(base: dict[str, Any]) -> None:
    _our_lora(base["tmp"] / "ours", base["weights"])
    (base["tmp"] / "ours" / "metrics.json").write_text(json.dumps({"eval": {"exact": 0.9}}))
    tar = base["tmp"] / "travel.tar"
    addon = pack_addon(base["image"], tar, name="travel", version="1.0.0", key=base["key"],
                       peft=base["tmp"] / "ours")
    assert addon.path == tar.resolve() and not (base["tmp"] / "travel").exists()
    store = AddonStore(base["tmp"] / "state")
    with open(tar, "rb") as f:
        done = store.install_stream(iter(lambda: f.read(4096), b""), Keyring(base["keys"]),
                                    lambda m: None)
    assert done.entry.digest == addon.digest
    assert addon.manifest.components["travel-lora"]["metrics"] == {"exact": 0.9}
    assert "response_schema" not in addon.manifest.tasks[0]  # free text: the folder has none
    with pytest.raises(AdapterError, match="already exists"):
        pack_addon(base["image"], tar, name="travel", version="1.0.0", key=base["key"],
                   peft=base["tmp"] / "ours")


def test_a_response_schema_beside_the_adapter_becomes_its_tasks(base: dict[str, Any]) -> None:
    folder = base["tmp"] / "ours"
    _our_lora(folder, base["weights"])
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    (folder / "response_schema.json").write_text(json.dumps(schema, indent=2))
    addon = pack_addon(base["image"], base["tmp"] / "trip", name="trip", version="1.0.0",
                       key=base["key"], peft=folder)
    assert json.loads(addon.manifest.tasks[0]["response_schema"]) == schema
    assert json.loads(addon.manifest.components["trip-lora"]["response_schema"]) == schema
    (folder / "response_schema.json").write_text("[]")
    with pytest.raises(AdapterError, match=r"response_schema\.json: must be a JSON object"):
        pack_addon(base["image"], base["tmp"] / "trip2", name="trip", version="1.0.0",
                   key=base["key"], peft=folder)


def test_a_head_packs_as_a_classify_task_with_its_labels(base: dict[str, Any]) -> None:
    write_head(base["tmp"] / "head", Head(["off", "on"], torch.randn(2, 384), torch.zeros(2)))
    addon = pack_addon(base["image"], base["tmp"] / "lights", name="lights", version="1.0.0",
                       key=base["key"], head=base["tmp"] / "head")
    task = addon.manifest.tasks[0]
    assert (task["rpc"], task["head"], task["adapter"], task["labels"]) == (
        "Classify", "linear_head", "lights-head", ["off", "on"])


def test_an_mlp_head_packs_and_its_first_layer_must_take_the_encoder_vector(
        base: dict[str, Any]) -> None:
    head = Head(["off", "on"], torch.randn(2, 32), torch.zeros(2),
                hidden=Hidden(torch.randn(32, 384), torch.zeros(32), "gelu"))
    write_head(base["tmp"] / "mlp", head)
    addon = pack_addon(base["image"], base["tmp"] / "lights", name="lights", version="1.0.0",
                       key=base["key"], head=base["tmp"] / "mlp")
    task = addon.manifest.tasks[0]
    assert (task["rpc"], task["adapter"], task["labels"]) == (
        "Classify", "lights-head", ["off", "on"])
    verified = verify_addon(addon.path, keyring=Keyring(base["keys"]))
    folder = verified.path / "adapters" / "lights-head"
    packed = read_head(folder)
    assert packed.hidden is not None and packed.dim == 384
    # the daemon's check of the files it is sent, before it publishes the add-on
    check_component(verified.manifest.components["lights-head"], folder,
                    verify_image(base["image"]).manifest)
    assert all(torch.equal(packed.tensors()[k], t) for k, t in head.tensors().items())
    # 384 wide at the output layer, but its hidden layer takes 768-dimensional vectors
    write_head(base["tmp"] / "wide", Head(["off", "on"], torch.zeros(2, 384), torch.zeros(2),
                                          hidden=Hidden(torch.zeros(384, 768), torch.zeros(384))))
    with pytest.raises(AdapterError, match="the head takes 768-dimensional vectors"):
        pack_addon(base["image"], base["tmp"] / "wide-addon", name="wide", version="1",
                   key=base["key"], head=base["tmp"] / "wide")
    assert not (base["tmp"] / "wide-addon").exists()


def test_tasks_from_json_name_this_adapter_unless_they_say(base: dict[str, Any]) -> None:
    _our_lora(base["tmp"] / "ours", base["weights"])
    task = {"id": "travel-chat", "path": 2, "description": "Trips, as a chat.",
            "modules": ["backbone"], "head": "lm_head", "rpc": "Generate", "streaming": True,
            "prompt_template": "chat", "inputs": [{"name": "chat", "kind": "chat"}],
            "outputs": [{"name": "text", "kind": "text"}]}
    addon = pack_addon(base["image"], base["tmp"] / "a", name="travel", version="1", key=None,
                       peft=base["tmp"] / "ours", component="lora", tasks=[task])
    (served,) = addon.manifest.tasks
    assert (served["id"], served["adapter"], served["inputs"][0]["kind"]) == (
        "travel-chat", "lora", "chat")
    with pytest.raises(AdapterError, match="not \"chat\", a known template"):
        pack_addon(base["image"], base["tmp"] / "b", name="travel", version="1", key=None,
                   peft=base["tmp"] / "ours", tasks=[dict(task, prompt_template="oops")])


def test_adapters_that_do_not_fit_the_image_are_refused(base: dict[str, Any]) -> None:
    tmp = base["tmp"]
    _our_lora(tmp / "wide", "", dim=648)  # another backbone's shapes
    with pytest.raises(AdapterError, match="do not fit the model"):
        pack_addon(base["image"], tmp / "a", name="a", version="1", key=base["key"],
                   peft=tmp / "wide")
    _our_lora(tmp / "other", "0" * 64)  # trained on another backbone
    with pytest.raises(AdapterError, match="trained on the backbone 000000000000"):
        pack_addon(base["image"], tmp / "b", name="b", version="1", key=base["key"],
                   peft=tmp / "other")
    write_head(tmp / "head", Head(["x", "y"], torch.zeros(2, 768), torch.zeros(2)))
    with pytest.raises(AdapterError, match="768-dimensional"):
        pack_addon(base["image"], tmp / "c", name="c", version="1", key=base["key"],
                   head=tmp / "head")
    _our_lora(tmp / "ok", base["weights"])
    with pytest.raises(AdapterError, match="not \"chat\", a known template"):
        pack_addon(base["image"], tmp / "d", name="d", version="1", key=base["key"],
                   peft=tmp / "ok", flags=TaskFlags(prompt_template="no placeholder"))
    assert not any((tmp / n).exists() for n in "abcd")
    assert check_template("slu_adapter") == "slu_adapter"
