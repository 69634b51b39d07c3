"""Structured output: a response format (JSON schema, regex, choices) compiled into a
per-sequence token constraint, with llguidance.

llguidance (the Rust engine behind Guidance, on PyPI as `llguidance`) compiles a JSON schema,
a regex or a Lark grammar against the model's tokenizer and, at each step, computes the set
of tokens that keep the output inside the grammar (a bitmask over the vocabulary, ~50 µs
for a JSON schema on this model's 49,152 tokens). It was picked over xgrammar and
outlines-core because it takes the tokenizer.json the image already ships, has no torch or
CUDA requirement, and checks schemas up front (an unsupported keyword is an error, not a
silently looser grammar).

`Grammars` compiles requests for one tokenizer (built once, on the first structured
request: ~0.3 s); a format it cannot compile is InvalidArgument with llguidance's message.
`GrammarConstraint` is the engine's `TokenConstraint` for one sequence.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import llguidance
import torch
from llguidance import TokenizerWrapper
from tokenizers import Tokenizer

from m4d.errors import InvalidArgument

log = logging.getLogger(__name__)

FormatKind = Literal["json_schema", "regex", "choices", "lark"]  # lark: the daemon's own
MAX_FORMAT_CHARS = 65_536  # a schema, regex or the choices together
REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~")
# Whitespace between JSON tokens: a space or a tab or a few, or one line break and its
# indentation (pretty-printed JSON as models write it). llguidance's default admits any run
# of whitespace, and a small model can loop on "\n \n \n" until max_tokens cuts the JSON
# short (measured: 2 of 400 answers in bench_structured). An app's own "x-guidance" wins.
JSON_WHITESPACE = {"whitespace_pattern": r"[ \t]{1,4}|[ \t]{0,4}\r?\n[ \t]{0,24}"}


@dataclass(frozen=True)
class ResponseFormat:
    kind: FormatKind
    json_schema: str = ""
    regex: str = ""
    choices: tuple[str, ...] = ()
    lark: str = ""  # a grammar in llguidance's Lark dialect (tool calls; not in the API)


SPAN = "x-m4-span"  # a string schema marked so is a span of the request's text (task schemas)
MAX_SPAN_WORDS = 8
_SPAN_EDGES = ",.;:!?\"()[]"  # stripped from a span's ends (not "'": "kids' room")


def bind_spans(schema: str, text: str | None) -> str:
    """A task's JSON schema with each string marked ``"x-m4-span": true`` replaced by the
    choice of the spans of `text` (runs of up to MAX_SPAN_WORDS words, exactly as written
    between them, the outer punctuation off): a slot is then copied from the request, never
    misspelt. Without a text (or one with no words) the mark is dropped and the string is
    free."""
    text = text or ""
    words = [m.span() for m in re.finditer(r"\S+", text)]
    spans = {text[words[i][0]:words[j - 1][1]].strip(_SPAN_EDGES) for i in range(len(words))
             for j in range(i + 1, min(len(words), i + MAX_SPAN_WORDS) + 1)}
    choices = sorted(s for s in spans if s)

    def bind(node: object) -> object:
        if isinstance(node, list):
            return [bind(n) for n in node]
        if not isinstance(node, dict):
            return node
        if node.get(SPAN) is True:
            return {"enum": choices} if choices else {k: v for k, v in node.items() if k != SPAN}
        return {k: bind(v) for k, v in node.items()}

    return json.dumps(bind(json.loads(schema)))


def _escape(text: str) -> str:
    """A regex matching `text` literally (llguidance's regex syntax is Rust's)."""
    return "".join("\\" + c if c in REGEX_SPECIAL else c for c in text)


class GrammarConstraint:
    """One sequence's position in its grammar (the engine's `TokenConstraint`)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self.matcher = matcher
        self.words = (vocab + 31) // 32
        self._bits = torch.empty(1, self.words, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def restrict(self, logits: torch.Tensor) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self.words * 4)
        allowed = ((self._bits[0, :, None] >> self._shifts) & 1).reshape(-1).bool()
        n = logits.shape[-1]
        if n > allowed.numel():  # the model's padding rows beyond the tokenizer: never
            logits[allowed.numel():] = float("-inf")
            logits = logits[:allowed.numel()]
        logits.masked_fill_(~allowed[:n], float("-inf"))

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):  # only a token `restrict` forbade: the
            log.warning("structured output left its grammar: %s",  # matcher stops (done)
                        self.matcher.get_error())

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped())


