"""The backbone's LoRA adapters as the fused decode step takes them, the text encoder's
LoRA adapters and task heads (model execution stage).

An image's ``lora`` components (PEFT folders) are read on first use and kept, converted to
``m4.decode_layers``' fused form (``m4d.adapters.lora.decode_tensors``) in bfloat16 with each
fused part's row spans: half the memory of float32 and half the bytes a decode step reads,
the zeros between a fused linear's parts not read at all. bf16 keeps 8 bits of mantissa
(each value rounded within 2^-9 of itself, relatively), and an adapter's delta is a small
fraction of each output, so the rounding moves an output by that fraction of 2^-9 of it.
They are kept under a byte budget:
the least recently used one goes when a new one does not fit (vLLM's ``max_loras``, by
bytes). Each step asks ``step(names)`` for its rows' adapters: the tensors of the adapters
present, once each, and every row's index among them (-1: none), as in Punica's BGMV.

The text encoder's ``lora`` components (``module`` "text_encoder") are kept the same way, in
the encoder's per-row form (``m4d.model.bert.LowRank``: float32, each fused part's own slice
of B, on the encoder's device), under a budget of their own; an encoder pass asks
``rows(names)`` for its texts' adapters.

Add-ons (``m4d.service.addons``) put components into a running bank (``add``, their files
under the add-on's own directory) and take them out (``retire``). The engine holds the
component of every request it accepts until the request ends (``holding``, ``release``): a
retired component takes no new request at once, and goes (its memory, and then its files)
only when the last request holding it has ended, so no call already accepted ever fails. The
banks are read on the executor thread and changed from the event loop: a lock guards them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from m4d.adapters.heads import Head, read_head
from m4d.adapters.lora import (
    AdapterError,
    Lora,
    decode_tensors,
    encoder_terms,
    read_peft,
    sizes_for,
)
from m4d.errors import InvalidArgument
from m4d.model.bert import BertConfig, LowRank, RowLoras
from m4d.model.llama import Llama, LlamaConfig, RowAdapters

log = logging.getLogger(__name__)

# the component kinds the banks serve: read on first use, inside the module they adapt (not
# loaded, placed or counted at start-up like the image's networks)
ADAPTER_KINDS = ("lora", "head")


class _Components:
    """The components of one kind a bank serves: the image's (files under the image) and
    add-ons' (files under their own root), with the requests holding each."""

    kind = ""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], path: Callable[[str], Path]) -> None:
        self.specs = {n: s for n, s in specs.items() if self._serves(s)}
        self.path = path  # the image's files
        self._roots: dict[str, Path] = {}  # an add-on component's root (its add-on directory)
        self._holds: dict[str, int] = {}  # requests accepted and not ended, per component
        self._retired: dict[str, list[Callable[[], None]]] = {}  # going once nobody holds it
        self._lock = threading.RLock()

    def _serves(self, spec: Mapping[str, Any]) -> bool:
        return bool(spec.get("kind") == self.kind)

    @property
    def names(self) -> list[str]:
        """The components that take new requests."""
        with self._lock:
            return sorted(n for n in self.specs if n not in self._retired)

    def folder(self, name: str) -> Path:
        spec = self.specs[name]
        root = self._roots.get(name)
        return root / str(spec["dir"]) if root is not None else self.path(str(spec["dir"]))

    def add(self, name: str, spec: Mapping[str, Any], root: Path) -> None:
        """Serve an add-on's component, its files under `root`, from now on."""
        if not self._serves(spec):
            raise AdapterError(f"{name}: a {spec.get('kind')} component is not a {self.kind}")
        with self._lock:
            if name in self.specs:
                raise AdapterError(f"a component named {name!r} is served already")
            self.specs[name], self._roots[name] = dict(spec), root

    def retire(self, name: str, gone: Callable[[], None]) -> int:
        """Take no new request for `name`; drop it once no request holds it, then call
        `gone` (at once, or on the executor thread). Returns the requests still holding it."""
        with self._lock:
            if name not in self.specs:
                gone()
                return 0
            self._retired.setdefault(name, []).append(gone)
            held = self._holds.get(name, 0)
            if not held:
                self._drop(name)
            return held

    def hold(self, name: str) -> None:
        with self._lock:
            if name not in self.specs or name in self._retired:
                raise AdapterError(f"no {self.kind} {name!r} is served (any more)")
            self._holds[name] = self._holds.get(name, 0) + 1

    def release(self, name: str) -> None:
        with self._lock:
            left = self._holds.get(name, 0) - 1
            if left > 0:
                self._holds[name] = left
                return
            self._holds.pop(name, None)
            if name in self._retired:
                self._drop(name)

    def _drop(self, name: str) -> None:
        """Forget a retired component (under the lock) and tell whoever waits for it."""
        self.specs.pop(name, None)
        self._roots.pop(name, None)
        self._forget(name)
        for gone in self._retired.pop(name, []):
            gone()
        log.info(f"{self.kind} retired", extra={"component": name})

    def _forget(self, name: str) -> None:
        """Drop what was loaded of it."""


