"""Images built from Hugging Face checkpoints, served by the real daemon: CLIP's path-3 heads
(zero-shot classification, image-text retrieval, image embedding), LLaVA's path 1 (image +
question -> streamed answer) and a Whisper checkpoint's transcripts, each against
transformers on the same inputs.

No CLIP-style weights ship on PyPI, so the checkpoints are small random ones the tests make
(see the closing note of the multimodal issue); the daemon must reproduce transformers'
numbers exactly in float32, through the image builder, the API and the scheduler.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from m4client import Client, Image
from PIL import Image as PILImage
from PIL import ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from tests.conftest import DaemonProcess, start_daemon

SIZE = 28
FP32 = {"M4D_WEIGHT_FORMAT": "float32", "M4D_COMPUTE_DTYPE": "float32"}
WORDS = ["<pad>", "<s>", "</s>", "a", "photo", "of", "red", "blue", "circle", "square", "cat",
         "dog", "on", "the", "table", "small", "green"]


def _png(colour: str, shape: str, size: tuple[int, int] = (60, 44)) -> bytes:
    img = PILImage.new("RGB", size, "white")
    box = [size[0] // 5, size[1] // 5, 4 * size[0] // 5, 4 * size[1] // 5]
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(folder: Path, png: bytes) -> torch.Tensor:
    """The reference's own preprocessing (transformers' CLIP image processor, PIL backend)."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(folder)
    image = PILImage.open(io.BytesIO(png)).convert("RGB")
    return processor(images=image, return_tensors="pt")["pixel_values"]


def _preprocessor(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": SIZE, "width": SIZE}, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "image_mean": [0.48, 0.46, 0.41],
        "image_std": [0.27, 0.26, 0.28], "resample": 3, "size": {"shortest_edge": SIZE}}))


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():  # random, non-trivial norms and class token
        for name, p in model.named_parameters():
            if "norm" in name or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.2)


@pytest.fixture(scope="module")
def clip_daemon(tmp_path_factory: pytest.TempPathFactory) -> tuple[DaemonProcess, Path, object]:
    import transformers
    from m4d.builder.build import build_image

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("clip")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         eos_token_id=2, bos_token_id=1, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, image_size=SIZE, patch_size=7),
        projection_dim=24, logit_scale_init_value=2.6592)
    ref = transformers.CLIPModel(cfg).eval()
    _perturb(ref)
    ref.save_pretrained(folder)
    _preprocessor(folder)
    image = build_image(tmp_path_factory.mktemp("img") / "clip", clip=folder, name="m4-clip")
    daemon = start_daemon(image.path, tmp_path_factory.mktemp("m4d-clip"), env=FP32)
    yield daemon, folder, (ref, tok)
    daemon.stop()


def _reference_scores(folder: Path, ref_tok: tuple[object, Tokenizer], png: bytes,
                      texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref, tok = ref_tok
    ids = [tok.encode(t).ids for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        out = ref(input_ids=input_ids, pixel_values=_pixels(folder, png),  # type: ignore[operator]
                  attention_mask=(input_ids != 0).long())
    return out.logits_per_image[0], out.image_embeds[0], out.text_embeds


def test_zero_shot_classification_matches_transformers(clip_daemon) -> None:
    daemon, folder, ref = clip_daemon
    png = _png("red", "circle")
    labels = ["red circle", "blue square", "cat", "dog on the table"]
    with Client(daemon.address, timeout=120) as m4:
        tasks = {t.id: t for t in m4.list_tasks()}
        assert tasks["image-classify"].m4_id == "T22" and tasks["image-classify"].path == 3
        result = m4.run_complete("image-classify", {"image": Image(png), "labels": labels})
    logits, _, _ = _reference_scores(folder, ref, png, [f"a photo of a {lbl}" for lbl in labels])
    expected = dict(zip(labels, torch.softmax(logits, dim=0).tolist(), strict=True))
    got = {ls.label: ls.score for ls in result.labels}
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - expected[k]) for k in got) <= 1e-4
    assert [ls.label for ls in result.labels] == sorted(expected, key=lambda k: -expected[k])


