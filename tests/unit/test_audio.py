"""m4d.prepare.audio: WAV/PCM decoding, every bad input -> InvalidArgument, resampling, log-mel."""

from __future__ import annotations

import io
import math
import struct
import wave

import numpy as np
import pytest
import torch
from m4d.errors import InvalidArgument
from m4d.prepare.audio import decode_wav, log_mel, mel_filters, pcm_to_tensor, resample


def _tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def _riff(fmt_tag: int, channels: int, rate: int, bits: int, data: bytes, *,
          extensible: bool = False, extra_chunk: bool = False) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else fmt_tag, channels, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, SubFormat GUID (tag + fixed suffix)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", fmt_tag) + bytes(14)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if extra_chunk:  # an odd-sized LIST chunk with its pad byte
        chunks += b"LIST" + struct.pack("<I", 3) + b"abc\0"
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def _encode(x: np.ndarray, bits: int, fmt_tag: int) -> bytes:
    """Interleaved float samples in [-1, 1) -> little-endian sample bytes."""
    if fmt_tag == 3:
        return x.astype("<f4" if bits == 32 else "<f8").tobytes()
    if bits == 8:
        return np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    scale = 2 ** (bits - 1)
    q = np.clip(np.round(x * scale), -scale, scale - 1).astype(np.int64)
    if bits == 24:
        b = q.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        return b.tobytes()
    return q.astype({16: "<i2", 32: "<i4"}[bits]).tobytes()


@pytest.mark.parametrize(("fmt_tag", "bits", "tol"), [(1, 8, 1 / 100), (1, 16, 1e-4), (1, 24, 1e-6),
                                                     (1, 32, 1e-7), (3, 32, 1e-7), (3, 64, 1e-7)])
@pytest.mark.parametrize("extensible", [False, True])
def test_decode_wav_formats(fmt_tag: int, bits: int, tol: float, extensible: bool) -> None:
    left, right = _tone(440, 22050, 0.5), _tone(660, 22050, 0.5, amp=0.25)
    stereo = np.stack([left, right], axis=1).reshape(-1)
    data = _riff(fmt_tag, 2, 22050, bits, _encode(stereo, bits, fmt_tag), extensible=extensible,
                 extra_chunk=True)
    x, rate = decode_wav(data, max_seconds=30)
    assert rate == 22050 and x.dtype == torch.float32 and x.shape == (len(left),)
    assert np.abs(x.numpy() - (left + right) / 2).max() <= tol


def test_decode_wav_matches_stdlib_writer() -> None:
    samples = (_tone(300, 16000, 0.25) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.tobytes())
    x, rate = decode_wav(buf.getvalue(), max_seconds=1)
    assert rate == 16000
    assert np.array_equal(x.numpy(), samples.astype(np.float32) / 32768)


