"""Executor stage, M4 path 1: vision features -> backbone embeddings, and splicing them into a prompt.

Projector kinds (``ProjectorConfig.kind``):
* ``"linear"``      one linear layer (LLaVA v1).
* ``"mlp2x_gelu"``  linear - GELU - linear (LLaVA 1.5, HF ``LlavaMultiModalProjector``).
* ``"ldpnet"``      MobileVLM's lightweight downsample projector: the MLP, then two MobileNetV3
                    inverted-residual blocks on the token grid (depthwise 3x3 conv + LayerNorm +
                    Hardswish, squeeze-excite with Hardsigmoid, pointwise conv + LayerNorm); the
                    second has stride 2, so N tokens become N / 4. The first adds its input back.
* ``"ldpnetv2"``    MobileVLM V2: the MLP, adaptive average pooling of the grid to 12x12, then a
                    depthwise 3x3 conv added to its input (positional "PEG" layer).

Tensor names are our own (``w1``, ``dw``...); the importers map checkpoint names to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4d.errors import InvalidArgument
from m4d.model.block_linear import BlockEmbedding
from m4d.model.weights import load_into

KINDS = ("linear", "mlp2x_gelu", "ldpnet", "ldpnetv2")


def se_channels(channels: int) -> int:
    """Squeeze width of MobileNetV3's SE: channels / 4 rounded to a multiple of 8 (never < 90%)."""
    v = channels // 4
    r = max(8, (v + 4) // 8 * 8)
    return r + 8 if r < 0.9 * v else r


@dataclass
class ProjectorConfig:
    kind: str
    in_dim: int  # vision feature width (times the number of selected layers)
    out_dim: int  # backbone embedding width
    act: str = "gelu"  # mlp activation: "gelu" (erf) or "gelu_pytorch_tanh"
    bias: bool = True
    norm_eps: float = 1e-5  # LDP's channel LayerNorms
    pool_grid: int = 12  # LDPv2: tokens are pooled to pool_grid x pool_grid

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projector kind {self.kind!r}; use one of {KINDS}")
        if self.act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported projector activation {self.act!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjectorConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def n_tokens(self, n_in: int) -> int:
        """How many embeddings ``n_in`` vision tokens become."""
        if self.kind == "ldpnet":
            g = (_grid(n_in) - 1) // 2 + 1  # stride-2 conv, padding 1
            return g * g
        if self.kind == "ldpnetv2":
            return self.pool_grid * self.pool_grid
        return n_in


def _grid(n: int) -> int:
    g = int(n**0.5 + 0.5)
    if g * g != n:
        raise InvalidArgument(f"{n} vision tokens do not form a square grid")
    return g


class Mlp(nn.Module):
    """[B, N, Din] -> [B, N, D]: linear (then act - linear when ``depth`` is 2)."""

    def __init__(self, cfg: ProjectorConfig, depth: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.in_dim, cfg.out_dim, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.out_dim, cfg.out_dim, bias=cfg.bias) if depth == 2 else None
        self.tanh = cfg.act == "gelu_pytorch_tanh"

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.w1(x)
        if self.w2 is not None:
            y = self.w2(F.gelu(y, approximate="tanh" if self.tanh else "none"))
        return y


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class InvertedResidual(nn.Module):
    """MobileNetV3 block without expansion: dw3x3-LN-Hardswish, SE, pw1x1-LN (+x if stride 1)."""

    def __init__(self, c: int, stride: int, eps: float) -> None:
        super().__init__()
        self.stride = stride
        self.dw = nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
        self.dw_norm = ChannelNorm(c, eps=eps)
        s = se_channels(c)
        self.se_reduce = nn.Conv2d(c, s, 1)
        self.se_expand = nn.Conv2d(s, c, 1)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.pw_norm = ChannelNorm(c, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, C, G, G] -> [B, C, G', G'] (G' = ceil(G / stride))
        y = F.hardswish(self.dw_norm(self.dw(x)))
        scale = F.adaptive_avg_pool2d(y, 1)  # [B, C, 1, 1]
        scale = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(scale))))
        y = self.pw_norm(self.pw(y * scale))
        out: Tensor = x + y if self.stride == 1 else y
        return out


