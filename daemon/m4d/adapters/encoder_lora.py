"""A LoRA on the text encoder trained jointly with a task head (M4 path 3 with a LoRA;
tooling for device makers, not the daemon), on the device's CPU from {"text", "label"} lines.

The encoder is the image's own, in float32, frozen; the LoRA (every attention and FFN linear
by default) and the head are trained together on the cross-entropy of the head's logits over
the pooled, normalised vector, exactly as the daemon computes it. The head starts from the
frozen-encoder head (``m4d.adapters.heads.train_head``: the L-BFGS optimum on frozen vectors;
linear or an MLP, every weight of it trained on here) and the LoRA from PEFT's
initialisation (B = 0), so training starts at that head's answers.
AdamW, seeded, with early stopping on a validation set: the best state by its accuracy (then
loss) is kept. The validation set is best worded apart from the training set (``slu_data``'s
"val" split); without one, a slice of the training file is held out.

The LoRA is written as a PEFT folder pinned to the encoder's weights (their sha256 as
``base_model_name_or_path``, as the backbone's adapters are), its weights in float16 (half
the file; what is evaluated is the adapter as written, rounded the same way).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from m4d.adapters.heads import Head, train_head
from m4d.adapters.lora import AdapterError, Lora, LoraPair, encoder_terms
from m4d.adapters.modules import attach, collect, detach, new_lora
from m4d.adapters.train import batches, read_pairs, warmup_cosine
from m4d.model.bert import (
    BertConfig,
    BertEncoder,
    MeanPool,
    RowLoras,
    configure_tokenizer,
    embed_with_counts,
    load_bert,
)

ALL_LINEARS = ("query", "key", "value", "dense")  # q/k/v, attention output, FFN in and out
STORE_DTYPE = torch.float16  # the PEFT file's weights


@dataclass(frozen=True)
class EncoderTrainSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1  # on the adapter's input while training
    targets: tuple[str, ...] = ALL_LINEARS
    lr: float = 1e-3  # the LoRA's
    head_lr: float = 1e-3
    batch: int = 32
    max_epochs: float = 6.0
    eval_every: int = 50  # steps
    patience: int = 4  # evaluations without a better validation accuracy (or loss) before stopping
    held_out: float = 0.1  # of the training file, for early stopping without a validation set
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    hidden: int = 0  # the head's hidden layer when none is given to start from (0: linear)


@dataclass
class EncoderTrainReport:
    steps: int
    best_step: int
    val_accuracy: float
    val_loss: float
    seconds: float
    examples: int
    val_examples: int
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Encoder:
    """The image's text encoder as the daemon runs it (float32 here)."""

    model: BertEncoder
    tokenizer: Any  # tokenizers.Tokenizer
    max_seq_len: int
    normalize: bool
    digest: str  # sha256 of its weights file: what its adapters are pinned to

    @property
    def config(self) -> BertConfig:
        return self.model.config


def load_encoder(image: Path) -> Encoder:
    from tokenizers import Tokenizer

    manifest = json.loads((image / "manifest.json").read_text())
    spec = manifest["components"].get("text_encoder")
    if spec is None or spec.get("kind") != "bert":
        raise AdapterError(f"{image} has no text encoder to train on")
    model = load_bert(image / spec["weights"], BertConfig.from_dict(spec["config"]))
    model.requires_grad_(False)
    return Encoder(model, Tokenizer.from_file(str(image / spec["tokenizer"])),
                   int(spec.get("max_seq_len", 256)), bool(spec.get("normalize", True)),
                   str(manifest.get("files", {}).get(spec["weights"], {}).get("sha256", "")))


def read_labelled(path: Path) -> list[tuple[str, str]]:
    """(text, label) per line of a JSONL file; a clear error for a bad line."""
    return read_pairs(path, "text", "label")


def vectors(encoder: Encoder, texts: Sequence[str], lora: Lora | None = None) -> torch.Tensor:
    """Pooled vectors [N, D] as the daemon computes them (with `lora` through its per-row
    path, every text through it)."""
    rows = None
    if lora is not None:
        rows = RowLoras([encoder_terms(lora, encoder.config)],
                        torch.zeros(len(texts), dtype=torch.long))
    with torch.inference_mode():
        out, _ = embed_with_counts(encoder.model, encoder.tokenizer, list(texts),
                                   encoder.max_seq_len, normalize=encoder.normalize, lora=rows)
    return out.float()


def _batch_vectors(encoder: Encoder, texts: Sequence[str]) -> torch.Tensor:
    """Pooled vectors [B, D] with autograd (the LoRA attached in torch)."""
    configure_tokenizer(encoder.tokenizer, encoder.max_seq_len, encoder.config.pad_token_id)
    encs = encoder.tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encs], dtype=torch.long)  # [B, S]
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
    types = torch.tensor([e.type_ids for e in encs], dtype=torch.long)
    pooled: torch.Tensor = MeanPool(encoder.normalize)(encoder.model(ids, mask, types), mask)
    return pooled


