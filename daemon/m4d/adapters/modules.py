"""LoRA in torch over M4's own networks (model stage): training, the reference forward, merging.

``attach`` puts a ``LoraLinear`` in place of each fused linear an adapter touches, in a Llama
or a BERT encoder: the base linear as it is (any format: dense, int4, the kernels' blocks),
plus each part's ``s·B·(A·x)`` added into the part's rows of the output, as PEFT computes it.
With ``trainable`` the A and B are parameters (the base stays frozen) and ``collect`` gives
the trained adapter back. ``merge`` folds an adapter into dense weights (the "merged equals
unmerged" check). Serving with many adapters in one batch is the fused decode step's job
(``m4.decode_layers``' per-row ``lora``), not this module's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4d.adapters.lora import (
    FUSED,
    AdapterError,
    FusedPart,
    Lora,
    LoraPair,
    fused_parts,
    sizes_for,
)


class LoraLinear(nn.Module):
    """``base(x)`` plus, for each adapted part, ``s·(x·Aᵀ)·Bᵀ`` in the part's output rows."""

    def __init__(self, base: nn.Module, parts: Sequence[tuple[FusedPart, LoraPair]],
                 trainable: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.dropout = dropout  # on the adapter's input, in training only (as PEFT)
        self.parts = [part for part, _ in parts]
        self.scaling = [pair.scaling for _, pair in parts]
        self.a = nn.ParameterList(nn.Parameter(p.a.clone(), requires_grad=trainable) for _, p in parts)
        self.b = nn.ParameterList(nn.Parameter(p.b.clone(), requires_grad=trainable) for _, p in parts)
        self.n_out = 0

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.base(x)  # [..., N]
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout)
        pieces: list[Tensor] = []
        at = 0
        for part, a, b, s in zip(self.parts, self.a, self.b, self.scaling, strict=True):
            if part.start > at:
                pieces.append(y.new_zeros(*y.shape[:-1], part.start - at))
            pieces.append(F.linear(F.linear(x.to(a.dtype), a), b) * s)  # [..., part rows]
            at = part.stop
        if at < y.shape[-1]:
            pieces.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - at))
        return y + torch.cat(pieces, dim=-1).to(y.dtype)

    def pairs(self) -> Iterator[tuple[str, LoraPair]]:
        for part, a, b, s in zip(self.parts, self.a, self.b, self.scaling, strict=True):
            yield part.name, LoraPair(a.detach().clone(), b.detach().clone(), s)


def _model_kind(model: nn.Module) -> str:
    from m4d.model.bert import BertEncoder
    from m4d.model.llama import Llama

    if isinstance(model, Llama):
        return "backbone"
    if isinstance(model, BertEncoder):
        return "text_encoder"
    raise AdapterError(f"adapters attach to a Llama or a BERT encoder, not {type(model).__name__}")


def _sizes(model: nn.Module) -> dict[str, tuple[list[int], int]]:
    _model_kind(model)  # a Llama or a BERT encoder, else AdapterError
    return sizes_for(model.config)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers: Any = model.layers
    return list(layers)


def _get(layer: nn.Module, path: str) -> nn.Module:
    owner, name = path.split(".")
    return getattr(getattr(layer, owner), name)  # type: ignore[no-any-return]


def _set(layer: nn.Module, path: str, module: nn.Module) -> None:
    owner, name = path.split(".")
    setattr(getattr(layer, owner), name, module)


