"""Adapters in an image: the builder takes trained adapter folders as components, pinned to
the backbone they were trained on, and adds the tasks that use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from m4d.adapters.heads import Head, write_head
from m4d.adapters.lora import Lora, LoraPair, write_peft
from m4d.builder.build import _add_adapters
from m4d.builder.errors import BuildError
from m4d.builder.tasks import adapter_tasks, default_tasks
from m4image.fsutil import sha256_file


def _stage(tmp_path: Path) -> tuple[Path, dict]:
    stage = tmp_path / "stage"
    (stage / "backbone").mkdir(parents=True)
    (stage / "backbone" / "model.safetensors").write_bytes(b"the backbone's weights")
    return stage, {"backbone": {"kind": "llama", "weights": "backbone/model.safetensors"},
                   "text_encoder": {"kind": "bert"}}


def _lora(base: str) -> Lora:
    pair = LoraPair(torch.ones(2, 8), torch.zeros(8, 2), 2.0)
    return Lora("backbone", 2, 4, {"model.layers.0.self_attn.q_proj": pair}, base_model=base)


def test_adapters_become_components_with_their_metrics_and_tasks(tmp_path: Path) -> None:
    stage, components = _stage(tmp_path)
    base = sha256_file(stage / "backbone" / "model.safetensors")
    write_peft(tmp_path / "adapters" / "slu", _lora(base))
    (tmp_path / "adapters" / "slu" / "metrics.json").write_text(
        json.dumps({"eval": {"adapter": {"intent_accuracy": 0.95}}}))
    write_head(tmp_path / "adapters" / "intent-head",
               Head(["off", "on"], torch.zeros(2, 4), torch.zeros(2)))
    _add_adapters(stage, components, tmp_path / "adapters", lambda *a: None)
    slu, head = components["slu"], components["intent-head"]
    assert (slu["kind"], slu["module"], slu["base"], slu["dir"]) == ("lora", "backbone", base, "adapters/slu")
    assert slu["metrics"] == {"adapter": {"intent_accuracy": 0.95}} and slu["targets"] == ["q_proj"]
    assert (stage / "adapters" / "slu" / "adapter_model.safetensors").is_file()
    assert head["kind"] == "head" and head["labels"] == ["off", "on"]
    tasks = {t.id: t for t in adapter_tasks(default_tasks(), components)}
    assert tasks["understand"].adapter == "slu" and tasks["understand"].prompt_template == "slu_adapter"
    assert tasks["command-intent"].adapter == "intent-head" and tasks["command-intent"].labels == ["off", "on"]
    assert tasks["generate"].adapter == ""


def test_an_adapter_trained_on_another_backbone_is_refused(tmp_path: Path) -> None:
    stage, components = _stage(tmp_path)
    write_peft(tmp_path / "adapters" / "slu", _lora("0" * 64))
    with pytest.raises(BuildError, match="trained on backbone 000000000000, not this image's"):
        _add_adapters(stage, components, tmp_path / "adapters", lambda *a: None)
    assert "slu" not in components


def _encoder_lora(base: str) -> Lora:
    pair = LoraPair(torch.ones(2, 8), torch.zeros(24, 2), 2.0)
    return Lora("text_encoder", 2, 4, {"encoder.layer.0.attention.self.query": pair}, base_model=base)


def test_an_encoder_lora_is_pinned_to_the_encoder_and_named_by_its_head(tmp_path: Path) -> None:
    stage, components = _stage(tmp_path)
    (stage / "text_encoder").mkdir()
    (stage / "text_encoder" / "model.safetensors").write_bytes(b"the encoder's weights")
    components["text_encoder"] = {"kind": "bert", "weights": "text_encoder/model.safetensors"}
    encoder = sha256_file(stage / "text_encoder" / "model.safetensors")
    write_peft(tmp_path / "adapters" / "intent-lora", _encoder_lora(encoder))
    write_head(tmp_path / "adapters" / "intent-head",
               Head(["off", "on"], torch.zeros(2, 4), torch.zeros(2), lora="intent-lora"))
    _add_adapters(stage, components, tmp_path / "adapters", lambda *a: None)
    lora, head = components["intent-lora"], components["intent-head"]
    assert (lora["kind"], lora["module"], lora["base"]) == ("lora", "text_encoder", encoder)
    assert lora["targets"] == ["query"] and head["lora"] == "intent-lora"
    assert (stage / "adapters" / "intent-lora" / "adapter_model.safetensors").is_file()
    tasks = {t.id: t for t in adapter_tasks(default_tasks(), components)}
    assert tasks["command-intent"].adapter == "intent-head" and "intent-lora" in tasks["command-intent"].description
    assert "understand" not in tasks  # an encoder LoRA is not the backbone's SLU adapter


@pytest.mark.parametrize("case", ["other encoder", "missing lora"])
def test_a_bad_encoder_lora_or_head_reference_is_refused(tmp_path: Path, case: str) -> None:
    stage, components = _stage(tmp_path)
    (stage / "text_encoder").mkdir()
    (stage / "text_encoder" / "model.safetensors").write_bytes(b"the encoder's weights")
    components["text_encoder"] = {"kind": "bert", "weights": "text_encoder/model.safetensors"}
    encoder = sha256_file(stage / "text_encoder" / "model.safetensors")
    if case == "other encoder":
        write_peft(tmp_path / "adapters" / "intent-lora", _encoder_lora("1" * 64))
        match = "trained on text encoder 111111111111, not this image's"
    else:
        write_peft(tmp_path / "adapters" / "intent-lora", _encoder_lora(encoder))
        match = "head intent-head was trained with the text encoder's LoRA 'elsewhere'"
    write_head(tmp_path / "adapters" / "intent-head",
               Head(["off", "on"], torch.zeros(2, 4), torch.zeros(2), lora="elsewhere"))
    with pytest.raises(BuildError, match=match):
        _add_adapters(stage, components, tmp_path / "adapters", lambda *a: None)
