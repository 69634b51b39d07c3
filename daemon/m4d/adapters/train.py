"""Adapter training on the device's CPU (tooling, not the daemon): a LoRA on the backbone from
a JSONL file of {"input", "output"} pairs, the base frozen.

The base is the image's own backbone, dequantized from its stored blocks to float32 (the
numbers the served model starts from). Each example becomes the task's chat prompt (the
cascade's template, as the daemon renders it) followed by the output and the end-of-turn
token; the loss is the cross-entropy of the output tokens only. AdamW, seeded, early
stopping on a validation set (the best adapter by its loss is kept), and the result written
as a PEFT folder (``m4d.adapters.lora.write_peft``). The validation set is best worded
apart from the training set (other phrasings, as ``slu_data``'s "val" split): its loss then
says how the adapter serves requests worded as it never saw, which stops falling well
before the training set's does. Without one, a random slice of the training file is held
out.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

from m4d.adapters.lora import AdapterError, Lora
from m4d.adapters.modules import attach, collect, detach, new_lora
from m4d.model.cpu import has_bf16_arithmetic
from m4d.model.llama import Llama, LlamaConfig, load_llama
from m4d.prepare.prompts import answer_messages
from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1  # on the adapter's input while training
    targets: tuple[str, ...] = ALL_LINEARS
    lr: float = 1e-3
    batch: int = 8
    max_steps: int = 300
    eval_every: int = 25
    patience: int = 3  # evaluations without a better held-out loss before stopping
    held_out: float = 0.1  # of the training file, for early stopping without a validation set
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    # the forward and backward's matmuls: "bfloat16" (autocast; the LoRA's weights, its
    # optimiser and the loss stay float32), "float32", or "auto": bfloat16 where the CPU has
    # bf16 arithmetic (m4d.model.cpu), float32 elsewhere
    dtype: str = "auto"

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise AdapterError(f"dtype {self.dtype!r} is not auto, bfloat16 or float32")
        bf16 = self.dtype == "bfloat16" or (self.dtype == "auto" and has_bf16_arithmetic())
        return torch.bfloat16 if bf16 else torch.float32


@dataclass
class TrainReport:
    steps: int
    best_step: int
    train_loss: float
    held_out_loss: float
    seconds: float
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)
    dtype: str = "float32"  # what the matmuls ran in


@dataclass(frozen=True)
class Backbone:
    model: Llama
    tokenizer: TextTokenizer
    chat: ChatTemplate
    digest: str


def load_backbone(image: Path) -> Backbone:
    """The image's backbone in float32 (its stored blocks dequantized), its tokenizer and
    chat template."""
    manifest = json.loads((image / "manifest.json").read_text())
    spec = manifest["components"].get("backbone")
    if spec is None:
        raise AdapterError(f"{image} has no backbone to train an adapter on")
    cfg = LlamaConfig.from_dict(spec["config"])
    model = load_llama(image / spec["weights"], cfg, weight_format="float32",
                       compute_dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = TextTokenizer.from_file(image / spec["tokenizer"], bos_id=cfg.bos_id, eos_id=cfg.eos_id)
    chat = ChatTemplate(spec["chat_template"], bos_token=tok.bos_token, eos_token=tok.eos_token)
    digest = str(manifest.get("files", {}).get(spec["weights"], {}).get("sha256", ""))
    return Backbone(model, tok, chat, digest)


def read_pairs(path: Path, first: str = "input", second: str = "output") -> list[tuple[str, str]]:
    """(record[first], record[second]) per line of a JSONL file ({"input", "output"} for a
    LoRA, {"text", "label"} for a head); a clear error for a bad line."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append((str(record[first]), str(record[second])))
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"{path}:{n}: each line must be a JSON object with \"{first}\" "
                               f"and \"{second}\" strings ({exc})") from exc
    if not pairs:
        raise AdapterError(f"{path} holds no examples")
    return pairs


def prompt_ids(backbone: Backbone, template: str, text: str) -> list[int]:
    """The tokens the daemon feeds the backbone for `text` under a cascade template."""
    messages = answer_messages(template, text, "")
    return backbone.tokenizer.encode(backbone.chat.render(messages, add_generation_prompt=True))


