"""Speech and vision through the real daemon on the default image: transcripts of speech
that espeak-ng synthesises, OCR of text Pillow renders, keyword spotting, questions answered
from what was read or heard, and every bad media input refused with INVALID_ARGUMENT while
the daemon keeps serving."""

from __future__ import annotations

import io
import json
import struct
import wave
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4client import Audio, Client, Image, InvalidArgumentError, PcmAudio
from m4d.engine.cascade import SCHEMAS
from PIL import Image as PILImage

from tests import rendering, speech
from tests.conftest import DaemonProcess


@pytest.fixture(scope="module")
def m4(daemon: DaemonProcess) -> Client:
    with Client(daemon.address, timeout=300) as client:
        yield client


def test_task_table_lists_the_media_tasks(m4: Client) -> None:
    table = {t.id: t for t in m4.list_tasks()}
    assert {"transcribe", "keyword-spot", "speech-understand", "ocr", "ocr-ask"} <= set(table)
    assert table["ocr"].m4_id == "T21" and table["ocr"].path == 3
    assert table["ocr-ask"].path == 1 and list(table["ocr-ask"].modules) == ["ocr", "backbone"]
    assert [(s.name, s.kind) for s in table["transcribe"].inputs] == [("audio", "audio")]


def test_speech_is_transcribed_within_the_word_error_target(m4: Client) -> None:
    sentences = speech.SENTENCES
    assert len(sentences) >= 10
    clips = [speech.synthesize(s) for s in sentences]
    with ThreadPoolExecutor(4) as pool:  # concurrent calls share encoder batches
        results = list(pool.map(lambda wav: m4.transcribe(Audio(wav)), clips))
    error = speech.wer(sentences, [r.text for r in results])
    print(f"WER over {len(sentences)} espeak-ng sentences through the daemon: {error:.3f}")
    for ref, r in zip(sentences, results, strict=True):
        print(f"  {ref!r} -> {r.text!r}")
    assert error <= 0.15
    assert all(r.audio_seconds > 0.5 and r.usage.prompt_tokens > 0 for r in results)


def test_raw_pcm_gives_the_same_transcript_as_the_wav(m4: Client) -> None:
    sentence = "Our flight to London leaves in forty five minutes."
    wav = speech.synthesize(sentence)
    with wave.open(io.BytesIO(wav)) as w:
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
    from_wav = m4.transcribe(Audio(wav)).text
    from_pcm = m4.transcribe(PcmAudio(frames, rate)).text
    assert from_pcm == from_wav
    assert speech.wer([sentence], [from_wav]) <= 0.15, from_wav


def test_keywords_are_spotted_in_speech(m4: Client) -> None:
    wav = speech.synthesize("Please turn on the kitchen lights and set a timer for ten minutes.")
    result = m4.spot_keywords(Audio(wav), ["kitchen lights", "timer", "weather forecast"])
    hits = {k.keyword: k for k in result.keywords}
    assert hits["kitchen lights"].detected and hits["timer"].detected
    assert not hits["weather forecast"].detected
    assert "kitchen" in result.source_text.lower()


def test_rendered_text_is_read_within_the_accuracy_target(m4: Client) -> None:
    assert len(rendering.FONTS) >= 3
    refs, hyps = [], []
    for font, size in rendering.FONTS:
        for lines in rendering.TEST_LINES:
            result = m4.read_text(Image(rendering.render_lines(lines, font, size)))
            refs.append("\n".join(lines))
            hyps.append(result.text)
            assert result.boxes and all(len(b.corners) == 4 for b in result.boxes)
            print(f"  {font} {size}: {lines!r} -> {result.text!r}")
    accuracy = rendering.char_accuracy("\n".join(hyps), "\n".join(refs))
    print(f"OCR character accuracy through the daemon: {accuracy:.4f}")
    assert accuracy >= 0.95


def test_ocr_boxes_lie_where_the_text_was_drawn(m4: Client) -> None:
    png = rendering.render_lines(["EXIT"], "DejaVuSans.ttf", 40, margin=100)
    (box,) = m4.read_text(Image(png)).boxes
    xs, ys = [x for x, _ in box.corners], [y for _, y in box.corners]
    assert box.text == "EXIT" and box.confidence > 0.5
    assert 85 <= min(xs) <= 110 and 85 <= min(ys) <= 125  # drawn at (100, 100)
    assert 160 <= max(xs) <= 220  # "EXIT" at 40 px is about 90 px wide