def attach(model: nn.Module, lora: Lora, trainable: bool = False,
           dropout: float = 0.0) -> list[LoraLinear]:
    """Wraps every fused linear the adapter touches (in place); returns the wrappers.
    Refuses an adapter for another module or with linears the model does not have."""
    kind = _model_kind(model)
    if lora.module != kind:
        raise AdapterError(f"the adapter is for the {lora.module}, not the {kind}")
    detach(model)
    sizes = _sizes(model)
    wrapped: list[LoraLinear] = []
    used: set[str] = set()
    for i, layer in enumerate(_layers(model)):
        for ours, parts in fused_parts(kind, i, sizes).items():
            present = [(p, lora.pairs[p.name]) for p in parts if p.name in lora.pairs]
            if not present:
                continue
            for part, pair in present:
                if pair.a.shape[1] != sizes[ours][1] or pair.b.shape[0] != part.stop - part.start:
                    raise AdapterError(f"{part.name}: lora_A {tuple(pair.a.shape)} / lora_B "
                                       f"{tuple(pair.b.shape)} do not fit the model")
            used.update(p.name for p, _ in present)
            wrapper = LoraLinear(_get(layer, ours), present, trainable, dropout)
            _set(layer, ours, wrapper)
            wrapped.append(wrapper)
    unknown = sorted(set(lora.pairs) - used)
    if unknown:
        detach(model)
        raise AdapterError(f"the adapter has linears the model does not: {', '.join(unknown[:4])}")
    _rebuild(model)
    return wrapped


def detach(model: nn.Module) -> None:
    """Puts the base linears back wherever an adapter was attached."""
    for layer in _layers(model):
        for ours in FUSED[_model_kind(model)]:
            module = _get(layer, ours)
            if isinstance(module, LoraLinear):
                _set(layer, ours, module.base)
    _rebuild(model)


def _rebuild(model: nn.Module) -> None:
    # a Llama's layer stack holds its linears' tensors (fused step) or a script of them
    rebuild = getattr(model, "rebuild_stack", None)
    if rebuild is not None:
        rebuild()


def collect(model: nn.Module, like: Lora) -> Lora:
    """The adapter as the attached (trained) wrappers hold it, with `like`'s settings."""
    out = Lora(like.module, like.rank, like.alpha, rslora=like.rslora, base_model=like.base_model)
    for layer in _layers(model):
        for ours in FUSED[like.module]:
            module = _get(layer, ours)
            if isinstance(module, LoraLinear):
                out.pairs.update(module.pairs())
    return out


def new_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str],
             seed: int = 0, layers: Sequence[int] | None = None) -> Lora:
    """A fresh adapter as PEFT initialises one: A Kaiming-uniform, B zero (the model is
    unchanged until trained). `targets`: HF linear names (q_proj, v_proj, query, ...)."""
    kind = _model_kind(model)
    sizes = _sizes(model)
    gen = torch.Generator().manual_seed(seed)
    lora = Lora(kind, rank, alpha)
    n_layers = len(_layers(model))
    for i in layers if layers is not None else range(n_layers):
        for ours, parts in fused_parts(kind, i, sizes).items():
            for part in parts:
                if part.name.rsplit(".", 1)[-1] not in targets:
                    continue
                fan_in = sizes[ours][1]
                bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear
                a = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound
                lora.pairs[part.name] = LoraPair(a, torch.zeros(part.stop - part.start, rank),
                                                 lora.scaling(rank, alpha))
    if not lora.pairs:
        raise AdapterError(f"no linear of the {kind} is named {', '.join(targets)}")
    return lora


@torch.no_grad()
def merge(model: nn.Module, lora: Lora) -> None:
    """Adds ``s·B·A`` into the dense weights of the fused linears (a float model only)."""
    kind = _model_kind(model)
    sizes = _sizes(model)
    for i, layer in enumerate(_layers(model)):
        for ours, parts in fused_parts(kind, i, sizes).items():
            linear = _get(layer, ours)
            for part in parts:
                pair = lora.pairs.get(part.name)
                if pair is None:
                    continue
                if not isinstance(linear, nn.Linear) or not linear.weight.is_floating_point():
                    raise AdapterError(f"{part.name}: only dense float weights can be merged")
                delta = (pair.b @ pair.a) * pair.scaling  # [part rows, in]
                linear.weight[part.start:part.stop] += delta.to(linear.weight.dtype)
    _rebuild(model)
