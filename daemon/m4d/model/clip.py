"""Executor stage, image encoder: a CLIP vision transformer and (optionally) its text tower.

M4 path 3 (zero-shot classification, image-text retrieval) uses both towers and their
projections; M4 path 1 (LLaVA / MobileVLM) uses only ``vision_hidden``, the hidden state of one
encoder layer that the projector reads. Matches Hugging Face ``CLIPModel`` / ``CLIPVisionModel``:
patch conv without bias, class token, learned positions, pre-LN blocks, ``pre_layrnorm`` before
the blocks, ``post_layernorm`` on the class token only, bias-free projections; the text tower is
causal and pools the hidden state at the first EOS token.

Weights are the canonical names of this module (what ``m4d.builder.importers.hf_clip`` writes),
mmap'd from safetensors and assigned to a network built under ``torch.device("meta")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4d.errors import InvalidArgument
from m4d.model.weights import embedding, load_into

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def _init_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = _init_names(cls)
    return {k: v for k, v in d.items() if k in names}


@dataclass
class ClipTowerConfig:
    """One transformer tower; field names follow the Hugging Face ``vision_config``/``text_config``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; use one of {sorted(_ACTIVATIONS)}")
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**_pick(cls, d))

    def to_dict(self) -> dict[str, Any]:
        """The constructor fields only (derived ones, such as head_dim, are recomputed)."""
        return {k: v for k, v in asdict(self).items() if k in _init_names(type(self))}


@dataclass
class ClipVisionConfig(ClipTowerConfig):
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    grid: int = field(init=False)  # patches per side

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = self.image_size // self.patch_size