def test_questions_about_an_image_are_answered_from_its_text(m4: Client) -> None:
    png = rendering.render_lines(["Meeting in room 204", "starts at 3 PM"], "DejaVuSans.ttf", 36)
    chunks = list(m4.ask("Which room is the meeting in?", image=Image(png), temperature=0,
                         max_tokens=24))
    assert "204" in chunks[0].source_text  # what was read comes first
    answer = "".join(c.text for c in chunks)
    print(f"ocr-ask answer: {answer!r}")
    assert "204" in answer
    assert chunks[-1].finish_reason is not None and chunks[-1].usage.completion_tokens > 0


def test_spoken_requests_become_json_intents(m4: Client) -> None:
    wav = speech.synthesize("Can you turn off the lights in the kitchen, please?")
    chunks = list(m4.run("speech-understand", {"audio": Audio(wav)}, temperature=0,
                         max_tokens=64))
    assert "kitchen" in chunks[0].source_text.lower()  # the transcript comes first
    answer = "".join(c.text for c in chunks)
    print(f"speech-understand: {chunks[0].source_text!r} -> {answer!r}")
    parsed = json.loads(answer)  # structured output: the task's schema held while decoding
    jsonschema.validate(parsed, SCHEMAS["slu"])
    assert "light" in answer.lower() or "kitchen" in answer.lower()  # answered from it


# ---- bad input ----------------------------------------------------------------------------


def _wav(seconds: float, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _noise_png(side: int) -> bytes:
    import os

    image = PILImage.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8), "red").save(buf, format="GIF")
    return buf.getvalue()


BAD = [
    ("undecodable image bytes", "ocr", pb.Input(name="image", image=b"\x89PNG\r\n\x1a\nnot really"),
     "image"),
    ("an image format we do not take", "ocr", pb.Input(name="image", image=_gif()), "GIF"),
    ("an empty image", "ocr", pb.Input(name="image", image=b""), "empty"),
    ("an image declaring too many pixels", "ocr",
     pb.Input(name="image", image=_png_claiming(30_000, 30_000)), "pixels"),
    ("audio longer than the limit", "transcribe", pb.Input(name="audio", audio=_wav(31)), "30"),
    ("audio that is not WAV", "transcribe", pb.Input(name="audio", audio=b"ID3\x03not a wav"),
     "WAV"),
    ("a wrong sample rate", "transcribe", pb.Input(name="audio", pcm=pb.PcmAudio(
        data=b"\0\0" * 4000, sample_rate=4000)), "4000"),
    ("no sample rate", "transcribe", pb.Input(name="audio", pcm=pb.PcmAudio(data=b"\0\0" * 10)),
     "rate"),
    ("an unknown PCM encoding", "transcribe", pb.Input(name="audio", pcm=pb.PcmAudio(
        data=b"\0\0" * 1600, sample_rate=16_000, encoding="mulaw")), "mulaw"),
    ("an image sent to a text task", "complete", pb.Input(name="prompt", image=b"\x89PNG"),
     "must be text, not image"),
    ("audio sent to an image task", "ocr", pb.Input(name="image", audio=_wav(1)),
     "must be image, not audio"),
    ("text sent to a speech task", "transcribe", pb.Input(name="audio", text="hello"),
     "must be audio, not text"),
]


@pytest.mark.parametrize(("case", "task", "item", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_media_inputs_are_refused_clearly(daemon: DaemonProcess, case: str, task: str,
                                              item: pb.Input, needle: str) -> None:
    with grpc.insecure_channel(daemon.address, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Run(pb.RunRequest(task=task, inputs=[item]), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert needle.lower() in err.value.details().lower(), err.value.details()
        # and the daemon still serves
        assert list(stub.ListTasks(pb.ListTasksRequest(), timeout=30).tasks)


def test_an_image_above_the_byte_limit_is_refused(m4: Client) -> None:
    big = _noise_png(1900)  # ~10.8 MB: above the 10 MiB default, below the message limit
    assert len(big) > 10 * 1024 * 1024
    with pytest.raises(InvalidArgumentError, match="bytes"):
        m4.read_text(Image(big))
    assert m4.read_text(Image(rendering.render_lines(["OK"], "DejaVuSans.ttf", 40))).text == "OK"