class _TokenTexts:
    """A tokenizer as llguidance's `TokenizerWrapper` wants it, for tokenizers its own
    tokenizer.json reader does not take: each token is the text it decodes to alone."""

    def __init__(self, tokenizer_json: Path, eos_ids: list[int]) -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        n = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokens = [self._tokenizer.decode([i], skip_special_tokens=False).encode()
                       for i in range(n)]
        self.special_token_ids = sorted(
            i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special)
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = None

    def __call__(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids


class Grammars:
    """Compiles response formats for one tokenizer (tokenizer.json) and its end tokens."""

    def __init__(self, tokenizer_json: Path, eos_ids: list[int], vocab: int) -> None:
        self.tokenizer_json = tokenizer_json
        self.eos_ids = eos_ids
        self.vocab = vocab
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._failed: str | None = None  # why it cannot be built
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer, built on first use (~0.3 s; the daemon builds
        it once the image serves). InvalidArgument when it cannot be built: the image then
        serves without structured output."""
        with self._lock:
            if self._tokenizer is None and self._failed is None:
                try:
                    self._tokenizer = self._build()
                except (ValueError, RuntimeError) as exc:
                    self._failed = str(exc)
            if self._tokenizer is None:
                raise InvalidArgument(
                    f"this image's backbone has no structured output: {self._failed}")
            return self._tokenizer

    def _build(self) -> llguidance.LLTokenizer:
        try:
            return llguidance.LLTokenizer(str(self.tokenizer_json), n_vocab=self.vocab,
                                          eos_token=self.eos_ids)
        except ValueError as exc:  # e.g. a word-level tokenizer with no decoder
            log.info("llguidance cannot read %s (%s); using each token's text",
                     self.tokenizer_json.name, exc)
            source = TokenizerWrapper(_TokenTexts(self.tokenizer_json, self.eos_ids))
            return llguidance.LLTokenizer(source, n_vocab=self.vocab, eos_token=self.eos_ids)

    def grammar(self, fmt: ResponseFormat) -> str:
        """llguidance's grammar for a format (not yet checked)."""
        size = (len(fmt.json_schema) + len(fmt.regex) + len(fmt.lark)
                + sum(len(c) for c in fmt.choices))
        if size > MAX_FORMAT_CHARS:
            raise InvalidArgument(f"response_format is {size} characters; at most "
                                  f"{MAX_FORMAT_CHARS}")
        if fmt.kind == "json_schema":
            try:
                schema = json.loads(fmt.json_schema)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"response_format.json_schema is not JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise InvalidArgument("response_format.json_schema must be a JSON object")
            try:  # the schema checked on its own, so errors quote the app's schema, not ours
                self._check(str(llguidance.LLMatcher.grammar_from_json_schema(schema)), fmt)
            except ValueError as exc:
                raise InvalidArgument(f"response_format.json_schema: {exc}") from None
            # up to 4 spaces or newlines before the value: a model continues "JSON:" with its
            # own " {" token, which a grammar starting at "{" would forbid (the tokens it
            # picks otherwise are its second choices, and worse JSON)
            schema = {**schema, "x-guidance": {**JSON_WHITESPACE, **schema.get("x-guidance", {})}}
            return ("start: LEAD? value\nLEAD: /[ \\t\\r\\n]{1,4}/\n"
                    f"value: %json {json.dumps(schema)}\n")
        if fmt.kind == "lark":
            return fmt.lark
        if fmt.kind == "regex":
            if not fmt.regex:
                raise InvalidArgument("response_format.regex is empty")
            return str(llguidance.LLMatcher.grammar_from_regex(fmt.regex))
        if not fmt.choices or any(not c for c in fmt.choices):
            raise InvalidArgument("response_format.choices needs at least one non-empty choice")
        return str(llguidance.LLMatcher.grammar_from_regex(
            "(" + "|".join(_escape(c) for c in fmt.choices) + ")"))

    def _check(self, grammar: str, fmt: ResponseFormat) -> None:
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer())
        if error and not error.startswith("WARNING"):
            message = " ".join(line.strip() for line in error.splitlines() if line.strip())
            raise InvalidArgument(f"response_format.{fmt.kind}: {message}")  # on one line

    def compile(self, fmt: ResponseFormat) -> GrammarConstraint:
        """A fresh constraint for one sequence; InvalidArgument when the format is not
        valid or not supported."""
        grammar, tokenizer = self.grammar(fmt), self.tokenizer()
        self._check(grammar, fmt)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"response_format.{fmt.kind}: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.vocab)