def _encode(backbone: Backbone, template: str, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(prompt + output + end of turn, where the output starts) per example."""
    eos = backbone.tokenizer.eos_id
    out = []
    for source, target in pairs:
        prompt = prompt_ids(backbone, template, source)
        answer = backbone.tokenizer.encode(target) + ([eos] if eos is not None else [])
        out.append((prompt + answer, len(prompt)))
    return out


def _loss(model: Llama, batch: Sequence[tuple[list[int], int]],
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean cross-entropy of the output tokens, in float32; rows right-padded (causal:
    padding after a row's tokens changes none of its logits). `dtype` bfloat16: the
    matmuls under autocast."""
    length = max(len(ids) for ids, _ in batch)
    tokens = torch.zeros(len(batch), length, dtype=torch.long)
    wanted = torch.zeros(len(batch), length, dtype=torch.bool)  # positions predicting an output token
    for i, (ids, start) in enumerate(batch):
        tokens[i, :len(ids)] = torch.tensor(ids)
        wanted[i, start - 1:len(ids) - 1] = True
    targets = tokens[:, 1:][wanted[:, :-1]]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model.causal_logits(tokens, select=wanted)  # [N, V] at the wanted positions
    return F.cross_entropy(logits.float(), targets)


def batches(rng: random.Random, items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Batches of `size` for ever, each pass over `items` in a new order (the adapter and
    head trainers' draw)."""
    order: list[int] = []
    while True:
        if len(order) < size:
            order += rng.sample(range(len(items)), len(items))
        yield [items[i] for i in order[:size]]
        del order[:size]


def warmup_cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up over the first 5 % of `total` steps, then a cosine to zero."""
    warmup = max(1, total // 20)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))


def train_lora(backbone: Backbone, template: str, pairs: Sequence[tuple[str, str]],
               settings: TrainSettings = TrainSettings(),
               progress: Callable[[int, int, float], None] | None = None,
               validation: Sequence[tuple[str, str]] = ()) -> tuple[Lora, TrainReport]:
    """Trains a LoRA on (input, output) pairs; returns the best adapter by the loss on
    `validation` (by default a slice of `pairs`, held out)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    dtype = settings.compute_dtype
    rng = random.Random(settings.seed)
    data = _encode(backbone, template, pairs)
    rng.shuffle(data)
    if validation:
        held, train = _encode(backbone, template, validation), data
    else:
        n_held = max(1, int(len(data) * settings.held_out)) if len(data) > 1 else 0
        held, train = data[:n_held], data[n_held:]
    if not train:
        raise AdapterError("too few examples to train on after holding some out")
    model = backbone.model
    init = new_lora(model, settings.rank, settings.alpha, settings.targets, seed=settings.seed)
    init.base_model = backbone.digest
    wrappers = attach(model, init, trainable=True, dropout=settings.dropout)
    params = [p for w in wrappers for p in w.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, settings.max_steps)
    best: tuple[float, int, Lora] | None = None
    history: list[dict[str, float]] = []
    started, step, bad, running = time.monotonic(), 0, 0, 0.0
    draw = batches(rng, train, settings.batch)
    try:
        model.train()
        while step < settings.max_steps:
            batch = next(draw)
            loss = _loss(model, batch, dtype)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
            if progress is not None:
                progress(step, settings.max_steps, running)
            if step % settings.eval_every == 0 or step == settings.max_steps:
                held_loss = _held_out_loss(model, held, dtype) if held else running
                history.append({"step": step, "train_loss": running, "held_out_loss": held_loss})
                log.info("step %d: train loss %.4f, held-out %.4f", step, running, held_loss)
                if best is None or held_loss < best[0] - 1e-4:
                    best, bad = (held_loss, step, collect(model, init)), 0
                else:
                    bad += 1
                    if bad >= settings.patience:
                        break
    finally:
        model.eval()
        detach(model)
    assert best is not None
    return best[2], TrainReport(step, best[1], running, best[0], time.monotonic() - started,
                                len(data), history, str(dtype).removeprefix("torch."))


@torch.no_grad()
def _held_out_loss(model: Llama, held: Sequence[tuple[list[int], int]],
                   dtype: torch.dtype = torch.float32, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(held), batch):
        part = held[i:i + batch]
        total += _loss(model, part, dtype).item() * len(part)
        count += len(part)
    model.train()
    return total / count
