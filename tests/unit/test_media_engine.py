"""Media work without a model: batching with de-duplication, keyword spotting, cascade prompts."""

from __future__ import annotations

from m4d.engine.cascade import answer_messages
from m4d.engine.media import (
    final_event,
    normalise_words,
    run_media_batch,
    similarity,
    spot_keyword,
)
from m4d.requests import (
    Caller,
    KeywordsHeard,
    MediaInput,
    MediaOp,
    MediaRequest,
    Priority,
    Recognised,
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
