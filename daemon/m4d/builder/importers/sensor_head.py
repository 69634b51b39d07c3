"""Firmware image build, importer: a sensor-window classifier head folder -> a component.

The folder holds ``config.json`` ({"channels", "labels", "hidden", "min_steps"}: see
``m4d.model.sensor.SensorHeadConfig``) and ``model.safetensors`` with the head's layers
(``layers.<i>.weight`` / ``.bias``). The weights are checked against the config by loading
them, and copied as float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from m4image.fsutil import atomic_write_bytes, sha256_file
from safetensors.torch import save

from m4d.builder.importers.common import Progress
from m4d.model.sensor import SensorHeadConfig, load_sensor_head

WEIGHTS = "model.safetensors"


class SensorHeadImportError(ValueError):
    """The folder is not a sensor head this daemon can run."""


def import_sensor_head(folder: Path, out_dir: Path,
                       progress: Progress | None = None) -> dict[str, Any]:
    folder, out_dir = Path(folder), Path(out_dir)
    report: Progress = progress or (lambda stage, done, total: None)
    try:
        cfg = SensorHeadConfig.from_dict(json.loads((folder / "config.json").read_text()))
        head = load_sensor_head(folder / WEIGHTS, cfg)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SensorHeadImportError(f"{folder}: not a sensor head: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float32).contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS, save(state))
    report("sensor head: write", 1, 1)
    return {"kind": "sensor_head", "config": cfg.to_dict(), "weights": WEIGHTS,
            "source": {"format": "m4-sensor-head", "weights_sha256": sha256_file(folder / WEIGHTS)}}
