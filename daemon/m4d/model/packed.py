"""Backbone linears stored as the kernels read them (model-loading stage).

The w4a8 linears' weights are GGUF blocks in the image (`model.safetensors`, the portable
form every weight format loads from), and m4's kernels read them packed in tiles of 16
channels (`block_linear`). Packing at load took ~0.6 s of start-up and ~90 MB of private
memory per loaded image. The image builder therefore also writes the packed tiles
(`kernels.w4a8.safetensors`, named in the component's `packed`), and the loader maps them:
nothing is converted, the pages are the page cache's and shared by every image and process
that holds the same file. The tiles are the same on every kernel variant (x86 and ARM); a
file of another layout version is ignored (the blocks are packed at load, as before).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from m4d.model.block_linear import BlockLinear, ConcatLinear
from m4d.model.mapped import MappedSafetensors

# the tile layout of block_linear's pack_* functions; bump when any of them changes
LAYOUT = "m4-tiles-1"
PACKED_NAME = "kernels.w4a8.safetensors"

log = logging.getLogger(__name__)


def save_packed(model: nn.Module, path: Path) -> bool:
    """Writes the model's kernel linears (BlockLinear, and ConcatLinear of them) packed as
    they are to `path` (the caller makes it atomic); False, and nothing written, when the
    model has none (its linears run on torch's kernels)."""
    tensors: dict[str, torch.Tensor] = {}
    linears: dict[str, dict[str, object]] = {}
    for name, m in model.named_modules():
        if isinstance(m, BlockLinear):
            tensors[f"{name}.weight"] = m.weight.contiguous().clone()
            tensors[f"{name}.sc"] = m.sc.contiguous().clone()
            linears[name] = {"kind": m.kind, "out": m.out_features, "in": m.in_features,
                             "out_dtype": str(m.out_dtype).removeprefix("torch.")
                             if m.out_dtype is not None else None}
        elif isinstance(m, ConcatLinear):
            linears[name] = {"parts": len(m.parts)}
    if not tensors:
        return False
    # one metadata key: several would be written in hash order (not reproducible)
    save_file(tensors, str(path), metadata={
        "format": json.dumps({"layout": LAYOUT, "linears": linears}, sort_keys=True)})
    return True


def load_packed(path: Path, digest: str | None = None) -> dict[str, nn.Module] | None:
    """The packed linears by module name ("layers.0.attention.wqkv", "output"), their
    tensors views of the mapped file; None when the file is of another layout."""
    f = MappedSafetensors(path, digest)
    try:
        meta = json.loads(f.metadata.get("format", "{}"))
    except ValueError:
        meta = {}
    if meta.get("layout") != LAYOUT:
        log.warning("packed weights of layout %r, not %r: the blocks are packed at load",
                    meta.get("layout"), LAYOUT, extra={"file": str(path)})
        return None
    out: dict[str, nn.Module] = {}
    specs: dict[str, dict[str, object]] = meta["linears"]
    for name, spec in specs.items():
        if "kind" in spec:
            dtype = spec["out_dtype"]
            out[name] = BlockLinear(str(spec["kind"]), f.get(f"{name}.weight"), f.get(f"{name}.sc"),
                                    int(str(spec["out"])), int(str(spec["in"])),
                                    out_dtype=getattr(torch, str(dtype)) if dtype else None)
    for name, spec in specs.items():
        if "parts" in spec:
            out[name] = ConcatLinear([out.pop(f"{name}.parts.{i}")
                                      for i in range(int(str(spec["parts"])))])
    return out
