"""Streaming detokenizer and chat template behaviour on the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from jinja2.exceptions import SecurityError, TemplateError
from m4d.prepare.tokenizer import ChatTemplate, IncrementalDecoder

TEXTS = [
    "Hello, world! 1234",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦, CJK 中文字符 日本語",
    "naïve café — “quotes” ≠ ascii\n\tcode()",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_pieces_concatenate_to_decode(imported_llama, text: str) -> None:
    tok = imported_llama.tokenizer
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    tail = dec.flush()
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    if any(ord(c) > 0xFFFF for c in text):  # a 4-byte character spans several byte tokens
        assert "" in pieces


def test_incremental_decoder_holds_broken_utf8_until_flush(imported_llama) -> None:
    tok = imported_llama.tokenizer
    ids = tok.encode("a😀")
    dec = IncrementalDecoder(tok)
    out = "".join(dec.push(i) for i in ids[:-1])  # the emoji's last byte is missing
    assert out == "a"
    assert dec.flush() == tok.decode(ids[:-1])[1:]


def test_incremental_decoder_skips_special_tokens(imported_llama) -> None:
    tok = imported_llama.tokenizer
    ids = tok.encode("Paris.<|im_end|>")
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "Paris."


def test_chat_template_is_sandboxed_and_raises(imported_llama) -> None:
    rendered = imported_llama.chat.render([{"role": "user", "content": "hi"}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert imported_llama.chat.render([{"role": "user", "content": "hi"}],
                                      add_generation_prompt=False).endswith("<|im_end|>\n")
    with pytest.raises(SecurityError):
        ChatTemplate("{{ ''.__class__.__mro__ }}", bos_token=None, eos_token=None).render([])
    with pytest.raises(TemplateError, match="no system"):
        ChatTemplate("{{ raise_exception('no system') }}", bos_token=None, eos_token=None).render([])
    with pytest.raises(ValueError, match="role"):
        imported_llama.chat.render([{"content": "x"}])