def train_encoder_head(encoder: Encoder, examples: Sequence[tuple[str, str]],
                       settings: EncoderTrainSettings = EncoderTrainSettings(),
                       validation: Sequence[tuple[str, str]] = (),
                       progress: Callable[[int, int, float], None] | None = None,
                       frozen: Head | None = None) -> tuple[Lora, Head, EncoderTrainReport]:
    """Trains an encoder LoRA with a head on (text, label) pairs; returns the best pair by
    the accuracy on `validation` (by default a slice of `examples`, held out), the LoRA's
    weights rounded as they are stored. `frozen`: the frozen-encoder head to start from
    (trained here when not given)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    data = list(examples)
    rng.shuffle(data)
    if validation:
        held, train = list(validation), data
    else:
        n_held = max(1, int(len(data) * settings.held_out)) if len(data) > 1 else 0
        held, train = data[:n_held], data[n_held:]
    if not train or not held:
        raise AdapterError("too few examples to train on and validate with")
    if frozen is None:
        frozen = train_head(vectors(encoder, [t for t, _ in train]), [y for _, y in train],
                            seed=settings.seed, hidden=settings.hidden)
    labels = frozen.labels
    unknown = sorted({y for _, y in [*train, *held]} - set(labels))
    if unknown:
        raise AdapterError(f"labels {unknown} are not among the training labels")
    model = encoder.model
    init = new_lora(model, settings.rank, settings.alpha, settings.targets, seed=settings.seed)
    init.base_model = encoder.digest
    head_params = {name: torch.nn.Parameter(t.clone()) for name, t in frozen.tensors().items()}
    trainable = frozen.with_tensors(head_params)  # runs through the parameters
    wrappers = attach(model, init, trainable=True, dropout=settings.dropout)
    params = [p for w in wrappers for p in w.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": settings.lr},
                             {"params": list(head_params.values()), "lr": settings.head_lr}],
                            weight_decay=0.0)
    total = max(1, int(settings.max_epochs * math.ceil(len(train) / settings.batch)))
    sched = warmup_cosine(opt, total)
    targets = {label: i for i, label in enumerate(labels)}
    best: tuple[float, float, int, Lora, Head] | None = None
    history: list[dict[str, float]] = []
    started, step, bad, running = time.monotonic(), 0, 0, 0.0
    draw = batches(rng, train, settings.batch)
    try:
        while step < total:
            model.train()
            batch = next(draw)
            logits = trainable.logits(_batch_vectors(encoder, [t for t, _ in batch]))
            loss = F.cross_entropy(logits, torch.tensor([targets[y] for _, y in batch]))
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_([*params, *head_params.values()], 1.0)
            opt.step()
            sched.step()
            step += 1
            running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
            if progress is not None:
                progress(step, total, running)
            if step % settings.eval_every and step != total:
                continue
            model.eval()
            head = frozen.with_tensors({n: p.detach().clone() for n, p in head_params.items()})
            accuracy, val_loss = _evaluate(encoder, head, held)
            history.append({"step": step, "train_loss": running, "val_loss": val_loss,
                            "val_accuracy": accuracy})
            if best is None or (accuracy, -val_loss) > (best[0], -best[1]):
                best, bad = (accuracy, val_loss, step, collect(model, init), head), 0
            else:
                bad += 1
                if bad >= settings.patience:
                    break
    finally:
        model.eval()
        detach(model)
    assert best is not None
    report = EncoderTrainReport(step, best[2], best[0], best[1], time.monotonic() - started,
                                len(train), len(held), history)
    return stored(best[3]), best[4], report


@torch.no_grad()
def _evaluate(encoder: Encoder, head: Head, held: Sequence[tuple[str, str]],
              batch: int = 64) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `head` on the (attached) encoder's vectors."""
    right, loss = 0, 0.0
    for i in range(0, len(held), batch):
        part = held[i:i + batch]
        logits = head.logits(_batch_vectors(encoder, [t for t, _ in part]))
        target = torch.tensor([head.labels.index(y) for _, y in part])
        right += int((logits.argmax(-1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    return right / len(held), loss / len(held)


def stored(lora: Lora) -> Lora:
    """The adapter with its weights rounded as the PEFT file stores them (``STORE_DTYPE``)."""
    out = Lora(lora.module, lora.rank, lora.alpha, rslora=lora.rslora, base_model=lora.base_model)
    for name, pair in lora.pairs.items():
        out.pairs[name] = LoraPair(pair.a.to(STORE_DTYPE).float(), pair.b.to(STORE_DTYPE).float(),
                                   pair.scaling)
    return out


def predict(head: Head, vecs: torch.Tensor) -> list[str]:
    return [head.labels[i] for i in head.logits(vecs).argmax(-1).tolist()]
