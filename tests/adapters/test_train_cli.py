"""`m4ctl adapter train` on the real default image's backbone: a few steps from a JSONL file,
the PEFT folder and metrics it writes, and what it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from m4d.adapters import slu_data
from m4d.adapters.lora import read_peft
from m4d.model.cpu import has_bf16_arithmetic


def _m4ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m4ctl", *args], capture_output=True, text=True,
                          timeout=600)


def test_train_writes_a_peft_folder_with_its_report(default_image: Path, tmp_path: Path) -> None:
    slu_data.write_jsonl(tmp_path / "train.jsonl", slu_data.examples("train", 12, seed=1))
    slu_data.write_jsonl(tmp_path / "val.jsonl", slu_data.examples("val", 3, seed=1))
    slu_data.write_jsonl(tmp_path / "eval.jsonl", slu_data.examples("eval", 2, seed=1))
    done = _m4ctl("adapter", "train", "--image", str(default_image), "--template", "slu_adapter",
                  "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
                  "--val", str(tmp_path / "val.jsonl"), "--scorer", "slu", "--steps", "2",
                  "--rank", "4", "--batch", "2", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    lora = read_peft(tmp_path / "out", "backbone")
    assert lora.rank == 4 and len(lora.targets) == 7
    manifest = json.loads((default_image / "manifest.json").read_text())
    assert lora.base_model == manifest["files"]["backbone/model.safetensors"]["sha256"]
    assert any(float(p.b.abs().max()) > 0 for p in lora.pairs.values())  # it trained
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["eval"]["adapter"]["n"] == 2
    assert metrics["train"]["examples"] == 12  # all of --data: --val is the validation set
    assert metrics["train"]["dtype"] == ("bfloat16" if has_bf16_arithmetic() else "float32")
    assert "train [" in done.stderr  # the progress bar


def test_train_refuses_a_bad_data_file_with_its_line(default_image: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"input": "x", "output": "y"}\n{"input": 3}\n')
    done = _m4ctl("adapter", "train", "--image", str(default_image), "--template", "slu_adapter",
                  "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out"))
    assert done.returncode != 0 and "bad.jsonl:2" in done.stderr
    assert not (tmp_path / "out").exists()
