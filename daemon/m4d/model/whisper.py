"""Executor stage, speech recognition: Whisper (encoder-decoder) and batched greedy transcription.

Encoder: two 1-D convs (+ GELU, the second with stride 2) over the log-mel, the checkpoint's
sinusoidal position table, pre-LN transformer blocks, a final LayerNorm. Decoder: token and
learned position embeddings, pre-LN blocks with causal self-attention (KV cache) and
cross-attention over the encoder output (K/V projected once per request), final LayerNorm, logits
through the tied token embedding. Greedy decoding applies the checkpoint's suppression lists the
way CTranslate2 / faster-whisper do: ``suppress_tokens`` at every step, ``begin_suppress_tokens``
at the first generated step. Weights: canonical safetensors written by the image importers
(``m4d.builder.importers.ct2_whisper`` / ``hf_whisper``), names = this module's state dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from m4d.errors import InvalidArgument
from m4d.model.weights import embedding, load_into
from m4d.prepare.audio import N_SAMPLES, SAMPLE_RATE, log_mel


@dataclass
class WhisperConfig:
    """Architecture and decoding lists; field names follow Hugging Face's WhisperConfig."""

    vocab_size: int = 51864
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames (3000 mel frames / stride 2)
    max_target_positions: int = 448
    layer_norm_eps: float = 1e-5
    suppress_tokens: list[int] = field(default_factory=list)  # never generated
    begin_suppress_tokens: list[int] = field(default_factory=list)  # not as the first token
    language: str = "en"  # prompt language for multilingual checkpoints
    is_multilingual: bool = field(init=False)

    def __post_init__(self) -> None:
        for heads, name in ((self.encoder_attention_heads, "encoder"), (self.decoder_attention_heads, "decoder")):
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {name} heads {heads}")
        self.is_multilingual = self.vocab_size >= 51865  # English-only checkpoints have 51864

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WhisperConfig:
        """Build from a Hugging Face config dict (extra keys ignored) or from ``to_dict()``."""
        names = {f.name for f in fields(cls) if f.init}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("suppress_tokens", "begin_suppress_tokens"):
            kw[key] = [int(t) for t in (kw.get(key) or [])]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("is_multilingual")
        return d


def _heads(t: Tensor, heads: int) -> Tensor:
    b, s, d = t.shape  # [B, S, D] -> [B, H, S, Dh]
    return t.view(b, s, heads, d // heads).transpose(1, 2)


def _merge(y: Tensor) -> Tensor:
    b, h, s, dh = y.shape  # [B, H, S, Dh] -> [B, S, D]
    return y.transpose(1, 2).reshape(b, s, h * dh)


class SelfAttention(nn.Module):
    """Projections of self-attention; q/k/v packed in ``wqkv`` (Whisper's k bias is zero)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # x: [B, S, D] -> q, k, v: [B, H, S, Dh]
        q, k, v = self.wqkv(x).chunk(3, dim=-1)
        return _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, S, D], bidirectional (encoder)
        y: Tensor = self.wo(_merge(F.scaled_dot_product_attention(*self.qkv(x))))
        return y


class CrossAttention(nn.Module):
    """Decoder -> audio attention; k/v of the audio are projected once per request."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(d, d)
        self.wkv = nn.Linear(d, 2 * d)  # k has no bias in Whisper: its half of the bias is 0
        self.wo = nn.Linear(d, d)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        # memory: [B, T, D] -> k, v: [B, H, T, Dh]
        k, v = self.wkv(memory).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # x: [B, S, D]; k, v: [B, H, T, Dh] -> [B, S, D]
        q = _heads(self.wq(x), self.heads)
        y: Tensor = self.wo(_merge(F.scaled_dot_product_attention(q, k, v)))
        return y


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))  # type: ignore[no-any-return]  # exact (erf) GELU