@dataclass
class ClipTextConfig(ClipTowerConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    pad_token_id: int = 1


@dataclass
class ClipConfig:
    """A CLIP model (both towers + projections) or a vision encoder alone (``text_config`` None,
    ``projection_dim`` None), as LLaVA / MobileVLM use it. ``to_dict`` has the HF layout."""

    vision_config: ClipVisionConfig
    text_config: ClipTextConfig | None = None
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        if (self.text_config is None) != (self.projection_dim is None):
            raise ValueError("a CLIP config has both text_config and projection_dim, or neither")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        """From a HF ``CLIPConfig`` dict, a HF ``CLIPVisionConfig`` dict, or ``to_dict()``."""
        if "vision_config" not in d:  # a bare vision tower config
            return cls(ClipVisionConfig.from_dict(d))
        text = d.get("text_config")
        proj = d.get("projection_dim") if text is not None else None
        return cls(ClipVisionConfig.from_dict(d["vision_config"]),
                   None if text is None else ClipTextConfig.from_dict(text),
                   None if proj is None else int(proj))

    def to_dict(self) -> dict[str, Any]:
        return {"vision_config": self.vision_config.to_dict(),
                "text_config": None if self.text_config is None else self.text_config.to_dict(),
                "projection_dim": self.projection_dim}


class Attention(nn.Module):
    def __init__(self, cfg: ClipTowerConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.wo = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        # x: [B, T, D]
        b, t, d = x.shape
        q, k, v = self.wqkv(x).split(d, dim=-1)  # each [B, T, D]
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, T, Dh]
        out: Tensor = self.wo(y.transpose(1, 2).reshape(b, t, d))
        return out


class Block(nn.Module):
    """Pre-LN: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, cfg: ClipTowerConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attention(self.attention_norm(x), causal)
        out: Tensor = x + self.w2(self.act(self.w1(self.ffn_norm(x))))
        return out


class VisionTower(nn.Module):
    """Pixels [B, C, H, W] -> hidden states [B, 1 + N, Dv] (class token first)."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.pos_embedding = nn.Parameter(torch.empty(cfg.grid * cfg.grid + 1, d))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def hidden(self, pixels: Tensor, n_layers: int) -> Tensor:
        """The input to block ``n_layers`` (0 = embeddings after pre_norm), HF ``hidden_states[n]``."""
        c, s = self.config.num_channels, self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (c, s, s):
            raise InvalidArgument(f"pixels must be [B, {c}, {s}, {s}], got {list(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.class_embedding.dtype))  # [B, D, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # [B, 1 + N, D]
        x = self.pre_norm(x)
        for layer in self.layers[:n_layers]:
            x = layer(x)
        return x  # type: ignore[no-any-return]  # [B, 1 + N, D]

    def pooled(self, pixels: Tensor) -> Tensor:
        # -> [B, Dv]: the class token of the last layer, post-normed
        out: Tensor = self.post_norm(self.hidden(pixels, len(self.layers))[:, 0])
        return out


class TextTower(nn.Module):
    """Token ids [B, S] -> the EOS token's final hidden state [B, Dt]."""

    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embedding = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        cfg = self.config
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise InvalidArgument(f"token ids must be [B, S] with S >= 1, got {list(ids.shape)}")
        if ids.shape[1] > cfg.max_position_embeddings:
            raise InvalidArgument(f"text is {ids.shape[1]} tokens; the limit is {cfg.max_position_embeddings}")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise InvalidArgument(f"token ids must lie in [0, {cfg.vocab_size})")
        x = self.tok_embeddings(ids) + self.pos_embedding[: ids.shape[1]]  # [B, S, D]
        for layer in self.layers:
            x = layer(x, causal=True)
        x = self.final_norm(x)
        # Pool at the first EOS; checkpoints with the legacy eos id 2 use the highest id (HF's rule).
        if cfg.eos_token_id == 2:
            at = ids.argmax(dim=-1)
        else:
            is_eos = ids == cfg.eos_token_id
            if not bool(is_eos.any(dim=-1).all()):
                raise InvalidArgument(f"every text must contain the EOS token {cfg.eos_token_id}")
            at = is_eos.int().argmax(dim=-1)
        out: Tensor = x[torch.arange(ids.shape[0], device=ids.device), at]  # [B, D]
        return out


class Clip(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision = VisionTower(cfg.vision_config)
        self.text: TextTower | None = None
        if cfg.text_config is not None and cfg.projection_dim is not None:
            self.text = TextTower(cfg.text_config)
            self.visual_projection = nn.Linear(cfg.vision_config.hidden_size, cfg.projection_dim, bias=False)
            self.text_projection = nn.Linear(cfg.text_config.hidden_size, cfg.projection_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.empty(()))  # log of the similarity temperature

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.class_embedding.dtype

    def _need_text(self) -> TextTower:
        if self.text is None:
            raise InvalidArgument("this component is a vision encoder only; it has no text tower")
        return self.text

    @torch.inference_mode()
    def image_features(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, H, W] -> L2-normalised float32 embeddings [B, E]."""
        self._need_text()
        emb = self.visual_projection(self.vision.pooled(pixels))  # [B, E]
        return F.normalize(emb.float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, ids: Tensor) -> Tensor:
        """ids [B, S] (each with an EOS) -> L2-normalised float32 embeddings [B, E]."""
        text = self._need_text()
        emb = self.text_projection(text(ids))  # [B, E]
        return F.normalize(emb.float(), dim=-1)

    @torch.inference_mode()
    def similarity(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Scaled cosine logits [Bi, Bt] from normalised embeddings (softmax over texts = zero-shot)."""
        self._need_text()
        return image_emb @ text_emb.T * self.logit_scale.float().exp()

    @torch.inference_mode()
    def vision_hidden(self, pixels: Tensor, layer: int | Sequence[int],
                      select: str = "default") -> Tensor:
        """The features a LLaVA projector reads: HF ``hidden_states[layer]`` [B, T, Dv].

        ``layer`` counts like Python indices over the L + 1 hidden states (-2 = the input to
        the last block); a list concatenates several layers on the channel axis. ``select``
        "default" drops the class token (T = N patches), "full" keeps it (T = N + 1).
        """
        layers = [layer] if isinstance(layer, int) else list(layer)
        n = len(self.vision.layers) + 1
        if not layers or any(not -n <= i < n for i in layers):
            raise InvalidArgument(f"vision feature layer {layer} out of range: the encoder has {n} hidden states")
        if select not in ("default", "full"):
            raise InvalidArgument(f"vision_feature_select_strategy must be 'default' or 'full', got {select!r}")
        idx = [i % n for i in layers]
        # One pass up to the deepest layer asked for, keeping the states that are selected.
        wanted = set(idx)
        states: dict[int, Tensor] = {}
        x = self.vision.hidden(pixels, 0)
        if 0 in wanted:
            states[0] = x
        for i, block in enumerate(self.vision.layers[: max(idx)], start=1):
            x = block(x)
            if i in wanted:
                states[i] = x
        out = torch.cat([states[i] for i in idx], dim=-1)  # [B, 1 + N, Dv * len(layers)]
        return out[:, 1:] if select == "default" else out


# ---------------------------------------------------------------------------------------------
# Weights: Hugging Face names -> canonical names

_HF_BLOCK = {
    "layer_norm1": "attention_norm",
    "self_attn.out_proj": "attention.wo",
    "layer_norm2": "ffn_norm",
    "mlp.fc1": "w1",
    "mlp.fc2": "w2",
}


def _blocks(get: Callable[[str], Tensor], src: str, dst: str, n: int) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i in range(n):
        s, d = f"{src}encoder.layers.{i}.", f"{dst}layers.{i}."
        for p in ("weight", "bias"):
            out[f"{d}attention.wqkv.{p}"] = torch.cat(
                [get(f"{s}self_attn.{w}_proj.{p}") for w in ("q", "k", "v")], dim=0)
            for hf, ours in _HF_BLOCK.items():
                out[f"{d}{ours}.{p}"] = get(f"{s}{hf}.{p}")
    return out


def hf_vision_to_canonical(get: Callable[[str], Tensor], prefix: str, cfg: ClipVisionConfig,
                           dst: str = "vision.") -> dict[str, Tensor]:
    """HF ``CLIPVisionTransformer`` tensors under ``prefix`` (e.g. ``"vision_model."``) -> ours."""
    out = {
        f"{dst}patch_embed.weight": get(f"{prefix}embeddings.patch_embedding.weight"),
        f"{dst}class_embedding": get(f"{prefix}embeddings.class_embedding"),
        f"{dst}pos_embedding": get(f"{prefix}embeddings.position_embedding.weight"),
    }
    for hf, ours in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
        for p in ("weight", "bias"):
            out[f"{dst}{ours}.{p}"] = get(f"{prefix}{hf}.{p}")
    out.update(_blocks(get, prefix, dst, cfg.num_hidden_layers))
    return out


def hf_clip_to_canonical(get: Callable[[str], Tensor], cfg: ClipConfig) -> dict[str, Tensor]:
    """HF ``CLIPModel`` tensors (``vision_model.*``, ``text_model.*``, projections) -> ours."""
    out = hf_vision_to_canonical(get, "vision_model.", cfg.vision_config)
    if cfg.text_config is None:
        return out
    out["text.tok_embeddings.weight"] = get("text_model.embeddings.token_embedding.weight")
    out["text.pos_embedding"] = get("text_model.embeddings.position_embedding.weight")
    for p in ("weight", "bias"):
        out[f"text.final_norm.{p}"] = get(f"text_model.final_layer_norm.{p}")
    out.update(_blocks(get, "text_model.", "text.", cfg.text_config.num_hidden_layers))
    out["visual_projection.weight"] = get("visual_projection.weight")
    out["text_projection.weight"] = get("text_projection.weight")
    out["logit_scale"] = get("logit_scale").reshape(())
    return out


def load_clip(weights: str | Path, cfg: ClipConfig, *, compute_dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> Clip:
    """Build on meta, mmap the canonical safetensors file and assign; returns an eval model."""
    with torch.device("meta"):
        model = Clip(cfg)
    # logit_scale stays float32: exp() of a bf16 scalar would round the temperature.
    return load_into(model, weights, what="CLIP", compute_dtype=compute_dtype, device=device,
                     keep_float32={"logit_scale"})


def tokenize(tokenizer: Any, texts: Sequence[str], cfg: ClipTextConfig) -> Tensor:
    """Texts -> ids [B, S] with a ``tokenizers.Tokenizer`` whose post-processor adds BOS/EOS.

    Texts longer than the context are refused (not silently cut: the EOS would be lost).
    """
    if not texts:
        raise InvalidArgument("no texts given")
    encs = [tokenizer.encode(t).ids for t in texts]
    too_long = [i for i, e in enumerate(encs) if len(e) > cfg.max_position_embeddings]
    if too_long:
        raise InvalidArgument(f"text {too_long[0]} is {len(encs[too_long[0]])} tokens; "
                              f"the limit is {cfg.max_position_embeddings}")
    width = max(len(e) for e in encs)
    return torch.tensor([e + [cfg.pad_token_id] * (width - len(e)) for e in encs], dtype=torch.long)
