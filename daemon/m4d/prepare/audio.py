"""Request-preparation stage, audio: WAV/PCM bytes -> float32 waveform -> 16 kHz -> Whisper log-mel.

Torch and the standard library only. Every bad input raises ``InvalidArgument`` naming what is
wrong and the limit.

* ``decode_wav``: a small RIFF parser (PCM 8/16/24/32-bit int, IEEE float 32/64-bit, plain or
  WAVE_FORMAT_EXTENSIBLE), channels mixed to mono, float32 in [-1, 1].
* ``pcm_to_tensor``: raw interleaved ``s16le`` / ``f32le`` samples.
* ``resample``: band-limited Kaiser-windowed sinc interpolation evaluated at each output instant
  (exact for any rational or irrational ratio), 8000..48000 Hz in.
* ``log_mel``: Whisper's features: 30 s window, STFT n_fft=400 hop=160 (Hann, centred, reflect
  padding), Slaney mel filterbank, log10 with a floor, 8 decades of dynamic range, (x + 4) / 4.
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache

import torch
from torch import Tensor

from m4d.errors import InvalidArgument

SAMPLE_RATE = 16000  # Whisper's input rate
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples per window
MIN_RATE, MAX_RATE = 8000, 48000
MAX_CHANNELS = 16

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_STREAMING_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)  # "unknown length" placeholders of piped writers


def check_rate(rate: int) -> None:
    if not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidArgument(f"sample rate {rate} Hz is not supported; use {MIN_RATE}..{MAX_RATE} Hz")


def _check_duration(frames: int, rate: int, max_seconds: float) -> None:
    if frames == 0:
        raise InvalidArgument("audio is empty (0 samples)")
    seconds = frames / rate
    if seconds > max_seconds:
        raise InvalidArgument(f"audio is {seconds:.2f} s long; the limit is {max_seconds:g} s")


def _finish(x: Tensor, channels: int) -> Tensor:
    # x: [N * C] interleaved float -> [N] float32 mono
    x = x.view(-1, channels).to(torch.float32).mean(dim=1) if channels > 1 else x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgument("audio contains NaN or infinite samples")
    return x.clamp_(-1.0, 1.0).contiguous()


def _samples(raw: bytes, fmt: int, bits: int) -> Tensor:
    """Little-endian sample bytes -> float tensor in [-1, 1] (not yet mono-mixed)."""
    buf = bytearray(raw)  # writable copy: torch.frombuffer warns on read-only buffers
    if fmt == _WAVE_FLOAT:
        dtype = {32: torch.float32, 64: torch.float64}[bits]
        return torch.frombuffer(buf, dtype=dtype).to(torch.float32)
    if bits == 8:  # unsigned, offset 128
        return (torch.frombuffer(buf, dtype=torch.uint8).to(torch.float32) - 128.0) / 128.0
    if bits == 16:
        return torch.frombuffer(buf, dtype=torch.int16).to(torch.float32) / 32768.0
    if bits == 24:
        b = torch.frombuffer(buf, dtype=torch.uint8).view(-1, 3).to(torch.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = torch.where(v >= 1 << 23, v - (1 << 24), v)
        return v.to(torch.float32) / float(1 << 23)
    return torch.frombuffer(buf, dtype=torch.int32).to(torch.float64).div(2.0**31).to(torch.float32)


def decode_wav(data: bytes, *, max_seconds: float) -> tuple[Tensor, int]:
    """A RIFF/WAVE file -> (mono float32 [N] in [-1, 1], sample rate)."""
    if not data:
        raise InvalidArgument("audio is empty (0 bytes)")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InvalidArgument("audio is not a WAV file (no RIFF/WAVE header)")
    fmt_chunk: bytes | None = None
    pcm: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"data":
            if fmt_chunk is None:
                raise InvalidArgument("WAV 'data' chunk comes before the 'fmt ' chunk")
            if size in _STREAMING_SIZES:
                size = len(data) - body
            if body + size > len(data):
                raise InvalidArgument(f"WAV is truncated: the data chunk declares {size} bytes, {len(data) - body} present")
            pcm = data[body : body + size]
            break
        if body + size > len(data):
            raise InvalidArgument(f"WAV is truncated inside the {cid!r} chunk")
        if cid == b"fmt ":
            fmt_chunk = data[body : body + size]
        pos = body + size + (size & 1)  # chunks are word-aligned
    if fmt_chunk is None or len(fmt_chunk) < 16:
        raise InvalidArgument("WAV has no valid 'fmt ' chunk")
    if pcm is None:
        raise InvalidArgument("WAV has no 'data' chunk")
    fmt, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt_chunk)
    if fmt == _WAVE_EXTENSIBLE:
        if len(fmt_chunk) < 26:
            raise InvalidArgument("WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is too short")
        fmt = struct.unpack_from("<H", fmt_chunk, 24)[0]  # first two bytes of the SubFormat GUID
    supported = {_WAVE_PCM: (8, 16, 24, 32), _WAVE_FLOAT: (32, 64)}
    if fmt not in supported or bits not in supported[fmt]:
        raise InvalidArgument(
            f"unsupported WAV encoding (format tag {fmt:#06x}, {bits} bits); use PCM 8/16/24/32-bit "
            "integer or 32/64-bit float"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(f"WAV has {channels} channels; 1..{MAX_CHANNELS} are supported")
    check_rate(rate)
    frame_bytes = channels * bits // 8
    if block_align != frame_bytes:
        raise InvalidArgument(f"WAV block align {block_align} does not match {channels} channels x {bits} bits")
    if len(pcm) % frame_bytes:
        raise InvalidArgument(f"WAV is truncated: {len(pcm)} data bytes is not a whole number of {frame_bytes}-byte frames")
    _check_duration(len(pcm) // frame_bytes, rate, max_seconds)
    return _finish(_samples(pcm, fmt, bits), channels), rate


def pcm_to_tensor(
    data: bytes, *, sample_rate: int, encoding: str, channels: int, max_seconds: float
) -> Tensor:
    """Raw interleaved little-endian PCM (``s16le`` or ``f32le``) -> mono float32 [N]."""
    encodings = {"s16le": (_WAVE_PCM, 16), "f32le": (_WAVE_FLOAT, 32)}
    if encoding not in encodings:
        raise InvalidArgument(f"unsupported PCM encoding {encoding!r}; use one of {sorted(encodings)}")
    if not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(f"channels must be 1..{MAX_CHANNELS}, got {channels}")
    check_rate(sample_rate)
    if not data:
        raise InvalidArgument("audio is empty (0 bytes)")
    fmt, bits = encodings[encoding]
    frame_bytes = channels * bits // 8
    if len(data) % frame_bytes:
        raise InvalidArgument(f"PCM is truncated: {len(data)} bytes is not a whole number of {frame_bytes}-byte frames")
    _check_duration(len(data) // frame_bytes, sample_rate, max_seconds)
    return _finish(_samples(data, fmt, bits), channels)


# ---------------------------------------------------------------------------------------------
# Resampling

_ZERO_CROSSINGS = 24  # half-width of the sinc in zero crossings of the cutoff
_ROLLOFF = 0.95  # cutoff as a fraction of the lower Nyquist frequency
_KAISER_BETA = 12.0
_I0_BETA = float(torch.special.i0(torch.tensor(_KAISER_BETA, dtype=torch.float64)))
_CHUNK = 1 << 15  # output samples per vectorised step of the direct path (bounds memory)
_MAX_POLYPHASE = 1 << 22  # phases x taps above which the direct path is used


def _kernel(dt: Tensor, cutoff: float, half: int) -> Tensor:
    """Kaiser-windowed ideal low-pass at ``cutoff`` (x input Nyquist), at distances ``dt``."""
    r = (dt / (half + 1)).clamp(-1.0, 1.0)
    window: Tensor = torch.special.i0(_KAISER_BETA * torch.sqrt(1.0 - r * r)) / _I0_BETA
    lowpass: Tensor = cutoff * torch.special.sinc(cutoff * dt)
    return lowpass * window


def resample(x: Tensor, src_rate: int, dst_rate: int) -> Tensor:
    """Band-limited resampling of mono float [N] from ``src_rate`` to ``dst_rate`` Hz.

    Output sample n sits at input time t = n * src / dst; it is the sum of the 2 * half input
    samples around t weighted by a Kaiser-windowed sinc whose cutoff is just under the lower
    Nyquist frequency. For rational ratios with few phases (every common rate) the weights are
    computed once per phase and applied as a strided conv1d (polyphase); otherwise each output
    instant gets its own weights (slower, same result).
    """
    check_rate(src_rate)
    check_rate(dst_rate)
    if x.dim() != 1:
        raise InvalidArgument(f"resample expects a mono waveform [N], got shape {list(x.shape)}")
    if src_rate == dst_rate or x.numel() == 0:
        return x.to(torch.float32)
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g  # output phases, input step per phase cycle
    n_in = x.numel()
    n_out = math.ceil(n_in * up / down)
    cutoff = _ROLLOFF * min(src_rate, dst_rate) / src_rate
    half = math.ceil(_ZERO_CROSSINGS / cutoff)  # half-width in input samples
    width = 2 * half + down + 1  # conv taps covering every phase's support
    if up * width <= _MAX_POLYPHASE:
        m = torch.arange(width, dtype=torch.float64)  # [W] input offset within a block (+half)
        phase = torch.arange(up, dtype=torch.float64)  # [up]
        frac = phase * down / up  # [up] output instant within its block
        rel = m[None, :] - half - torch.floor(frac)[:, None]  # [up, W] tap index around floor(t)
        weights = _kernel(m[None, :] - half - frac[:, None], cutoff, half)
        weights = torch.where((rel > -half) & (rel <= half), weights, 0.0).to(torch.float32)
        blocks = math.ceil(n_out / up)
        right = max(0, (blocks - 1) * down + width - (n_in + half))
        padded = torch.nn.functional.pad(x.to(torch.float32), (half, right))  # [half + N + right]
        y = torch.nn.functional.conv1d(padded[None, None], weights[:, None, :], stride=down)
        return y[0, :, :blocks].T.reshape(-1)[:n_out].contiguous()  # [up, Q] -> [Q * up] -> [n_out]
    taps = torch.arange(-half + 1, half + 1, dtype=torch.float64)  # [K]
    padded64 = torch.nn.functional.pad(x.to(torch.float64), (half, half + 1))
    out = torch.empty(n_out, dtype=torch.float64)
    for start in range(0, n_out, _CHUNK):
        t = torch.arange(start, min(start + _CHUNK, n_out), dtype=torch.float64) * (down / up)
        idx = torch.floor(t)[:, None] + taps[None, :]  # [M, K] input sample indices
        w = _kernel(idx - t[:, None], cutoff, half)
        out[start : start + len(t)] = (padded64[(idx + half).long()] * w).sum(dim=1)
    return out.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Whisper features


def _hz_to_mel(f: Tensor) -> Tensor:
    # Slaney: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
    lin = f / (200.0 / 3.0)
    log = 15.0 + torch.log(f.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: Tensor) -> Tensor:
    lin = m * (200.0 / 3.0)
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0))
    return torch.where(m >= 15.0, log, lin)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Slaney-scale, Slaney-normalised triangular filterbank: float32 [n_mels, n_fft // 2 + 1]."""
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # [F]
    mel_pts = torch.linspace(0.0, float(_hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2,
                             dtype=torch.float64)
    hz_pts = _mel_to_hz(mel_pts)  # [n_mels + 2]
    widths = hz_pts.diff()  # [n_mels + 1]
    ramps = hz_pts[:, None] - freqs[None, :]  # [n_mels + 2, F]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)  # [n_mels, F]
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]  # equal area per filter
    return weights.to(torch.float32)


def log_mel(audio_16k: Tensor, n_mels: int = 80) -> Tensor:
    """Mono 16 kHz float [N] -> Whisper log-mel features float32 [n_mels, 3000] (one 30 s window)."""
    if audio_16k.dim() != 1:
        raise InvalidArgument(f"log_mel expects a mono waveform [N], got shape {list(audio_16k.shape)}")
    x = audio_16k.to(torch.float32)
    if x.numel() > N_SAMPLES:
        x = x[:N_SAMPLES]
    x = torch.nn.functional.pad(x, (0, N_SAMPLES - x.numel()))  # [480000]
    window = torch.hann_window(N_FFT, dtype=torch.float32)
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # [201, 3001]
    power = spec[:, :-1].abs() ** 2  # [201, 3000]
    mel = mel_filters(n_mels) @ power  # [n_mels, 3000]
    logspec = torch.clamp(mel, min=1e-10).log10()
    logspec = torch.maximum(logspec, logspec.max() - 8.0)
    return (logspec + 4.0) / 4.0
