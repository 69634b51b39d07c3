"""The Llama decoder's layer loop as one call per step (model execution stage).

``Llama`` runs its layers through a ``LayerStack``: for w4a8 linears in float32 every cached
forward is one C++ call (``m4.decode_layers``) over the same weights and KV caches, which
releases the GIL for the whole step (such a stack stays eager: a 16-row step beside a busy
Python thread measured 38.1 ms eager and 39.7 ms scripted); any other stack is TorchScript'd,
so a whole forward is one call that releases the GIL once. ``script_stack`` compiles a stack,
falling back to the eager loop where TorchScript cannot.
"""

# no `from __future__ import annotations`: TorchScript compiles LayerStack.forward
import logging
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)


class LayerStack(nn.Module):
    """The decoder layers run in order, as one TorchScript function.

    Why: torch releases the GIL inside each kernel but needs it back between the ~1500 ops
    of a decode step, and in m4d the event loop thread holds it while it streams tokens. A
    Python thread busy ~30% of a core made the eager 16-row step 1.6x slower in process
    (bench/bench_gil.py); the scripted stack runs its whole loop in the TorchScript
    interpreter, which releases the GIL once for the call. It shares the layers' weights and
    KV caches (no copies) and computes the same numbers (tests/model/test_llama_cache.py).

    ``torch.jit.script`` is deprecated as of torch 2.13 (pinned here). Its successors do not
    do this job yet: a ``torch.compile``d graph still runs its wrapper code in Python, and
    inductor cannot lower the w8a8 layer's oneDNN op without frozen weights. AOTInductor
    (``torch.export`` + a compiled C++ wrapper) is the way forward when it is worth a build
    step.

    With w4a8 linears and float32 activations (m4d's default), a cached forward (a decode
    step, or a prompt chunk) skips the loop: ``m4.decode_layers`` runs all layers in one C++
    call over the same weights and caches (``fused``, built by ``Llama._fused_tensors``),
    because the ~45 small torch ops per layer that glue its GEMMs together cost a fifth of a
    decode step and a third of a prefill. Each token is one row of that call, attending over
    positions [0, its own] of its sequence's slot: a token's numbers are the same whether it
    came in a prompt or was decoded, whatever else ran beside it.
    """

    fused: list[torch.Tensor]  # the tensors of m4.decode_layers, or empty: no fused step
    kinds: list[int]  # the weight kind of each of its linears, 4 per layer

    def __init__(self, layers: nn.ModuleList,
                 fused: tuple[list[torch.Tensor], list[int]] | None = None,
                 n_heads: int = 0, n_kv_heads: int = 0, eps: float = 0.0,
                 scale: float = 0.0) -> None:
        super().__init__()
        self.layers = layers
        self.fused, self.kinds = fused or ([], [])
        self.n_heads, self.n_kv_heads, self.eps, self.scale = n_heads, n_kv_heads, eps, scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, input_pos: torch.Tensor | None,
                rows: torch.Tensor | None, length: int,
                lora: list[torch.Tensor], adapters: torch.Tensor | None) -> torch.Tensor:
        # lora, adapters: the step's LoRA tensors and each row's adapter (-1: none), as
        # m4.decode_layers takes them; only the fused step serves adapters
        if len(self.fused) > 0 and mask is not None and input_pos is not None:
            # every token is a row of the step: a prompt's tokens attend over [0, pos] of
            # their sequence's slot like decoding rows, their keys written first
            b, s, d = x.size(0), x.size(1), x.size(2)
            row_idx = rows if rows is not None else torch.arange(b, device=x.device)
            if s > 1:
                row_idx = row_idx.repeat_interleave(s)
                if adapters is not None:
                    adapters = adapters.repeat_interleave(s)
            out: torch.Tensor = torch.ops.m4.decode_layers(
                x.reshape(b * s, d), self.fused, self.kinds, row_idx, input_pos.reshape(b * s),
                cos.reshape(b * s, -1), sin.reshape(b * s, -1), self.n_heads, self.n_kv_heads,
                self.eps, self.scale, lora, adapters)
            return out.view(b, s, d)
        if adapters is not None:
            raise RuntimeError("per-row adapters run in the fused decode step only")
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, rows, length)
        return x


def script_stack(stack: LayerStack) -> nn.Module:
    """The stack as one TorchScript function; the stack itself (its layers run eagerly) when
    TorchScript cannot compile them."""
    try:
        with warnings.catch_warnings():  # deprecated in torch 2.13, which we pin
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted: nn.Module = torch.jit.script(stack)
    except Exception as exc:  # any compile failure means: run eagerly
        lines = [line for line in str(exc).splitlines() if line.strip()]
        log.warning("decoder layers run eagerly: TorchScript failed: %s: %s",
                    type(exc).__name__, " / ".join(lines[:6]))
        return stack
    return scripted