class EncoderLayer(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.attention_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attention = SelfAttention(d, cfg.encoder_attention_heads)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(d, cfg.encoder_ffn_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        out: Tensor = x + self.feed_forward(self.ffn_norm(x))
        return out


class AudioEncoder(nn.Module):
    """Log-mel [B, n_mels, 3000] -> audio features [B, 1500, D]."""

    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.positions = nn.Parameter(torch.empty(cfg.max_source_positions, d), requires_grad=False)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, mel: Tensor) -> Tensor:
        x = F.gelu(self.conv1(mel))  # [B, D, 3000]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, 1500, D]
        x = x + self.positions[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)  # type: ignore[no-any-return]


class KVCache(nn.Module):
    """Self-attention keys/values of one decoder layer, preallocated for ``max_seq`` positions."""

    def __init__(self, max_batch: int, heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (max_batch, heads, max_seq, head_dim)
        self.k_cache: Tensor
        self.v_cache: Tensor
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v: [B, H, S, Dh] written at positions start..start+S; returns [B, H, start+S, Dh]
        b, end = k.shape[0], start + k.shape[2]
        self.k_cache[:b, :, start:end] = k
        self.v_cache[:b, :, start:end] = v
        return self.k_cache[:b, :, :end], self.v_cache[:b, :, :end]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.attention_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attention = SelfAttention(d, cfg.decoder_attention_heads)
        self.cross_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.cross_attention = CrossAttention(d, cfg.decoder_attention_heads)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(d, cfg.decoder_ffn_dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, start: int, mask: Tensor | None, cross_kv: tuple[Tensor, Tensor]) -> Tensor:
        # x: [B, S, D]; mask: [S, start+S] bool or None (single new token)
        assert self.kv_cache is not None, "call setup_caches() first"
        q, k, v = self.attention.qkv(self.attention_norm(x))
        k, v = self.kv_cache.update(start, k, v)  # [B, H, start+S, Dh]
        x = x + self.attention.wo(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        x = x + self.cross_attention(self.cross_norm(x), *cross_kv)
        out: Tensor = x + self.feed_forward(self.ffn_norm(x))
        return out


class TextDecoder(nn.Module):
    """Token ids [B, S] at positions start.. + audio features -> logits [B, S, V]."""

    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = embedding(cfg.max_target_positions, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    @property
    def blocks(self) -> list[DecoderLayer]:
        return cast("list[DecoderLayer]", list(self.layers))

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        w = self.tok_embeddings.weight
        heads = self.cfg.decoder_attention_heads
        for layer in self.blocks:
            layer.kv_cache = KVCache(max_batch, heads, max_seq, self.cfg.d_model // heads, w.dtype, w.device)

    def cross_kv(self, audio: Tensor) -> list[tuple[Tensor, Tensor]]:
        # audio: [B, T, D] -> per layer (k, v): [B, H, T, Dh]
        return [layer.cross_attention.project_kv(audio) for layer in self.blocks]

    def forward(self, tokens: Tensor, start: int, cross_kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        s = tokens.shape[1]
        pos = torch.arange(start, start + s, device=tokens.device)  # [S]
        x = self.tok_embeddings(tokens) + self.pos_embeddings(pos)  # [B, S, D]
        mask = None
        if s > 1:  # causal over the cached prefix plus the new tokens
            mask = torch.arange(start + s, device=tokens.device)[None, :] <= pos[:, None]
        for layer, kv in zip(self.blocks, cross_kv, strict=True):
            x = layer(x, start, mask, kv)
        return F.linear(self.norm(x), self.tok_embeddings.weight)  # [B, S, V], tied output


class Whisper(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = AudioEncoder(cfg)
        self.decoder = TextDecoder(cfg)


def load_whisper(
    weights_file: str | Path,
    cfg: WhisperConfig,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Whisper:
    """Build on meta, mmap the canonical safetensors file and assign its tensors; eval model."""
    with torch.device("meta"):
        model = Whisper(cfg)
    load_into(model, weights_file, what="Whisper", compute_dtype=compute_dtype, device=device)
    model.encoder.positions.requires_grad_(False)
    return model.eval()


@dataclass
class Transcript:
    text: str
    token_ids: list[int]
    audio_seconds: float


class WhisperTranscriber:
    """Batched greedy speech-to-text over 30 s windows (one window per audio)."""

    def __init__(self, model: Whisper, tokenizer_file: str | Path, cfg: WhisperConfig) -> None:
        self.model, self.cfg = model, cfg
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))

        def special(token: str) -> int:
            tid = self.tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(f"tokenizer {tokenizer_file} has no {token} token")
            return int(tid)

        self.eot_id = special("<|endoftext|>")
        prompt = [special("<|startoftranscript|>")]
        if cfg.is_multilingual:
            prompt += [special(f"<|{cfg.language}|>"), special("<|transcribe|>")]
        self.prompt = [*prompt, special("<|notimestamps|>")]
        self.dtype = model.decoder.tok_embeddings.weight.dtype
        self.device = model.decoder.tok_embeddings.weight.device
        v = cfg.vocab_size
        self.suppress = torch.tensor([t for t in cfg.suppress_tokens if 0 <= t < v], dtype=torch.long)
        self.suppress_begin = torch.tensor([t for t in cfg.begin_suppress_tokens if 0 <= t < v], dtype=torch.long)

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_target_positions - len(self.prompt)

    @torch.inference_mode()
    def encode(self, mels: Tensor) -> Tensor:
        # mels: [B, n_mels, 3000] float32 -> [B, 1500, D] in the compute dtype
        expected = (self.cfg.num_mel_bins, 2 * self.cfg.max_source_positions)
        if mels.dim() != 3 or tuple(mels.shape[1:]) != expected:
            raise InvalidArgument(f"mel features must be [B, {expected[0]}, {expected[1]}], got {list(mels.shape)}")
        return self.model.encoder(mels.to(device=self.device, dtype=self.dtype))  # type: ignore[no-any-return]

    @torch.inference_mode()
    def decode_greedy(self, encoded: Tensor, max_tokens: int = 224) -> list[list[int]]:
        """Greedy text tokens (no prompt, no end-of-text) for each encoded audio [B, 1500, D]."""
        if not 1 <= max_tokens <= self.max_new_tokens:
            raise InvalidArgument(f"max_tokens must be 1..{self.max_new_tokens}, got {max_tokens}")
        b = encoded.shape[0]
        if b == 0:
            return []
        dec = self.model.decoder
        dec.setup_caches(b, len(self.prompt) + max_tokens)
        cross = dec.cross_kv(encoded)
        tokens = torch.tensor([self.prompt] * b, dtype=torch.long, device=self.device)  # [B, P]
        start = 0
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(max_tokens):
            logits = dec(tokens, start, cross)[:, -1].float()  # [B, V]
            start += tokens.shape[1]
            logits[:, self.suppress] = -torch.inf
            if step == 0:
                logits[:, self.suppress_begin] = -torch.inf
            nxt = logits.argmax(dim=-1).cpu()  # [B]
            done |= nxt == self.eot_id
            for i in (~done).nonzero().flatten().tolist():
                out[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            tokens = nxt.to(self.device)[:, None]  # [B, 1]
        for layer in dec.blocks:
            layer.kv_cache = None  # free the cache between requests
        return out

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in token_ids if t < self.eot_id]).strip()

    def transcribe(self, audios: list[Tensor], max_tokens: int = 224) -> list[Transcript]:
        """16 kHz mono float32 waveforms (each <= 30 s) -> one transcript each."""
        if not audios:
            return []
        for i, a in enumerate(audios):
            if a.dim() != 1 or a.numel() == 0:
                raise InvalidArgument(f"audio {i} must be a non-empty mono waveform [N], got shape {list(a.shape)}")
            if a.numel() > N_SAMPLES:
                raise InvalidArgument(f"audio {i} is {a.numel() / SAMPLE_RATE:.2f} s; the limit is {N_SAMPLES // SAMPLE_RATE} s")
            if not bool(torch.isfinite(a).all()):
                raise InvalidArgument(f"audio {i} contains NaN or infinite samples")
        mels = torch.stack([log_mel(a, self.cfg.num_mel_bins) for a in audios])  # [B, n_mels, 3000]
        ids = self.decode_greedy(self.encode(mels), max_tokens)
        return [Transcript(self.text(t), t, a.numel() / SAMPLE_RATE) for t, a in zip(ids, audios, strict=True)]
