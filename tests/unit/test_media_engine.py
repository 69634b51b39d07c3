"""Media work without a model: batching with de-duplication, a bad input failing only its
own request, keyword spotting, cascade prompts and the plan of a cascade's answer."""

from __future__ import annotations

import pytest
from m4d.engine.cascade import IMAGE_MARKER, answer_messages, plan_answer
from m4d.engine.media import (
    final_event,
    normalise_words,
    recognise_batch,
    run_media_batch,
    similarity,
    spot_keyword,
)
from m4d.errors import InvalidArgument
from m4d.requests import (
    Caller,
    KeywordsHeard,
    MediaInput,
    MediaOp,
    MediaRequest,
    Priority,
    Recognised,
    SamplingParams,
    TextBox,
    TextRead,
    Transcribed,
)


def _request(op: MediaOp, digest: str, module: str = "speech", **kw: object) -> MediaRequest:
    kind = "image" if module == "ocr" else "audio"
    return MediaRequest(task=op.value, priority=Priority.FOREGROUND, caller=Caller(uid=1000),
                        op=op, module=module,
                        media=MediaInput(kind, f"data-{digest}", digest, seconds=2.5), **kw)


def test_equal_inputs_in_a_batch_are_recognised_once() -> None:
    calls: list[tuple[str, list[object]]] = []

    def recognise(module: str, inputs: list[object]) -> list[Recognised]:
        calls.append((module, list(inputs)))
        return [Recognised(f"text of {x}", tokens=3) for x in inputs]

    batch = [_request(MediaOp.TRANSCRIBE, d) for d in ("a", "b", "a", "a")]
    results = list(run_media_batch(recognise, batch))
    assert calls == [("speech", ["data-a", "data-b"])]  # one forward pass, two distinct clips
    assert [r.recognised.text for r in results] == [
        "text of data-a", "text of data-b", "text of data-a", "text of data-a"]
    assert [r.request for r in results] == batch


def test_final_events_carry_what_each_task_asked_for() -> None:
    rec = Recognised("please send the email now", tokens=6)
    work = _request(MediaOp.TRANSCRIBE, "x")
    (result,) = run_media_batch(lambda m, xs: [rec for _ in xs], [work])
    event = final_event(result)
    assert isinstance(event, Transcribed)
    assert event.text == rec.text and event.audio_seconds == 2.5
    assert event.usage.prompt_tokens == 6 and event.timings.total_ms >= event.timings.prefill_ms

    kw = _request(MediaOp.KEYWORDS, "x", keywords=["e-mail", "weather"])
    (result,) = run_media_batch(lambda m, xs: [rec for _ in xs], [kw])
    heard = final_event(result)
    assert isinstance(heard, KeywordsHeard)
    assert [(h.keyword, h.detected) for h in heard.hits] == [("e-mail", True), ("weather", False)]
    assert heard.transcript == rec.text

    box = TextBox("EXIT", 0.97, ((0, 0), (40, 0), (40, 10), (0, 10)))
    ocr = _request(MediaOp.OCR, "y", module="ocr")
    (result,) = run_media_batch(lambda m, xs: [Recognised("EXIT", boxes=(box,)) for _ in xs], [ocr])
    read = final_event(result)
    assert isinstance(read, TextRead) and read.boxes == [box] and read.text == "EXIT"


def test_keyword_spotting_tolerates_spelling_but_not_other_words() -> None:
    transcript = "Hey, could you turn on the living-room lights and set a timer for 10 minutes?"
    assert spot_keyword("living room lights", transcript, 0.75).detected
    assert spot_keyword("timer", transcript, 0.75).score == 1.0
    assert spot_keyword("Lights!", transcript, 0.75).heard == "lights"
    assert not spot_keyword("weather", transcript, 0.75).detected
    assert not spot_keyword("alarm", transcript, 0.75).detected
    assert spot_keyword("anything", "", 0.75).score == 0.0
    assert normalise_words("Café, DÉJÀ-vu!") == ["cafe", "deja", "vu"]
    assert similarity("kitten", "sitting") == 1 - 3 / 7


