"""The backbone's LoRA adapters as the fused decode step takes them (model execution stage).

An image's ``lora`` components (PEFT folders) are read on first use and kept, converted to
``m4.decode_layers``' fused form (``m4d.adapters.lora.decode_tensors``), under a byte budget:
the least recently used one goes when a new one does not fit (vLLM's ``max_loras``, by
bytes). Each step asks ``step(names)`` for its rows' adapters: the tensors of the adapters
present, once each, and every row's index among them (-1: none), as in Punica's BGMV.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from m4d.adapters.heads import Head, read_head
from m4d.adapters.lora import AdapterError, decode_tensors, llama_sizes, read_peft
from m4d.model.llama import Llama, LlamaConfig, RowAdapters

log = logging.getLogger(__name__)


class AdapterBank:
    def __init__(self, specs: Mapping[str, Mapping[str, Any]], config: LlamaConfig,
                 path: Callable[[str], Path], budget_bytes: int) -> None:
        # name -> the image's lora components on the backbone (`specs`: all its components)
        self.specs = {n: s for n, s in specs.items()
                      if s["kind"] == "lora" and s.get("module") == "backbone"}
        self.config = config
        self.path = path
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.loads = 0  # adapters read from the image (again after an eviction)
        self.evictions = 0

    @property
    def names(self) -> list[str]:
        return sorted(self.specs)

    @property
    def resident_bytes(self) -> int:
        return sum(_nbytes(t) for t in self._loaded.values())

    def step(self, names: Sequence[str]) -> RowAdapters | None:
        """The adapters of a step's rows ("" = none), or None when no row has one."""
        present = list(dict.fromkeys(n for n in names if n))
        if not present:
            return None
        tensors: list[torch.Tensor] = []
        for name in present:
            tensors += self.get(name, keep=present)
        index = {name: i for i, name in enumerate(present)}
        return tensors, torch.tensor([index.get(n, -1) for n in names], dtype=torch.long)

    def get(self, name: str, keep: Sequence[str] = ()) -> list[torch.Tensor]:
        """One adapter's fused tensors, read from the image on first use; AdapterError for
        an adapter the image lacks or one that does not fit the backbone."""
        found = self._loaded.get(name)
        if found is not None:
            self._loaded.move_to_end(name)
            return found
        spec = self.specs.get(name)
        if spec is None:
            raise AdapterError(f"the image has no adapter {name!r}")
        cfg = self.config
        lora = read_peft(self.path(str(spec["dir"])), "backbone")
        tensors = decode_tensors(lora, cfg.n_layers, llama_sizes(
            cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim))
        size = _nbytes(tensors)
        while self._loaded and self.resident_bytes + size > self.budget_bytes:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break  # every loaded one is in this step: go over the budget for it
            del self._loaded[victim]
            self.evictions += 1
            log.info("adapter evicted", extra={"adapter": victim})
        self._loaded[name] = tensors
        self.loads += 1
        log.info("adapter loaded", extra={"adapter": name, "bytes": size, "rank": lora.rank,
                                          "targets": lora.targets})
        return tensors


class HeadBank:
    """The image's task heads on the text encoder (``head`` components), read on first use
    (a few KB each: kept once read)."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], path: Callable[[str], Path]) -> None:
        self.specs = {n: s for n, s in specs.items() if s["kind"] == "head"}
        self.path = path
        self._loaded: dict[str, Head] = {}

    def logits(self, name: str, vectors: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The head's labels and its logits [N, L] for pooled encoder vectors [N, D]."""
        head = self._loaded.get(name)
        if head is None:
            if name not in self.specs:
                raise AdapterError(f"the image has no task head {name!r}")
            head = self._loaded[name] = read_head(self.path(str(self.specs[name]["dir"])))
        return head.labels, head.logits(vectors)


def unserved_reason(backbone: Llama | None) -> str:
    """Why a loaded backbone cannot serve adapters ("" when it can, or there is none)."""
    if backbone is None or backbone.serves_adapters:
        return ""
    return ("adapters run in m4's fused decode step, which this configuration does not use "
            "(it needs weight_format w4a8 in float32 with m4's kernels built)")


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
