"""Text tokenizer, streaming detokenizer and chat template (request-preparation stage).

* ``TextTokenizer``: a ``tokenizers.Tokenizer`` from the image's ``tokenizer.json``.
* ``IncrementalDecoder``: token ids in, complete UTF-8 text out, for streaming.
* ``ChatTemplate``: the checkpoint's own Jinja template, rendered in a sandbox with the variables
  Hugging Face passes (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``).
* ``tokenizer_from_gguf``: builds the byte-level BPE from a GGUF's metadata (image-build time).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4


class TextTokenizer:
    """Encode/decode text with the image's tokenizer; bos/eos come from the model manifest."""

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int | None, eos_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def from_file(cls, path: Path, *, bos_id: int | None = None,
                  eos_id: int | None = None) -> TextTokenizer:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)), bos_id=bos_id, eos_id=eos_id)

    @property
    def vocab_size(self) -> int:
        n: int = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return n

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokenizer.id_to_token(self.eos_id)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Special-token strings in ``text`` (e.g. ``<|im_start|>``) always map to their ids;
        ``add_special`` runs the tokenizer's post-processor (adds BOS where the model wants it)."""
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)
        return text

    def token_to_id(self, token: str) -> int | None:
        i: int | None = self.tokenizer.token_to_id(token)
        return i


class IncrementalDecoder:
    """Streaming detokenizer: ``push(id)`` returns the newly completed text (maybe "").

    Text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD);
    ``flush()`` returns whatever is held. ``"".join(pieces) + flush() == decode(all ids)``.
    Work per token is bounded: only the ids since the last clean boundary are re-decoded.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that is re-decoded
        self._read = 0  # ids before this were already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._ids[self._prefix:]
        prev = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(window, self._skip)
        if text.endswith("\ufffd") or len(text) <= len(prev) or not text.startswith(prev):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prev):]

    def flush(self) -> str:
        """The held-back text (possibly ending in U+FFFD); resets the window."""
        prev = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(prev):] if text.startswith(prev) else text


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """The checkpoint's Jinja chat template, rendered like transformers' apply_chat_template."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        for m in messages:
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message needs 'role' and 'content', got keys {sorted(m)}")
        text: str = self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        return text


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_from_gguf(reader: Any) -> Tokenizer:
    """A byte-level BPE ``Tokenizer`` from a ``gguf.GGUFReader``'s tokenizer metadata.

    Supports ``tokenizer.ggml.model == "gpt2"`` with the ``smollm`` pre-tokenizer (every digit
    its own piece, then GPT-2 byte-level splitting, no prefix space). GGUF stores byte-level
    tokens already spelled in GPT-2's byte alphabet, so vocab and merges are used as they are.
    Control tokens become special tokens (whole-matched, skipped by decode), user-defined
    tokens plain added tokens.
    """
    model = _gguf_field(reader, "tokenizer.ggml.model")
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (only 'gpt2' byte-level BPE)")
    if pre not in ("smollm",):
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (only 'smollm')")
    tokens: list[str] = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    merges_raw: list[str] = list(_gguf_field(reader, "tokenizer.ggml.merges"))
    types: list[int] = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"malformed GGUF merge {m!r}")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == GGUF_TOKEN_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == GGUF_TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    if _gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_tok = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_tok} $A", pair=f"{bos_tok} $A {bos_tok} $B",
            special_tokens=[(bos_tok, int(bos))])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("tokenizer size differs from the GGUF vocabulary")
    log.debug("built BPE tokenizer: %d tokens, %d merges, %d control", len(tokens),
              len(merges), len(control))
    return tok