def test_cascade_prompts_hold_the_source_and_the_question() -> None:
    messages = answer_messages("ocr_qa", "ROOM 204\nMEETING AT 3 PM", "Which room?")
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    assert "ROOM 204" in messages[1]["content"] and "Which room?" in messages[1]["content"]
    slu = answer_messages("slu", "set an alarm for seven", "")
    assert "set an alarm for seven" in slu[-1]["content"] and "JSON" in slu[0]["content"]
    assert [m["role"] for m in slu[1:-1]] == ["user", "assistant"] * 3  # worked examples
    assert all(m["content"].startswith('{"intent": "') for m in slu[2:-1:2])


def test_a_bad_input_fails_its_own_request_not_its_batch_mates() -> None:
    def recognise(module: str, inputs: list[object]) -> list[Recognised]:
        if "data-bad" in inputs:
            raise InvalidArgument("unreadable audio")
        return [Recognised(f"text of {x}") for x in inputs]

    good, bad, other = (_request(MediaOp.TRANSCRIBE, d) for d in ("a", "bad", "b"))
    results, failed = recognise_batch(recognise, [good, bad, other])
    assert [(r.request, r.recognised.text) for r in results] == [
        (good, "text of data-a"), (other, "text of data-b")]
    assert [(r, str(e)) for r, e in failed] == [(bad, "unreadable audio")]
    assert recognise_batch(recognise, [bad])[0] == []
    results, failed = recognise_batch(recognise, [good])
    assert len(results) == 1 and failed == []


class CharTokenizer:
    """One token per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def _question(template: str, max_tokens: int = 50) -> MediaRequest:
    return _request(MediaOp.ANSWER, "q", prompt_template=template, question="Which room?",
                    sampling=SamplingParams(max_tokens=max_tokens, temperature=0.5),
                    deadline=123.0)


def test_a_cascade_answer_is_generation_on_the_same_request() -> None:
    request = _question("ocr_qa")
    text = "\n".join(m["content"] for m in answer_messages("ocr_qa", "ROOM 204", "Which room?"))
    answer = plan_answer(request, "ROOM 204", tokenizer=CharTokenizer(),  # type: ignore[arg-type]
                         template=None, max_context=len(text) + 1 + 10)
    generate = answer.request
    assert generate.prompt_ids == [ord(c) for c in text + "\n"]
    assert (generate.id, generate.caller, generate.priority, generate.arrival,
            generate.deadline, generate.task) == (request.id, request.caller, request.priority,
                                                 request.arrival, 123.0, request.task)
    assert generate.sampling.max_tokens == 10, "cut to the room left in the context"
    assert generate.sampling.temperature == 0.5 and answer.splice_ids is None


def test_a_cascade_answer_that_cannot_run_is_refused() -> None:
    request = _question("speech_qa")
    with pytest.raises(InvalidArgument, match="context holds 20"):
        plan_answer(request, "a long transcript", tokenizer=CharTokenizer(),  # type: ignore[arg-type]
                    template=None, max_context=20)
    with pytest.raises(InvalidArgument, match="needs a language backbone"):
        plan_answer(request, "x", tokenizer=None, template=None, max_context=1000)
    request.sampling = None
    with pytest.raises(InvalidArgument, match="needs a language backbone"):
        plan_answer(request, "x", tokenizer=CharTokenizer(),  # type: ignore[arg-type]
                    template=None, max_context=1000)


def test_an_image_question_puts_one_token_per_image_feature() -> None:
    image_token, features = 9999, 5
    answer = plan_answer(_question("vqa"), "", tokenizer=CharTokenizer(),  # type: ignore[arg-type]
                         template=None, max_context=1000, image=(image_token, features))
    splice, ids = answer.splice_ids, answer.request.prompt_ids
    assert splice is not None and splice.count(image_token) == 1
    at = splice.index(image_token)
    assert splice[:at] == [] and "".join(map(chr, splice[at + 1:])).startswith("\nWhich room?")
    assert ids == splice[:at] + [image_token] * features + splice[at + 1:]
    assert IMAGE_MARKER not in "".join(chr(i) for i in ids if i != image_token)