Loaded = TypeVar("Loaded")


class _LoraBank(_Components, Generic[Loaded]):
    """LoRA components of one module, read on first use, converted (`_convert`) and kept
    under a byte budget: the least recently used one goes when a new one does not fit."""

    kind = "lora"
    module = ""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], path: Callable[[str], Path],
                 budget_bytes: int) -> None:
        super().__init__(specs, path)
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[str, tuple[Loaded, int]] = OrderedDict()  # name -> (form, bytes)
        self.loads = 0  # adapters read from the image (again after an eviction)
        self.evictions = 0

    def _serves(self, spec: Mapping[str, Any]) -> bool:
        return spec.get("kind") == "lora" and spec.get("module") == self.module

    def _forget(self, name: str) -> None:
        self._loaded.pop(name, None)

    def _convert(self, lora: Lora) -> tuple[Loaded, int]:
        """The adapter in the form its module runs it, and that form's bytes."""
        raise NotImplementedError

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._loaded.values())

    def get(self, name: str, keep: Sequence[str] = ()) -> Loaded:
        """One adapter as its module runs it, read from its files on first use; AdapterError
        for an adapter the bank lacks or one that does not fit the module."""
        with self._lock:
            found = self._loaded.get(name)
            if found is not None:
                self._loaded.move_to_end(name)
                return found[0]
            if name not in self.specs:
                raise AdapterError(f"the image has no adapter {name!r}")
            folder = self.folder(name)
        lora = read_peft(folder, self.module)  # outside the lock: the event loop may add one
        loaded, size = self._convert(lora)
        with self._lock:
            while self._loaded and self.resident_bytes + size > self.budget_bytes:
                victim = next((n for n in self._loaded if n not in keep), None)
                if victim is None:
                    break  # every loaded one is in this step: go over the budget for it
                del self._loaded[victim]
                self.evictions += 1
                log.info("adapter evicted", extra={"adapter": victim})
            if name in self.specs:  # (a retired one that went meanwhile is not kept)
                self._loaded[name] = (loaded, size)
            self.loads += 1
        log.info("adapter loaded", extra={"adapter": name, "adapts": self.module, "bytes": size,
                                          "rank": lora.rank, "targets": lora.targets})
        return loaded


class AdapterBank(_LoraBank[list[torch.Tensor]]):
    """The backbone's LoRA components, in ``m4.decode_layers``' fused form (bf16, row spans)."""

    module = "backbone"

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], config: LlamaConfig,
                 path: Callable[[str], Path], budget_bytes: int) -> None:
        # name -> the image's lora components on the backbone (`specs`: all its components)
        super().__init__(specs, path, budget_bytes)
        self.config = config

    def _convert(self, lora: Lora) -> tuple[list[torch.Tensor], int]:
        cfg = self.config
        tensors = decode_tensors(lora, cfg.n_layers, sizes_for(cfg), dtype=torch.bfloat16, spans=True)
        return tensors, _nbytes(tensors)

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


EncoderTerms = list[dict[str, LowRank]]  # per layer, each adapted fused linear's terms


