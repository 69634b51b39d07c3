"""Loading a network's weights: build it on the meta device, read exactly the tensors it names
from a safetensors file (mmap'd), check each one's shape, move it to the compute dtype and
device, and assign it. Every model module loads through here."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def load_into(model: M, weights_file: str | Path, *, what: str,
              compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              keep_float32: Collection[str] = (),
              prepare: Callable[[str, Tensor], Tensor] | None = None) -> M:
    """Assign the file's tensors to ``model`` (built under ``torch.device("meta")``); returns
    it in eval mode. Floating-point tensors go to ``compute_dtype`` except the names in
    ``keep_float32``; ``prepare`` may then change a tensor's layout. A missing tensor or a
    shape the config does not expect is a ValueError naming the file (``what`` says whose
    tensors they are)."""
    expected = model.state_dict()
    with safe_open(str(weights_file), framework="pt", device="cpu") as f:
        missing = sorted(set(expected) - set(f.keys()))
        if missing:
            raise ValueError(f"{weights_file} lacks {len(missing)} {what} tensors, e.g. {missing[:3]}")
        state = {n: f.get_tensor(n) for n in expected}
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{weights_file}: tensor {name!r} is {list(t.shape)}, the config "
                             f"expects {list(expected[name].shape)}")
        if t.is_floating_point():
            t = t.to(device=device, dtype=torch.float32 if name in keep_float32 else compute_dtype)
        state[name] = prepare(name, t) if prepare is not None else t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