class Projector(nn.Module):
    """Vision features [B, N, Din] -> backbone embeddings [B, N', D]."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.config = cfg
        self.mlp = Mlp(cfg, 1 if cfg.kind == "linear" else 2)
        if cfg.kind == "ldpnet":
            self.blocks = nn.ModuleList([InvertedResidual(cfg.out_dim, 1, cfg.norm_eps),
                                         InvertedResidual(cfg.out_dim, 2, cfg.norm_eps)])
        if cfg.kind == "ldpnetv2":
            self.peg = nn.Conv2d(cfg.out_dim, cfg.out_dim, 3, 1, 1, groups=cfg.out_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp.w1.weight.dtype

    @torch.inference_mode()
    def forward(self, feats: Tensor) -> Tensor:
        if feats.dim() != 3 or feats.shape[-1] != self.config.in_dim:
            raise InvalidArgument(f"vision features must be [B, N, {self.config.in_dim}], got {list(feats.shape)}")
        x: Tensor = self.mlp(feats.to(self.dtype))  # [B, N, D]
        if self.config.kind in ("linear", "mlp2x_gelu"):
            return x
        b, n, d = x.shape
        g = _grid(n)
        x = x.transpose(1, 2).reshape(b, d, g, g)  # [B, D, G, G]
        if self.config.kind == "ldpnet":
            for block in self.blocks:
                x = block(x)
        else:
            x = F.adaptive_avg_pool2d(x, self.config.pool_grid)  # [B, D, P, P]
            x = x + self.peg(x)
        return x.flatten(2).transpose(1, 2)  # [B, N', D]


class MlpProjector(Projector):
    """LLaVA's projectors: "linear" and "mlp2x_gelu" (token count unchanged)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        if cfg.kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"MlpProjector takes 'linear' or 'mlp2x_gelu', not {cfg.kind!r}")
        super().__init__(cfg)