def _good(rate: int = 16000, seconds: float = 0.1) -> bytes:
    return _riff(1, 1, rate, 16, _encode(_tone(440, rate, seconds), 16, 1))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"RIFX\0\0\0\0WAVE", "not a WAV"),
    (b"OggS" + bytes(40), "not a WAV"),
    (_riff(1, 1, 16000, 16, b""), "empty"),
    (_riff(2, 1, 16000, 16, bytes(100)), "unsupported WAV encoding"),  # ADPCM
    (_riff(1, 1, 16000, 12, bytes(100)), "unsupported WAV encoding"),
    (_riff(3, 1, 16000, 16, bytes(100)), "unsupported WAV encoding"),
    (_good()[:-10], "truncated"),
    (_riff(1, 2, 16000, 16, bytes(6)), "truncated"),  # 1.5 stereo frames
    (_good()[:30], "truncated"),
    (_good(rate=0), "sample rate 0 Hz"),
    (_good(rate=4000), "sample rate 4000 Hz"),
    (_good(rate=96000), "sample rate 96000 Hz"),
    (_riff(1, 0, 16000, 16, bytes(100)), "channels"),
    (_good(seconds=2.5), "limit is 2 s"),
    (_riff(3, 1, 16000, 32, np.array([0.1, np.nan, 0.2], "<f4").tobytes()), "NaN"),
    (_riff(3, 1, 16000, 32, np.array([0.1, np.inf], "<f4").tobytes()), "NaN or infinite"),
    (b"RIFF\0\0\0\0WAVE" + b"data" + struct.pack("<I", 4) + bytes(4), "before the 'fmt ' chunk"),
    (b"RIFF\0\0\0\0WAVE" + b"LIST" + struct.pack("<I", 0), "no valid 'fmt ' chunk"),
])
def test_decode_wav_rejects(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_wav(data, max_seconds=2)


def test_pcm_to_tensor() -> None:
    stereo = np.stack([_tone(440, 8000, 0.2), _tone(440, 8000, 0.2)], axis=1).reshape(-1)
    x = pcm_to_tensor(_encode(stereo, 16, 1), sample_rate=8000, encoding="s16le", channels=2, max_seconds=1)
    assert x.shape == (1600,) and np.abs(x.numpy() - stereo[::2]).max() < 1e-4
    y = pcm_to_tensor(stereo[::2].astype("<f4").tobytes(), sample_rate=8000, encoding="f32le", channels=1,
                      max_seconds=1)
    assert np.abs(y.numpy() - stereo[::2]).max() < 1e-7


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"data": b""}, "empty"),
    ({"data": bytes(3)}, "truncated"),
    ({"encoding": "mulaw"}, "unsupported PCM encoding"),
    ({"sample_rate": 0}, "sample rate 0 Hz"),
    ({"sample_rate": 50000}, "sample rate 50000 Hz"),
    ({"channels": 0}, "channels"),
    ({"data": bytes(16000 * 2 * 3)}, "limit is 2 s"),
    ({"data": np.array([np.nan], "<f4").tobytes(), "encoding": "f32le"}, "NaN"),
])
def test_pcm_to_tensor_rejects(kwargs: dict, message: str) -> None:
    args = {"data": bytes(320), "sample_rate": 16000, "encoding": "s16le", "channels": 1, "max_seconds": 2}
    with pytest.raises(InvalidArgument, match=message):
        pcm_to_tensor(**{**args, **kwargs})


def _peak_hz(x: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.numpy() * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize("src", [8000, 11025, 22050, 24000, 32000, 44100, 48000, 44101])
def test_resample_keeps_tone_frequency(src: int) -> None:
    x = torch.tensor(_tone(1000, src, 1.0), dtype=torch.float32)
    y = resample(x, src, 16000)
    assert len(y) == math.ceil(len(x) * 16000 / src)
    assert abs(_peak_hz(y, 16000) - 1000) <= 1.0
    # away from the edges the result is the same sine, sampled at 16 kHz
    t = np.arange(len(y)) / 16000
    assert np.abs(y.numpy() - 0.5 * np.sin(2 * np.pi * 1000 * t))[400:-400].max() < 2e-3


def test_resample_removes_content_above_new_nyquist() -> None:
    x = torch.tensor(_tone(10000, 48000, 1.0), dtype=torch.float32)  # above 8 kHz: must vanish
    y = resample(x, 48000, 16000)
    assert float(y[400:-400].abs().max()) < 1e-3


def test_resample_rejects_bad_rates() -> None:
    for rate in (0, 7999, 48001, 96000):
        with pytest.raises(InvalidArgument, match=f"sample rate {rate} Hz"):
            resample(torch.zeros(100), rate, 16000)
    with pytest.raises(InvalidArgument, match="mono"):
        resample(torch.zeros(2, 100), 8000, 16000)


def test_log_mel_shape_and_range() -> None:
    x = torch.tensor(_tone(1000, 16000, 2.0), dtype=torch.float32)
    m = log_mel(x)
    assert m.shape == (80, 3000) and m.dtype == torch.float32
    assert float(m.max() - m.min()) <= 2.0 + 1e-6  # 8 decades of range, divided by 4
    # the loudest band holds 1 kHz: its filter peaks there
    centre = int(mel_filters(80)[:, 25].argmax())
    assert int(m[:, 10].argmax()) == centre
    assert log_mel(torch.zeros(16000 * 40)).shape == (80, 3000)  # trimmed to 30 s
    with pytest.raises(InvalidArgument, match="mono"):
        log_mel(torch.zeros(2, 16000))
