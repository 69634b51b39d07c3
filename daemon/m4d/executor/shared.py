"""Converted weights shared by the images loaded at once (executor stage).

During a hot swap two images are loaded side by side. Weights used as stored are views of
the image files, so an image whose file has the same content digest maps the same pages
(`m4d.model.mapped`). Weights converted at load (packed for the kernels, cast to the
compute dtype) are private memory: loading them again for the new image would hold two
copies until the old image retires. A model loaded from the same file (digest), in the same
format, dtype and device, is therefore not loaded again: the new image gets its own module
tree over the same weight tensors (its own KV caches and layer stack), made by deep-copying
the loaded one with every weight tensor kept as it is. Weights are never written after load.
"""

from __future__ import annotations

import copy
import json
import logging
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from torch import nn

from m4d.executor.memory import own_mapping
from m4d.model.block_linear import BlockEmbedding
from m4d.model.kv_cache import KVCache
from m4d.model.mapped import mapped_digests

M = TypeVar("M", bound=nn.Module)

log = logging.getLogger(__name__)

_loaded: weakref.WeakValueDictionary[Hashable, nn.Module] = weakref.WeakValueDictionary()


def model_key(digest: str | None, *how: object, config: dict[str, Any]) -> Hashable | None:
    """What makes two loads the same model: the weight file's content, how it is loaded
    (kind, format, dtype, device) and the config; None (never shared) without a digest."""
    return (digest, *map(str, how), json.dumps(config, sort_keys=True)) if digest else None


def shared_load(key: Hashable | None, load: Callable[[], M]) -> tuple[M, bool]:
    """The model `load()` makes (its converted weights moved to a mapping of their own,
    `own_mapping`), or (True) a copy over the weights of the one loaded under `key` that is
    still alive. `key` None: always loaded."""
    loaded = _loaded.get(key) if key is not None else None
    if loaded is not None:
        return share_weights(loaded), True  # type: ignore[return-value]
    model = load()
    own_mapping(model)
    if key is not None:
        _loaded[key] = model
    return model, False


def share_weights(model: M) -> M:
    """A new module tree whose parameters and buffers are `model`'s own tensors; per-use
    state is not copied: KV caches and the layer stack over them are None in the copy (the
    caller sets them up)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        memo[id(t)] = t
    for m in model.modules():
        if isinstance(m, BlockEmbedding):
            for t in m.blocks:
                memo[id(t)] = t
        elif isinstance(m, KVCache):
            memo[id(m)] = None
    stack = model.__dict__.get("_stack")
    if stack is not None:
        memo[id(stack)] = None
    return copy.deepcopy(model, memo)


def loaded_digests() -> set[str]:
    """The content digests of the weight files whose models or maps are loaded now."""
    return {key[0] for key in list(_loaded.keys())
            if isinstance(key, tuple) and key and isinstance(key[0], str)} | mapped_digests()


def unshared_bytes(files: dict[str, Any]) -> int:
    """Bytes of an image's weight files (safetensors; `files`: path -> entry with size and
    sha256) whose content is not loaded already: what loading it beside adds, about."""
    loaded = loaded_digests()
    return sum(e.size for rel, e in files.items()
               if rel.endswith(".safetensors") and e.sha256 not in loaded)