class LdpProjector(Projector):
    """MobileVLM's lightweight downsample projectors: "ldpnet" (v1) and "ldpnetv2"."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        if cfg.kind not in ("ldpnet", "ldpnetv2"):
            raise ValueError(f"LdpProjector takes 'ldpnet' or 'ldpnetv2', not {cfg.kind!r}")
        super().__init__(cfg)


def build_projector(cfg: ProjectorConfig) -> Projector:
    return LdpProjector(cfg) if cfg.kind.startswith("ldpnet") else MlpProjector(cfg)


def load_projector(weights: str | Path, cfg: ProjectorConfig, *,
                   compute_dtype: torch.dtype = torch.float32, device: str = "cpu") -> Projector:
    """Build on meta, read the (small) safetensors file and assign; returns an eval model."""
    with torch.device("meta"):
        model = build_projector(cfg)
    return load_into(model, weights, what="projector", compute_dtype=compute_dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Checkpoint names -> ours

def llava_to_canonical(get: Any, prefix: str = "model.multi_modal_projector.") -> dict[str, Tensor]:
    """HF ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``) -> ``mlp.w1``, ``mlp.w2``."""
    out: dict[str, Tensor] = {}
    for hf, ours in (("linear_1", "mlp.w1"), ("linear_2", "mlp.w2")):
        for p in ("weight", "bias"):
            t = get(f"{prefix}{hf}.{p}")
            if t is not None:
                out[f"{ours}.{p}"] = t
    return out


# MobileVLM: mm_projector is an nn.Sequential (Identity, Linear, GELU, Linear) then, for LDP,
# mb_block = (Identity, InvertedResidual, InvertedResidual) with torchvision's layout
# block.0 = dw conv + norm, block.1 = SE (fc1, fc2), block.2 = pw conv + norm.
_MOBILEVLM_BLOCK = {
    "block.0.0.weight": "dw.weight", "block.0.1.weight": "dw_norm.weight",
    "block.0.1.bias": "dw_norm.bias", "block.1.fc1.weight": "se_reduce.weight",
    "block.1.fc1.bias": "se_reduce.bias", "block.1.fc2.weight": "se_expand.weight",
    "block.1.fc2.bias": "se_expand.bias", "block.2.0.weight": "pw.weight",
    "block.2.1.weight": "pw_norm.weight", "block.2.1.bias": "pw_norm.bias",
}


def mobilevlm_to_canonical(get: Any, kind: str, prefix: str = "model.mm_projector.") -> dict[str, Tensor]:
    """MobileVLM ``mm_projector`` tensors (ldpnet, ldpnetv2, mlp2x_gelu, linear) -> ours."""
    out: dict[str, Tensor] = {}
    if kind == "ldpnet":
        mlp = {"model.mlp.1": "mlp.w1", "model.mlp.3": "mlp.w2"}
    elif kind == "ldpnetv2":
        mlp = {"mlp.mlp.0": "mlp.w1", "mlp.mlp.2": "mlp.w2"}
    elif kind == "mlp2x_gelu":
        mlp = {"0": "mlp.w1", "2": "mlp.w2"}
    else:
        mlp = {"": "mlp.w1"}
    for src, ours in mlp.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = get(f"{prefix}{src}.{p}" if src else f"{prefix}{p}")
    if kind == "ldpnet":
        for i in (1, 2):
            for src, ours in _MOBILEVLM_BLOCK.items():
                out[f"blocks.{i - 1}.{ours}"] = get(f"{prefix}model.mb_block.{i}.{src}")
    if kind == "ldpnetv2":
        for p in ("weight", "bias"):
            out[f"peg.{p}"] = get(f"{prefix}peg.peg.0.{p}")
    return out


# ---------------------------------------------------------------------------------------------
# Prompt assembly

def splice_image(embeds_of_ids: Tensor, ids: Tensor, image_token_id: int,
                 image_features: Tensor) -> Tensor:
    """Replace each image placeholder in a prompt by the N projected feature vectors of one image.

    embeds_of_ids: [1, S, D] (or [S, D]) embeddings of ``ids`` (the placeholder rows are
    ignored); ids: [1, S] or [S]; image_features: [K, N, D] or [N, D] for K placeholders, in
    order (LLaVA's convention: one ``<image>`` token expands to N positions).
    Returns [1, S - K + K * N, D].
    """
    emb = embeds_of_ids[0] if embeds_of_ids.dim() == 3 else embeds_of_ids  # [S, D]
    flat = ids.reshape(-1)
    feats = image_features if image_features.dim() == 3 else image_features.unsqueeze(0)  # [K, N, D]
    if embeds_of_ids.dim() == 3 and embeds_of_ids.shape[0] != 1:
        raise InvalidArgument(f"splice_image takes one prompt, got a batch of {embeds_of_ids.shape[0]}")
    if emb.dim() != 2 or emb.shape[0] != flat.numel():
        raise InvalidArgument(f"embeddings {list(embeds_of_ids.shape)} do not match ids {list(ids.shape)}")
    if feats.shape[-1] != emb.shape[-1]:
        raise InvalidArgument(f"image features have width {feats.shape[-1]}, the backbone {emb.shape[-1]}")
    where = (flat == image_token_id).nonzero().flatten().tolist()
    if len(where) != feats.shape[0]:
        raise InvalidArgument(f"the prompt has {len(where)} image placeholders but {feats.shape[0]} images were given")
    parts: list[Tensor] = []
    start = 0
    for k, pos in enumerate(where):
        parts += [emb[start:pos], feats[k].to(emb.dtype)]
        start = pos + 1
    parts.append(emb[start:])
    return torch.cat(parts).unsqueeze(0)


def embed_prompt(tok_embeddings: nn.Embedding | BlockEmbedding, ids: list[int], image_token_id: int,
                 image_features: Tensor) -> Tensor:
    """Embed ``ids`` with the backbone's table (placeholders may be out of the vocabulary, as
    LLaVA's -200) and splice the image features in: [1, S', D]."""
    vocab = tok_embeddings.num_embeddings
    bad = [t for t in ids if t != image_token_id and not 0 <= t < vocab]
    if bad:
        raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    t = torch.tensor(ids, dtype=torch.long)
    safe = torch.where(t == image_token_id, torch.zeros_like(t), t)
    with torch.inference_mode():
        emb = tok_embeddings(safe)  # [S, D]
    return splice_image(emb, t, image_token_id, image_features)