def test_retrieval_and_embedding_match_transformers(clip_daemon) -> None:
    daemon, folder, ref = clip_daemon
    png = _png("blue", "square", (40, 70))
    texts = ["a blue square", "a small green circle", "the cat on the table", "a red photo"]
    with Client(daemon.address, timeout=120) as m4:
        ranked = m4.run_complete("image-text-retrieval", {"image": Image(png), "texts": texts})
        embedded = m4.run_complete("image-embed", {"image": Image(png)})
    _, image_embed, text_embeds = _reference_scores(folder, ref, png, texts)
    cosines = (text_embeds @ image_embed).tolist()
    assert [ls.label for ls in ranked.labels] == [texts[i] for i in
                                                  sorted(range(4), key=lambda i: -cosines[i])]
    assert max(abs(ls.raw_score - cosines[texts.index(ls.label)]) for ls in ranked.labels) <= 1e-4
    (vector,) = embedded.embeddings
    assert (torch.tensor(vector) - image_embed).abs().max().item() <= 1e-4


def test_llava_answers_about_an_image_as_transformers_does(tmp_path: Path) -> None:
    import transformers
    from m4d.builder.build import build_image

    torch.manual_seed(5)
    vocab = 120
    image_token = vocab - 1
    folder = tmp_path / "llava"
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=SIZE, patch_size=7),
        text_config=transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2),
        image_token_index=image_token, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    _perturb(ref)
    ref.save_pretrained(folder)
    words = {f"w{i}": i for i in range(vocab)}
    words["<image>"] = image_token
    del words[f"w{image_token}"]
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    _preprocessor(folder)
    template = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))

    image = build_image(tmp_path / "image", vlm=folder, name="m4-llava")
    daemon = start_daemon(image.path, tmp_path / "run", env=FP32)
    try:
        png = _png("green", "circle")
        question = "w5 w17 w33"
        with Client(daemon.address, timeout=120) as m4:
            tasks = {t.id: t for t in m4.list_tasks()}
            assert tasks["vqa"].m4_id == "T33" and tasks["vqa"].path == 1
            assert list(tasks["vqa"].modules) == ["vision_encoder", "projector", "backbone"]
            chunks = list(m4.ask(question, image=Image(png), task="vqa", temperature=0,
                                 max_tokens=8))
    finally:
        daemon.stop()
    got = [t for c in chunks for t in c.raw.token_ids]
    # the reference: the processor's expansion of <image> into 16 positions, greedy
    n = (SIZE // 7) ** 2
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    before, after = prompt.split("<image>")
    ids = tok.encode(before).ids + [image_token] * n + tok.encode(after).ids
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=_pixels(folder, png),
                           max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    if 2 in expected:
        expected = expected[:expected.index(2)]
    print(f"vqa through m4d: {got}; transformers: {expected}")
    assert got == expected and len(got) >= 1
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_hf_whisper_image_transcribes_as_transformers_does(tmp_path: Path) -> None:
    import shutil

    import transformers
    from m4client import Audio
    from m4d.builder.build import SPEECH_FOLDER, SPEECH_PACKAGE, build_image, package_dir
    from m4d.prepare.audio import decode_wav, log_mel

    from tests import speech

    torch.manual_seed(7)
    cfg = transformers.WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448)
    ref = transformers.WhisperForConditionalGeneration(cfg).eval()
    folder = tmp_path / "whisper"
    ref.save_pretrained(folder)
    # the real tiny.en vocabulary, so ids decode to text
    shutil.copy(package_dir(SPEECH_PACKAGE) / SPEECH_FOLDER / "tokenizer.json", folder)
    image = build_image(tmp_path / "image", speech=folder, name="m4-whisper")
    daemon = start_daemon(image.path, tmp_path / "run", env=FP32)
    wav = speech.synthesize("Water boils at one hundred degrees Celsius.")
    try:
        with Client(daemon.address, timeout=120) as m4:
            got = m4.transcribe(Audio(wav)).text
    finally:
        daemon.stop()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = [tok.token_to_id("<|startoftranscript|>"), tok.token_to_id("<|notimestamps|>")]
    eot = tok.token_to_id("<|endoftext|>")
    audio, rate = decode_wav(wav, max_seconds=30)
    from m4d.prepare.audio import resample

    mel = log_mel(resample(audio, rate, 16_000))[None]  # [1, 80, 3000]
    ids = list(prompt)
    suppress = list(ref.generation_config.suppress_tokens or [])
    begin = list(ref.generation_config.begin_suppress_tokens or [])
    with torch.no_grad():
        enc = ref.model.encoder(mel)
        for step in range(224):  # greedy as the daemon (at most 224 tokens), full forwards
            logits = ref(encoder_outputs=enc, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            logits[suppress] = -torch.inf
            if step == 0:
                logits[begin] = -torch.inf
            nxt = int(logits.argmax())
            if nxt == eot:
                break
            ids.append(nxt)
    expected = tok.decode(ids[len(prompt):], skip_special_tokens=True).strip()
    print(f"random Whisper through m4d: {got!r}; transformers: {expected!r}")
    assert got == expected


def test_sensor_windows_reach_a_classifier_head(tmp_path: Path) -> None:
    """An IMU window (a float32 tensor [T, 6]) through a head built into an image: the same
    probabilities as the head's arithmetic done here by hand, and bad tensors refused."""
    import grpc
    import numpy as np
    from m4.inference.v1 import inference_pb2 as pb
    from m4.inference.v1 import inference_pb2_grpc as pb_grpc
    from m4d.builder.build import build_image
    from safetensors.torch import save_file

    torch.manual_seed(11)
    labels = ["still", "walking", "shaking"]
    folder = tmp_path / "head"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"channels": 6, "labels": labels, "hidden": [8], "min_steps": 2}))
    w0, b0, w1, b1 = torch.randn(8, 24), torch.randn(8), torch.randn(3, 8), torch.randn(3)
    save_file({"layers.0.weight": w0, "layers.0.bias": b0, "layers.1.weight": w1,
               "layers.1.bias": b1}, str(folder / "model.safetensors"))
    image = build_image(tmp_path / "image", sensor=folder, name="m4-sensor")
    daemon = start_daemon(image.path, tmp_path / "run")
    rng = np.random.default_rng(0)
    window = (rng.standard_normal((50, 6)) * [0.1, 0.1, 0.1, 2, 2, 2]).astype(np.float32)
    try:
        with Client(daemon.address, timeout=60) as m4:
            task = {t.id: t for t in m4.list_tasks()}["sensor-classify"]
            assert [(s.name, s.kind, s.dtype, list(s.shape)) for s in task.inputs] == [
                ("window", "tensor", "float32", [-1, 6])]
            result = m4.run_complete("sensor-classify", {"window": window})
        with grpc.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            bad = {
                "dtype": (pb.Tensor(dtype="float64", shape=[50, 6], data=window.astype(
                    np.float64).tobytes()), "must be float32"),
                "channels": (pb.Tensor(dtype="float32", shape=[50, 5], data=window[:, :5].tobytes()),
                             "[-1, 6]"),
                "bytes": (pb.Tensor(dtype="float32", shape=[50, 6], data=window.tobytes()[:-4]),
                          "needs 1200 bytes"),
                "nan": (pb.Tensor(dtype="float32", shape=[2, 6],
                                  data=np.full((2, 6), np.nan, np.float32).tobytes()), "NaN"),
                "too short": (pb.Tensor(dtype="float32", shape=[1, 6], data=window[:1].tobytes()),
                              "T >= 2"),
            }
            for case, (tensor, needle) in bad.items():
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Run(pb.RunRequest(task="sensor-classify", inputs=[
                        pb.Input(name="window", tensor=tensor)]), timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
                assert needle in err.value.details(), (case, err.value.details())
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Run(pb.RunRequest(task="sensor-classify", inputs=[
                    pb.Input(name="window", image=b"\x89PNG")]), timeout=30))
            assert "must be tensor, not image" in err.value.details()
    finally:
        daemon.stop()
    x = torch.from_numpy(window)
    feats = torch.cat([x.mean(0), x.std(0, unbiased=False), x.min(0).values, x.max(0).values])
    expected = torch.softmax(w1 @ torch.relu(w0 @ feats + b0) + b1, dim=0)
    got = {ls.label: ls.score for ls in result.labels}
    assert max(abs(got[k] - float(p)) for k, p in zip(labels, expected, strict=True)) <= 1e-5
    assert [ls.label for ls in result.labels] == [labels[i] for i in expected.argsort(descending=True)]
