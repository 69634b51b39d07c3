"""The model runtime: an image's components loaded into torch, and the operations the
engine runs on them (prefill, batched decode, encoding, next-word prediction).

Every method here runs on the executor thread; nothing here is async or knows gRPC.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from m4image.verify import VerifiedImage

from m4d.config import Config
from m4d.errors import InvalidArgument
from m4d.executor.adapters import (
    ADAPTER_KINDS,
    AdapterBank,
    EncoderLoraBank,
    HeadBank,
    unserved_reason,
)
from m4d.executor.cpu import (
    check_weight_format,
    cpu_features,
    resolve_compute_dtype,
    select_kernels,
)
from m4d.executor.devices import DeviceRegistry, Placement, cpu_threads, discover, place
from m4d.executor.media import MEDIA_KINDS, MediaRuntime
from m4d.executor.memory import (
    MemoryUsage,
    mapped_resident_bytes,
    module_tensors,
    rss_bytes,
    weight_bytes,
)
from m4d.executor.shared import model_key, shared_load
from m4d.model import kernels
from m4d.model.bert import BertConfig, load_bert
from m4d.model.kv_cache import KVRows
from m4d.model.llama import Llama, LlamaConfig, RowAdapters, load_llama
from m4d.model.mapped import release_pages
from m4d.model.packed import load_packed
from m4d.prepare.constraints import Grammars
from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    kind: str
    parameters: int
    weight_format: str
    compute_dtype: str
    device: str
    kernels: str = ""  # the m4 kernel variant its quantized layers run on ("" = torch's)


# A preempted sequence's KV cache while it waits: (k, v) [Hkv, tokens, Dh] per layer.
ParkedKV = list[tuple[torch.Tensor, torch.Tensor]]

class Runtime:
    """Holds the loaded backbone and text encoder of one firmware image."""

    def __init__(self, image: VerifiedImage, config: Config,
                 registry: DeviceRegistry | None = None) -> None:
        self.image = image
        self.config = config
        # where each component runs (config `placement`, adapters aside); ConfigError if no device
        self.registry = registry if registry is not None else discover()
        self.placement: Placement = place(
            config.placement, {n: s["kind"] for n, s in image.manifest.components.items()
                               if s["kind"] not in ADAPTER_KINDS}, self.registry)
        self.backbone_name = next((n for n, s in image.manifest.components.items()
                                   if s["kind"] == "llama"), "")
        self.encoder_name = next((n for n, s in image.manifest.components.items()
                                  if s["kind"] == "bert"), "")
        # the backbone's device: where the engine's step loop runs
        self.device = torch.device(self.placement.device_for(self.backbone_name))
        self.encoder_device = torch.device(self.placement.device_for(self.encoder_name))
        self.threads = cpu_threads(config.threads, self.registry, self.placement)
        if self.backbone_name and self.device.type == "cpu":
            check_weight_format(config.weight_format)  # ConfigError: w8a8 wrong on this CPU
        # the encoders' and media components' dtype ("auto" resolved for this CPU)
        self.compute_dtype_name = resolve_compute_dtype(config.compute_dtype)
        self.compute_dtype = DTYPES[self.compute_dtype_name]
        self.components: list[ComponentInfo] = []
        self.backbone: Llama | None = None
        self.tokenizer: TextTokenizer | None = None
        self.chat_template: ChatTemplate | None = None
        self.grammars: Grammars | None = None  # structured output over the backbone's tokens
        self.encoder: Any = None
        self.encoder_tokenizer: TextTokenizer | None = None
        self.encoder_spec: dict[str, Any] = {}
        self.max_context = config.max_context
        self.media = MediaRuntime(Path(image.path), self.compute_dtype, self._digest)
        self.kv_rows = KVRows([])  # the backbone's KV caches, row by row (set at its load)
        self.adapters: AdapterBank | None = None  # the backbone's LoRA components
        self.heads = HeadBank(image.manifest.components, self._path)  # the encoder's task heads
        self.encoder_loras: EncoderLoraBank | None = None  # its LoRA components (with the encoder)
        self._weights: tuple[int, int] | None = None  # (mapped, converted) bytes, see memory()
        self.phases: dict[str, float] = {}  # start-up: seconds per component (and backbone part)

    # ---- loading -------------------------------------------------------------------

    def load(self) -> None:
        torch.set_num_threads(self.threads)
        kernel_threads = kernels.set_threads(self.config.kernel_threads)
        self.kernel_variant = select_kernels(self.config.kernel_variant)
        log.info("placement", extra={"placement": self.placement.components,
                                     "threads": self.threads, "kernel_threads": kernel_threads,
                                     "devices": self.registry.names()})
        log.info("compute dtype", extra={"setting": self.config.compute_dtype,
                                         "compute_dtype": self.compute_dtype_name,
                                         "cpu": cpu_features().describe()})
        comps = self.image.manifest.components
        for name, spec in comps.items():
            started = time.monotonic()
            if spec["kind"] == "llama":
                self._load_backbone(name, spec)
            elif spec["kind"] == "bert":
                self._load_encoder(name, spec)
            elif spec["kind"] in ADAPTER_KINDS:
                continue  # read on first use by the adapter and head banks
            elif spec["kind"] in MEDIA_KINDS:
                device = torch.device(self.placement.device_for(name))
                loaded = self.media.load(name, spec, device)
                self.components.append(ComponentInfo(
                    name, loaded.kind, loaded.parameters, "float32", self.compute_dtype_name,
                    str(device)))
            else:
                log.warning("component %s has kind %r that this daemon does not run",
                            name, spec["kind"])
                continue
            release_pages()  # what the conversion read stops counting before the next loads
            self.phases[name] = time.monotonic() - started
            log.info("loaded component", extra={"component": name, "kind": spec["kind"],
                                                 "seconds": round(self.phases[name], 2)})

    def settle(self) -> None:
        """After the image serves: the grammar tokenizer (~0.3 s; a structured request
        before builds it). (The pages a load read only to convert go after each component;
        the weights used in place stay resident once the self-test touched them.)"""
        if self.grammars is not None:
            try:
                self.grammars.tokenizer()
            except InvalidArgument as exc:  # served without structured output
                log.warning("no structured output for this tokenizer", extra={"error": str(exc)})

    def _path(self, relative: str) -> Path:
        return Path(self.image.path) / relative

    def _digest(self, relative: str) -> str | None:
        """The file's sha256 as the verified manifest lists it: an image swapped in that holds
        the same file maps the same pages."""
        entry = self.image.manifest.files.get(relative)
        return entry.sha256 if entry is not None else None

    def _load_backbone(self, name: str, spec: dict[str, Any]) -> None:
        cfg = LlamaConfig.from_dict(spec["config"])
        weight_format, dtype, kv_dtype = backbone_plan(self.config, self.device)
        mark = time.monotonic()

        def phase(part: str) -> None:
            nonlocal mark
            self.phases[f"{name}.{part}"], mark = time.monotonic() - mark, time.monotonic()

        digest = self._digest(spec["weights"])
        packed_file = spec.get("packed", {}).get(weight_format)

        def load() -> Llama:
            packed = (load_packed(self._path(packed_file), self._digest(packed_file))
                      if packed_file and self.device.type == "cpu" else None)
            return load_llama(self._path(spec["weights"]), cfg, weight_format=weight_format,
                              compute_dtype=dtype, device=str(self.device), digest=digest,
                              packed=packed)

        model, shared = shared_load(model_key(digest, "llama", weight_format, dtype, self.device,
                                              config=spec["config"]), load)
        if shared:
            log.info("backbone weights shared with the image loaded beside", extra={
                "component": name})
        self.max_context = min(self.config.max_context, cfg.max_seq_len)
        phase("weights")
        model.setup_caches(self.config.kv_slots, self.max_context, kv_dtype)
        phase("caches")
        self.kv_rows = KVRows([b.attention.kv_cache for b in model.blocks
                               if b.attention.kv_cache is not None])
        self.backbone = model
        self.adapters = AdapterBank(self.image.manifest.components, cfg, self._path,
                                    self.config.adapter_memory_mb << 20)
        self.tokenizer = TextTokenizer.from_file(self._path(spec["tokenizer"]),
                                                 bos_id=cfg.bos_id, eos_id=cfg.eos_id)
        phase("tokenizer")
        # structured output; its tokenizer is built by `settle`, after the image serves
        self.grammars = Grammars(self._path(spec["tokenizer"]), [self.tokenizer.eos_id or 0],
                                 cfg.vocab_size)
        template = spec.get("chat_template")
        if template:
            self.chat_template = ChatTemplate(template, bos_token=self.tokenizer.bos_token,
                                              eos_token=self.tokenizer.eos_token)
        self.components.append(ComponentInfo(
            name, "llama", _count_parameters(spec), weight_format,
            str(dtype).removeprefix("torch."), str(self.device),
            self.kernel_variant if weight_format == "w4a8" else ""))

    def _load_encoder(self, name: str, spec: dict[str, Any]) -> None:
        cfg = BertConfig.from_dict(spec["config"])
        digest = self._digest(spec["weights"])
        self.encoder, _ = shared_load(
            model_key(digest, "bert", self.compute_dtype, self.encoder_device,
                      config=spec["config"]),
            lambda: load_bert(self._path(spec["weights"]), cfg, compute_dtype=self.compute_dtype,
                              device=self.encoder_device))
        self.encoder_tokenizer = TextTokenizer.from_file(self._path(spec["tokenizer"]))
        self.encoder_spec = spec
        self.encoder_loras = EncoderLoraBank(self.image.manifest.components, cfg, self._path,
                                             self.config.adapter_memory_mb << 20, self.encoder_device)
        self.components.append(ComponentInfo(
            name, "bert", sum(p.numel() for p in self.encoder.parameters()),
            self.compute_dtype_name, self.compute_dtype_name, str(self.encoder_device)))

    @property
    def adapter_error(self) -> str:
        """Why this daemon cannot serve the backbone's adapters ("" when it can)."""
        return unserved_reason(self.backbone)

    @property
    def encoder_window(self) -> int:
        """Tokens the text encoder takes per text (0 without one)."""
        return int(self.encoder_spec.get("max_seq_len", 256)) if self.encoder is not None else 0

    # ---- backbone ------------------------------------------------------------------

    def _lora(self, adapters: list[str]) -> RowAdapters | None:
        return self.adapters.step(adapters) if self.adapters and any(adapters) else None
    @torch.inference_mode()
    def prefill(self, row: int, ids: list[int], start: int, adapter: str = "") -> torch.Tensor:
        """Puts a prompt chunk into KV row `row` (through the task's adapter, "" for none);
        returns the last position's logits [V]."""
        assert self.backbone is not None
        self.kv_rows.wrote(row, start + len(ids))
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, S]
        pos = torch.arange(start, start + len(ids), dtype=torch.long, device=self.device)[None]  # [1, S]
        rows = torch.tensor([row], dtype=torch.long, device=self.device)
        logits: torch.Tensor = self.backbone(tokens, pos, rows, last_only=True,
                                             lora=self._lora([adapter]))  # [1, 1, V]
        return logits[0, -1]

    @torch.inference_mode()
    def decode(self, rows: list[int], tokens: list[int], positions: list[int],
               adapters: list[str] | None = None) -> torch.Tensor:
        """One token for each sequence, each at its own position, each through its own
        adapter ("" for none); returns logits [B, V]."""
        assert self.backbone is not None
        for row, position in zip(rows, positions, strict=True):
            self.kv_rows.wrote(row, position + 1)
        b = len(rows)
        lora = self._lora(adapters or [])
        order = sorted(range(b), key=rows.__getitem__)
        if lora is None and [rows[i] for i in order] == list(range(b)):
            # rows 0..B-1 in some order: run them in row order, the cache's fast path (views
            # instead of gathering each row's keys and values in every layer)
            tok = torch.tensor([tokens[i] for i in order], dtype=torch.long, device=self.device)[:, None]  # [B, 1]
            pos = torch.tensor([positions[i] for i in order], dtype=torch.long, device=self.device)[:, None]
            logits: torch.Tensor = self.backbone(tok, pos, None, last_only=True)[:, -1]  # [B, V]
            if order == list(range(b)):
                return logits
            back = torch.empty(b, dtype=torch.long, device=self.device)
            back[torch.tensor(order, dtype=torch.long, device=self.device)] = torch.arange(b, device=self.device)
            return logits[back]
        # rows in any order (with adapters: always, the fused step reads each row's own slot)
        tok = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        row_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits = self.backbone(tok, pos, row_t, last_only=True, lora=lora)  # [B, 1, V]
        return logits[:, -1]

    @torch.inference_mode()
    def park(self, row: int, length: int, start: int = 0) -> ParkedKV:
        """A copy of positions [start, length) of KV row `row` in every layer: the cache of
        a preempted sequence kept while it waits, or a prompt block for the prefix cache
        (`restore` puts it back)."""
        return [cache.save(row, length, start) for cache in self.kv_rows.caches]

    @torch.inference_mode()
    def restore(self, row: int, parked: ParkedKV, start: int = 0) -> None:
        """Puts a parked cache into KV row `row` from position `start` (any row: positions
        are the sequence's)."""
        for cache, saved in zip(self.kv_rows.caches, parked, strict=True):
            cache.load(row, saved, start)
            self.kv_rows.wrote(row, start + saved[0].shape[1])

    def discard_rows(self, rows: list[int]) -> None:
        """KV rows that hold no sequence: their memory goes back to the system (it reads as
        zeros until written again)."""
        self.kv_rows.discard(rows)

    def memory(self, kv_budget_tokens: int) -> MemoryUsage:
        """This process's memory by part; `kv_budget_tokens`: the scheduler's KV pool."""
        if self._weights is None:  # fixed once loaded
            skip = {t.untyped_storage().data_ptr() for c in self.kv_rows.caches for t in (c.k, c.v)}
            self._weights = weight_bytes(module_tensors(
                [self.backbone, self.encoder, self.media.speech, self.media.ocr,
                 self.media.clips, self.media.vision, self.media.projectors,
                 self.media.sensors], skip, depth=4))
        return MemoryUsage(
            rss=rss_bytes(), weights_mapped=self._weights[0],
            weights_mapped_resident=mapped_resident_bytes(), weights_converted=self._weights[1],
            kv_resident=self.kv_rows.resident_bytes(), kv_reserved=self.kv_rows.reserved_bytes(),
            kv_budget=kv_budget_tokens * self.kv_rows.token_bytes())

    @torch.inference_mode()
    def next_words(self, ids: list[int], n: int, max_word_tokens: int = 4) -> list[tuple[str, float]]:
        """The n most likely next words after `ids` with their probabilities (M4 T1).

        A word is a token that starts with a space (or a word-start after a newline)
        followed by letters or digits, extended greedily while the model's most likely
        next token continues the same word; its probability is the product of the steps.
        """
        assert self.backbone is not None and self.tokenizer is not None
        tok = self.tokenizer
        context = torch.tensor([ids], dtype=torch.long, device=self.device)
        probs = torch.softmax(self.backbone.forward_full(context)[0, -1].float(), dim=-1)
        top = torch.topk(probs, min(8 * n, probs.numel()))
        starts: list[tuple[int, float]] = []
        for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            piece = tok.decode([t])
            if _starts_word(piece):
                starts.append((t, p))
            if len(starts) >= 3 * n:
                break
        if not starts:
            return []
        seqs = [[t] for t, _ in starts]
        word_probs = [p for _, p in starts]
        open_rows = list(range(len(seqs)))
        for _ in range(max_word_tokens - 1):
            if not open_rows:
                break
            batch = torch.tensor([ids + seqs[r] for r in open_rows], dtype=torch.long, device=self.device)
            step = torch.softmax(self.backbone.forward_full(batch)[:, -1].float(), dim=-1)
            best_p, best_t = step.max(dim=-1)
            still_open = []
            for i, r in enumerate(open_rows):
                t, p = int(best_t[i]), float(best_p[i])
                if _continues_word(tok.decode([t])):
                    seqs[r].append(t)
                    word_probs[r] *= p
                    still_open.append(r)
            open_rows = still_open
        merged: dict[str, float] = {}
        for seq, p in zip(seqs, word_probs, strict=True):
            word = tok.decode(seq).strip()
            if word:
                merged[word] = merged.get(word, 0.0) + p
        return sorted(merged.items(), key=lambda kv: -kv[1])[:n]

    @torch.inference_mode()
    def reference_gaps(self, prompt_ids: list[int], reference: list[int], row: int) -> list[float]:
        """Teacher-forced on the served path (prefill in the engine's chunks, then one decode
        step per token, in KV row `row`): for each token of `reference` after `prompt_ids`,
        how far (nats) its log-probability lies below the most likely token's (0 = first)."""
        chunk = self.config.prefill_chunk
        for start in range(0, len(prompt_ids), chunk):
            logits = self.prefill(row, prompt_ids[start:start + chunk], start)
        gaps = []
        for i, token in enumerate(reference):
            logp = torch.log_softmax(logits.float(), dim=-1)
            gaps.append(float(logp.max() - logp[token]))
            if i + 1 < len(reference):
                logits = self.decode([row], [token], [len(prompt_ids) + i])[0]
        return gaps

    # ---- images and audio ------------------------------------------------------------

    @torch.inference_mode()
    def image_prompt(self, ids: list[int], image_token_id: int,
                     features: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [S', D] with one image's projected features [N, D] in place of
        its placeholder token (M4 path 1, LLaVA's convention)."""
        from m4d.model.projector import embed_prompt

        assert self.backbone is not None
        return embed_prompt(self.backbone.tok_embeddings, ids, image_token_id,
                            features.to(self.backbone.dtype))[0]

    @torch.inference_mode()
    def token_embeddings(self, ids: list[int]) -> torch.Tensor:
        assert self.backbone is not None
        out: torch.Tensor = self.backbone.tok_embeddings(
            torch.tensor(ids, dtype=torch.long, device=self.device))
        return out  # [S, D]

    @torch.inference_mode()
    def prefill_embeds(self, row: int, embeds: torch.Tensor, start: int,
                       adapter: str = "") -> torch.Tensor:
        """`prefill` for a chunk given as embeddings [S, D]; last position's logits [V]."""
        assert self.backbone is not None
        self.kv_rows.wrote(row, start + embeds.shape[0])
        pos = torch.arange(start, start + embeds.shape[0], dtype=torch.long,
                           device=self.device)[None]  # [1, S]
        rows = torch.tensor([row], dtype=torch.long, device=self.device)
        logits: torch.Tensor = self.backbone(None, pos, rows, last_only=True, embeds=embeds[None],
                                             lora=self._lora([adapter]))
        return logits[0, -1]

    # ---- text encoder --------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, texts: list[str], loras: list[str] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Pooled (and normalised, if the head says so) embeddings [N, D], token counts; each
        text through its own LoRA on the encoder (`loras`, "" for none), in one pass."""
        from m4d.model.bert import embed_with_counts

        if self.encoder is None or self.encoder_tokenizer is None or self.encoder_loras is None:
            raise InvalidArgument("this image has no text encoder")
        vectors, counts = embed_with_counts(
            self.encoder, self.encoder_tokenizer.tokenizer, texts, self.encoder_window,
            normalize=bool(self.encoder_spec.get("normalize", True)),
            lora=self.encoder_loras.rows(loras or []))
        return vectors.float(), counts


def backbone_plan(config: Config, device: torch.device) -> tuple[str, torch.dtype, torch.dtype]:
    """(weight format, activation dtype, KV cache dtype) of the backbone under `config`.

    The format and activations are backbone_format's, given compute_dtype resolved for the
    format (m4d.executor.cpu: "auto" gives int4/int8 bfloat16 on every CPU); a w4a8 backbone
    that runs as int4 is resolved again as int4. The KV cache is in the activation dtype,
    except under w4a8 (float32 activations), where it is bfloat16 on every CPU: it is only
    stored and widened there (m4's attention reads it in place; no bf16 arithmetic), and it
    moves the mean KL against float32 from 0.000005 to 0.00001 (bench/README.md) for half
    the memory (16 slots x 2,048 positions: 755 MB instead of 1.5 GB).
    """
    def dtype_for(weight_format: str) -> torch.dtype:
        return DTYPES[resolve_compute_dtype(config.compute_dtype, weight_format)]

    weight_format, dtype = backbone_format(config.weight_format, dtype_for(config.weight_format),
                                           device)
    if weight_format == "w4a8":
        return weight_format, dtype, torch.bfloat16
    if weight_format != config.weight_format:
        dtype = dtype_for(weight_format)
    return weight_format, dtype, dtype


def backbone_format(weight_format: str, compute_dtype: torch.dtype,
                    device: torch.device) -> tuple[str, torch.dtype]:
    """The weight format and activation dtype the backbone really runs with.

    w4a8 runs m4's CPU kernels, whose GEMMs quantize their inputs to int8 digits themselves:
    the activations between them (residual stream, norms, rope, attention) are kept in
    float32, which costs nothing measurable at batch 1 or 16 and brings the mean KL against
    float32 from 0.0004 (bf16 activations) to under 0.00005; bf16 activations flipped the
    image's chat self-test on a 0.009-nat tie. The kernels have a variant for every x86-64
    and AArch64 CPU (scalar at worst); without a build, or off the CPU, the same weights run
    as int4 in compute_dtype.
    """
    if weight_format != "w4a8":
        return weight_format, compute_dtype
    if device.type == "cpu" and kernels.available():
        return "w4a8", torch.float32
    log.warning("weight_format w4a8 needs m4's CPU kernels, which are not available for %s "
                "(not built, or not a CPU): the same weights run as int4", device)
    return "int4", compute_dtype


def _starts_word(piece: str) -> bool:
    stripped = piece.lstrip(" \n")
    return piece != stripped and stripped[:1].isalnum()


def _continues_word(piece: str) -> bool:
    return bool(piece) and not piece[0].isspace() and (piece[0].isalnum() or piece[0] in "'-")


def _count_parameters(spec: dict[str, Any]) -> int:
    cfg = spec["config"]
    d, f, v, n = cfg["dim"], cfg["ffn_dim"], cfg["vocab_size"], cfg["n_layers"]
    kv = cfg["n_kv_heads"] * (d // cfg["n_heads"])
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    return int(v * d + n * per_layer + d)
