"""Loading a network's weights from the image's safetensors files (model-loading stage).

Dense networks: build on the meta device, read exactly the tensors the network names (mmap'd),
check each one's shape, move it to the compute dtype and device, and assign it (``load_into``).
Quantized linears: ``WeightFile`` reads a weight as stored (dense, or the quantized kinds of
``m4d.model.qtensors``) and ``build_linear`` makes the linear of a ``weight_format`` from it
(``m4d.model.quant`` on torch's kernels, ``m4d.model.block_linear`` on m4's). Every model
module loads through here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from m4d.config import WEIGHT_FORMATS
from m4d.model import kernels
from m4d.model.block_linear import KERNEL_TILE, q4_1_from_float, stored_linear
from m4d.model.mapped import MappedSafetensors
from m4d.model.qtensors import Q4_1_GROUP, dequantize
from m4d.model.quant import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear

M = TypeVar("M", bound=nn.Module)

log = logging.getLogger(__name__)


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding for a network built on the meta device to be loaded: its random init is
    skipped there (on meta it imports torch._refs, 1.5 s of start-up); elsewhere the usual."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


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
    f = MappedSafetensors(weights_file)
    missing = sorted(set(expected) - set(f.keys()))
    if missing:
        raise ValueError(f"{weights_file} lacks {len(missing)} {what} tensors, e.g. {missing[:3]}")
    state = {n: f.get(n) for n in expected}
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{weights_file}: tensor {name!r} is {list(t.shape)}, the config "
                             f"expects {list(expected[name].shape)}")
        if t.is_floating_point():
            t = t.to(device=device, dtype=torch.float32 if name in keep_float32 else compute_dtype)
        state[name] = prepare(name, t) if prepare is not None else t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class WeightFile:
    """A mapped safetensors file in the image layout; tensors by HF-style base name, as
    views of the file's pages (``MappedSafetensors``; ``digest``, the file's sha256, lets an
    image that holds the same file share the map).

    A base name ``X`` is stored as ``X`` (dense), ``X.qweight/.scales/.mins`` (Q4_1, Q8_1) or
    ``X.qweight/.scales`` (Q8_0).
    """

    def __init__(self, path: Path, digest: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"weights file not found: {self.path}")
        self._f: MappedSafetensors | None = MappedSafetensors(self.path, digest)
        self._keys: set[str] = set(self._f.keys())

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f = None

    def kind(self, name: str) -> str:
        """"dense", "q4_1" (4-bit, scale and min per 32), "q8_0" (int8, scale per 32 or 16)
        or "q8_1" (unsigned bytes, scale and min per 32): told apart by the stored shapes."""
        if name in self._keys:
            return "dense"
        if f"{name}.qweight" in self._keys and f"{name}.mins" in self._keys:
            q, s = self.shape(f"{name}.qweight"), self.shape(f"{name}.scales")
            return "q8_1" if q[1] == Q4_1_GROUP * s[1] else "q4_1"
        if f"{name}.qweight" in self._keys and f"{name}.scales" in self._keys:
            return "q8_0"
        raise KeyError(f"tensor {name!r} not found in {self.path}")

    def shape(self, key: str) -> list[int]:
        """A stored tensor's shape, read from the header (no data is loaded)."""
        assert self._f is not None, "the WeightFile is closed"
        return self._f.shape(key)

    def dense_shape(self, name: str) -> tuple[int, int]:
        """A weight's [N, K] as a matrix, whatever its stored kind."""
        kind = self.kind(name)
        n, k = self.shape(f"{name}.qweight" if kind != "dense" else name)[:2]
        return n, k * 2 if kind == "q4_1" else k

    def get(self, key: str) -> torch.Tensor:
        assert self._f is not None, "the WeightFile is closed"
        return self._f.get(key)

    def q4_1(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.get(f"{name}.qweight"), self.get(f"{name}.scales"), self.get(f"{name}.mins")

    def q8_0(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(f"{name}.qweight"), self.get(f"{name}.scales")

    def blocks(self, name: str) -> tuple[torch.Tensor, ...]:
        """The stored tensors of a quantized weight: qweight, scales (and mins)."""
        keys = [f"{name}.qweight", f"{name}.scales", f"{name}.mins"]
        return tuple(self.get(k) for k in keys if k in self._keys)

    def dense(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32."""
        kind = self.kind(name)
        if kind == "dense":
            return self.get(name).to(torch.float32)
        return dequantize(kind, self.blocks(name))


def _tiles_fit(wf: WeightFile, name: str) -> bool:
    kind = wf.kind(name)
    shape = wf.shape(f"{name}.qweight" if kind != "dense" else name)
    k = shape[1] * 2 if kind == "q4_1" else shape[1]
    return shape[0] % KERNEL_TILE == 0 and k % Q4_1_GROUP == 0


def resolve_weight_format(weight_format: str, compute_dtype: torch.dtype) -> str:
    """The format a network's linears are built in: ``weight_format`` (one of WEIGHT_FORMATS,
    a dense one only in its own dtype), except w4a8 where m4's kernels are not built: the
    same weights then run as int4."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    dense_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(weight_format)
    if dense_dtype is not None and compute_dtype != dense_dtype:
        raise ValueError(f"weight_format {weight_format!r} computes in {dense_dtype}, not {compute_dtype}")
    if weight_format == "w4a8" and not kernels.available():
        log.warning("weight_format w4a8 needs m4's CPU kernels, which are not built here "
                    "(python -m m4d.model.kernels build): the same weights run as int4")
        weight_format = "int4"
    if weight_format in ("int4", "int8") and compute_dtype != torch.bfloat16:
        log.warning("%s weights with %s activations: the CPU kernels are 12-27x slower than bf16",
                    weight_format, compute_dtype)
    return weight_format


def build_linear(wf: WeightFile, names: list[str], weight_format: str,
                 dtype: torch.dtype) -> nn.Module:
    """One linear whose output rows are the named weights concatenated (fused q/k/v, gate/up)."""
    if weight_format == "w4a8" and not all(_tiles_fit(wf, n) for n in names):
        weight_format = "int4"  # torch's kernels take any shape
    if weight_format == "w4a8" and all(wf.kind(n) != "dense" for n in names):
        return stored_linear([wf.blocks(n) for n in names], [wf.kind(n) for n in names])
    if weight_format == "int4" and all(wf.kind(n) == "q4_1" for n in names) \
            and all(wf.get(f"{n}.scales").dtype == torch.float16 for n in names):
        parts = [wf.q4_1(n) for n in names]
        qw, sc, mn = (torch.from_numpy(np.concatenate([p[i].numpy() for p in parts]))
                      for i in range(3))  # numpy: see unpack_int4
        return Int4WeightOnlyLinear.from_q4_1(qw, sc, mn, dtype=dtype)
    w = torch.cat([wf.dense(n) for n in names])  # [sum N, K] float32
    if weight_format == "w4a8":
        return q4_1_from_float(w)
    if weight_format == "int4":
        return Int4WeightOnlyLinear.from_float(w, dtype=dtype)
    if weight_format == "int8":
        return Int8WeightOnlyLinear.from_float(w, dtype=dtype)
    if weight_format == "w8a8":
        return Int8DynamicLinear.from_float(w, dtype=dtype)
    if weight_format in ("bfloat16", "float32"):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        return lin
    raise ValueError(f"unknown weight format {weight_format!r}")