class EncoderLoraBank(_LoraBank[EncoderTerms]):
    """The text encoder's LoRA components, as its forward pass adds them per row."""

    module = "text_encoder"

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], config: BertConfig,
                 path: Callable[[str], Path], budget_bytes: int,
                 device: torch.device | None = None) -> None:
        super().__init__(specs, path, budget_bytes)
        self.config = config
        self.device = device  # the encoder's (None: the CPU)

    def _convert(self, lora: Lora) -> tuple[EncoderTerms, int]:
        layers = encoder_terms(lora, self.config, self.device)
        return layers, sum(t.nbytes for layer in layers for t in layer.values())

    def rows(self, names: Sequence[str]) -> RowLoras | None:
        """The adapters of a pass's texts ("" = none), or None when no text has one."""
        present = list(dict.fromkeys(n for n in names if n))
        if not present:
            return None
        index = {name: i for i, name in enumerate(present)}
        return RowLoras([self.get(name, keep=present) for name in present],
                        torch.tensor([index.get(n, -1) for n in names], dtype=torch.long))


class HeadBank(_Components):
    """The task heads on the text encoder (``head`` components), read on first use (a few KB
    each, a few hundred KB for an MLP head: kept once read)."""

    kind = "head"

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], path: Callable[[str], Path]) -> None:
        super().__init__(specs, path)
        self._loaded: dict[str, Head] = {}

    def _forget(self, name: str) -> None:
        self._loaded.pop(name, None)

    def logits(self, name: str, vectors: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The head's labels and its logits [N, L] for pooled encoder vectors [N, D]."""
        with self._lock:
            head = self._loaded.get(name)
            if head is None and name not in self.specs:
                raise AdapterError(f"the image has no task head {name!r}")
            folder = self.folder(name) if head is None else None
        if folder is not None:
            head = read_head(folder)
            with self._lock:
                if name in self.specs:
                    self._loaded[name] = head
        assert head is not None
        return head.labels, head.logits(vectors)


def encoder_adapters(components: Mapping[str, Mapping[str, Any]],
                     served: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a text-encoder task may name as its adapter, each with the LoRA on the encoder it
    runs with: a LoRA on the encoder (itself), a task head (the LoRA named in its spec's
    "lora", "" for none). `served`: the names components are served as (an add-on's)."""
    served = served or {}
    out: dict[str, str] = {}
    for name, spec in components.items():
        key = served.get(name, name)
        if spec.get("kind") == "lora" and spec.get("module") == "text_encoder":
            out[key] = key
        elif spec.get("kind") == "head":
            lora = str(spec.get("lora") or "")
            out[key] = served.get(lora, lora)
    return out


def _held(runtime: Any, request: Any) -> list[tuple[_Components, str]]:
    """The components a request runs through: its adapter (generation, media), its trained
    head (Classify) and its LoRA on the text encoder (Embed, Classify), in the runtime's banks."""
    out: list[tuple[_Components, str]] = []
    for field, bank_name in (("adapter", "adapters"), ("head", "heads"),
                             ("encoder_lora", "encoder_loras")):
        name, bank = getattr(request, field, ""), getattr(runtime, bank_name, None)
        if name and bank is not None:
            out.append((bank, name))
    return out


@contextlib.contextmanager
def holding(runtime: Any, request: Any) -> Iterator[None]:
    """Holds the request's adapter or head until `release` (the engine calls it when the
    request ends); refused with InvalidArgument when it was removed, and let go again when
    the block raises (the request was not accepted)."""
    taken: list[tuple[_Components, str]] = []
    try:
        for bank, name in _held(runtime, request):
            try:
                bank.hold(name)
            except AdapterError:
                raise InvalidArgument(
                    f"unknown task {request.task!r}: its {bank.kind} {name!r} was removed "
                    "(`m4ctl adapter list` shows the installed add-ons)") from None
            taken.append((bank, name))
        yield
    except BaseException:
        for bank, name in taken:
            bank.release(name)
        raise


def release(runtime: Any, request: Any) -> None:
    """The request has ended: its adapter or head is no longer held by it."""
    for bank, name in _held(runtime, request):
        bank.release(name)


def unserved_reason(backbone: Llama | None) -> str:
    """Why a loaded backbone cannot serve adapters ("" when it can, or there is none)."""
    if backbone is None or backbone.serves_adapters:
        return ""
    return ("adapters run in m4's fused decode step, which this configuration does not use "
            "(it needs weight_format w4a8 in float32 with m4's kernels built)")


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
