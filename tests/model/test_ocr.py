"""OCR on the real EasyOCR English weights: our CRAFT + CRNN + pipeline vs EasyOCR itself.

Covers: the importer (canonical float32 safetensors, weights-only loading), layer parity of both
networks against EasyOCR's modules in fp32, the map-decoding helpers against OpenCV/SciPy, real
OCR accuracy on text rendered in three DejaVu fonts, identical text to ``easyocr.Reader`` on the
same images, bf16 vs fp32, and batched recognition.

EasyOCR imports torchvision, whose PyPI wheel is a CUDA build whose ops cannot load beside
our CPU torch; tests/torchvision_compat.py (run by tests/conftest.py) makes it importable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from m4d.model.craft import Craft, connected_components, dilate_rect, load_craft, min_area_rect
from m4d.model.crnn import Crnn, load_crnn
from m4d.model.ocr import OcrConfig, OcrPipeline, TextBox, read_text, resize_bilinear
from safetensors import safe_open

from tests.rendering import FONTS, TEST_LINES, char_accuracy, encode, render_image


def _import_easyocr() -> Any:
    from tests.torchvision_compat import declare_missing_ops

    declare_missing_ops()  # tests/conftest.py did it already; harmless when run alone
    import easyocr

    return easyocr


def _models_dir() -> Path:
    import easyocr_en_models

    return Path(easyocr_en_models.model_dir())


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def component(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from m4d.builder.importers.easyocr import import_easyocr

    out = tmp_path_factory.mktemp("easyocr_component")
    return out, import_easyocr(_models_dir(), out)


@pytest.fixture(scope="module")
def pipeline(component: tuple[Path, dict[str, Any]]) -> OcrPipeline:
    out, comp = component
    return OcrPipeline.from_files(out / comp["detector"], out / comp["recognizer"], comp["config"], torch.float32)


@pytest.fixture(scope="module")
def pipeline_bf16(component: tuple[Path, dict[str, Any]]) -> OcrPipeline:
    out, comp = component
    return OcrPipeline.from_files(out / comp["detector"], out / comp["recognizer"], comp["config"], torch.bfloat16)


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, int, list[str], Any]]:
    return [(font, size, lines, render_image(lines, font, size)) for font, size in FONTS for lines in TEST_LINES]


@pytest.fixture(scope="module")
def ours(pipeline: OcrPipeline, samples: list[Any]) -> list[list[TextBox]]:
    return [pipeline.read(img) for *_, img in samples]


@pytest.fixture(scope="module")
def reader() -> Any:
    easyocr = _import_easyocr()
    return easyocr.Reader(["en"], gpu=False, model_storage_directory=str(_models_dir()),
                          download_enabled=False, verbose=False)


def _reference_craft() -> torch.nn.Module:
    _import_easyocr()
    from easyocr.craft import CRAFT
    from easyocr.detection import copyStateDict

    net = CRAFT()
    state = torch.load(_models_dir() / "craft_mlt_25k.pth", weights_only=True, map_location="cpu")
    net.load_state_dict(copyStateDict(state))
    return net.eval()


def _reference_crnn(num_class: int) -> torch.nn.Module:
    _import_easyocr()
    from easyocr.model.vgg_model import Model

    net = Model(input_channel=1, output_channel=256, hidden_size=256, num_class=num_class)
    state = torch.load(_models_dir() / "english_g2.pth", weights_only=True, map_location="cpu")
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Importer


def test_import_writes_float32_canonical_safetensors(component: tuple[Path, dict[str, Any]]) -> None:
    out, comp = component
    assert comp["kind"] == "easyocr"
    assert comp["detector"] == "detector.safetensors" and comp["recognizer"] == "recognizer.safetensors"
    cfg = OcrConfig.from_dict(json.loads(json.dumps(comp["config"])))  # survives the manifest's JSON
    easyocr = _import_easyocr()
    assert cfg.charset == easyocr.config.recognition_models["gen2"]["english_g2"]["characters"]
    assert cfg.image_height == easyocr.config.imgH
    assert len(comp["source"]["detector"]["sha256"]) == 64
    for name, module in (("detector", Craft), ("recognizer", Crnn)):
        with safe_open(str(out / comp[name]), framework="pt") as f:
            keys = set(f.keys())
            assert not any(k.startswith("module.") for k in keys)
            for k in keys:
                t = f.get_tensor(k)
                assert t.dtype in (torch.float32, torch.int64), (k, t.dtype)
        if module is Craft:
            assert keys == set(load_craft(out / comp[name]).state_dict())
        else:
            assert keys == set(load_crnn(out / comp[name], cfg.crnn()).state_dict())


def test_import_is_reproducible(component: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from m4d.builder.importers.easyocr import import_easyocr

    out, comp = component
    again = import_easyocr(_models_dir(), tmp_path)
    assert again == comp
    for name in ("detector", "recognizer"):
        assert (tmp_path / again[name]).read_bytes() == (out / comp[name]).read_bytes()


def test_import_refuses_missing_folder(tmp_path: Path) -> None:
    from m4d.builder.importers.easyocr import EasyOcrImportError, import_easyocr

    with pytest.raises(EasyOcrImportError, match=r"craft_mlt_25k\.pth is missing"):
        import_easyocr(tmp_path, tmp_path / "out")


class _NotATensor:
    pass


def test_import_refuses_pickled_code(tmp_path: Path) -> None:
    from m4d.builder.importers.easyocr import EasyOcrImportError, import_easyocr

    torch.save({"weight": _NotATensor()}, tmp_path / "craft_mlt_25k.pth")  # needs unpickling a class
    with pytest.raises(EasyOcrImportError, match="not a loadable weights-only checkpoint"):
        import_easyocr(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Layer parity (fp32)


def test_craft_matches_easyocr(pipeline: OcrPipeline, samples: list[Any]) -> None:
    ref = _reference_craft()
    torch.manual_seed(0)
    real, _ = pipeline._detector_input(np.asarray(samples[0][3]))
    for x in (torch.randn(1, 3, 96, 160), real):
        with torch.inference_mode():
            want, _ = ref(x)
            got = pipeline.detector(x)
        err = (want - got).abs().max().item()
        assert err <= 1e-4, f"CRAFT max abs error {err:.2e} on input {tuple(x.shape)}"


def test_crnn_matches_easyocr(pipeline: OcrPipeline) -> None:
    ref = _reference_crnn(pipeline.recognizer.config.num_classes)
    torch.manual_seed(0)
    x = torch.rand(3, 1, 64, 256) * 2 - 1
    with torch.inference_mode():
        want = ref(x, None)
        got = pipeline.recognizer(x)
    err = (want - got).abs().max().item()
    assert want.shape == got.shape and err <= 1e-4, f"CRNN max abs error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Decoding helpers vs OpenCV / SciPy


def test_connected_components_match_scipy() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((61, 87)) < density
        labels, comps = connected_components(mask)
        want, n = ndimage.label(mask)  # 4-connectivity by default; labels in raster order
        assert n == len(comps)
        np.testing.assert_array_equal(labels, want)
        for c in comps[:20]:
            ys, xs = np.nonzero(want == c.label)
            assert (c.x, c.y, c.w, c.h, c.area) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1, len(xs))


def test_resize_matches_opencv_bit_for_bit() -> None:
    import cv2

    rng = np.random.default_rng(2)
    for _ in range(20):
        h, w = int(rng.integers(5, 90)), int(rng.integers(5, 300))
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for nw, nh in ((int(64 * w / h), 64), (64, int(64 * h / w) + 1), (max(1, w // 3), max(1, h // 2))):
            want = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(resize_bilinear(img, nw, nh), want)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size = (int(w * 1.7), int(h * 1.3))
        np.testing.assert_array_equal(resize_bilinear(rgb, *size), cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR))


def test_dilate_and_min_area_rect_match_opencv() -> None:
    import cv2

    rng = np.random.default_rng(1)
    mask = rng.random((40, 50)) < 0.05
    for k in (1, 2, 3, 4, 5):
        want = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
        np.testing.assert_array_equal(dilate_rect(mask, k), want.astype(bool))
    for _ in range(30):
        pts = rng.integers(0, 200, size=(int(rng.integers(3, 60)), 2))
        ours = min_area_rect(pts)
        (_, (w, h), _) = cv2.minAreaRect(pts.astype(np.int32))
        area = np.linalg.norm(ours[0] - ours[1]) * np.linalg.norm(ours[1] - ours[2])
        assert area == pytest.approx(w * h, rel=1e-4, abs=1e-3)
        assert ours.sum(axis=1).argmin() == 0  # starts at the top-left-most corner
        # clockwise on screen (y down): the signed area (shoelace) is positive
        x, y = ours[:, 0], ours[:, 1]
        assert (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() >= 0


# ---------------------------------------------------------------------------------------------
# Real OCR


def test_reads_rendered_text_accurately(ours: list[list[TextBox]], samples: list[Any]) -> None:
    errors, total = 0.0, 0
    per_font: dict[str, list[float]] = {}
    for (font, size, lines, _), boxes in zip(samples, ours, strict=True):
        ref = "\n".join(lines)
        acc = char_accuracy(read_text(boxes), ref)
        per_font.setdefault(f"{font}@{size}", []).append(acc)
        errors += (1 - acc) * len(ref)
        total += len(ref)
        assert all(0.0 <= b.confidence <= 1.0 and len(b.box) == 4 for b in boxes)
    overall = 1 - errors / total
    print(f"\nOCR character accuracy {overall:.4f} over {total} chars;",
          {k: round(float(np.mean(v)), 4) for k, v in per_font.items()})
    assert overall >= 0.95


def test_same_text_as_easyocr(reader: Any, ours: list[list[TextBox]], samples: list[Any]) -> None:
    for (font, size, lines, img), boxes in zip(samples, ours, strict=True):
        ref = reader.readtext(encode(img))  # the PNG bytes, as an app would send them
        assert [b.text for b in boxes] == [r[1] for r in ref], (font, size, lines)
        for b, r in zip(boxes, ref, strict=True):  # same line boxes, to a pixel or two
            assert np.abs(np.array(b.box) - np.array(r[0], dtype=float)).max() <= 2


def test_confidences_match_unquantized_easyocr(ours: list[list[TextBox]], samples: list[Any]) -> None:
    # EasyOCR's CPU default quantizes its LSTM/linear layers to int8; without that it computes
    # what we compute, so the confidences agree too (where the boxes agree to the pixel).
    easyocr = _import_easyocr()
    fp32 = easyocr.Reader(["en"], gpu=False, model_storage_directory=str(_models_dir()),
                          download_enabled=False, verbose=False, quantize=False)
    compared = 0
    for (*_, img), boxes in list(zip(samples, ours, strict=True))[:6]:
        ref = fp32.readtext(encode(img))
        assert [b.text for b in boxes] == [r[1] for r in ref]
        for b, r in zip(boxes, ref, strict=True):
            if b.box == [tuple(int(v) for v in p) for p in r[0]]:
                assert b.confidence == pytest.approx(float(r[2]), abs=1e-3)
                compared += 1
    assert compared >= 8


def test_tilted_text_same_words_as_easyocr(reader: Any, pipeline: OcrPipeline) -> None:
    img = render_image(["Rotated text here", "second line 42"], "DejaVuSans.ttf", 32)
    img = img.rotate(6, expand=True, fillcolor="white")
    ref = reader.readtext(encode(img))
    got = pipeline.read(img)
    assert any(len({p[1] for p in b.box}) > 2 for b in got), "expected tilted (free) boxes"
    # EasyOCR lists horizontal boxes before tilted ones; we list everything in reading order.
    assert sorted(b.text for b in got) == sorted(r[1] for r in ref)
    assert read_text(got) == "Rotated text here\nsecond line 42"


def test_downscaled_canvas_same_as_easyocr(reader: Any, component: tuple[Path, dict[str, Any]], samples: list[Any]) -> None:
    # An image larger than canvas_size is scaled down before detection and boxes scaled back up.
    out, comp = component
    small = OcrPipeline.from_files(out / comp["detector"], out / comp["recognizer"],
                                   {**comp["config"], "canvas_size": 300}, torch.float32)
    img = samples[1][3]  # 434 px wide
    got = small.read(img)
    ref = reader.readtext(encode(img), canvas_size=300)
    assert [b.text for b in got] == [r[1] for r in ref]
    for b, r in zip(got, ref, strict=True):
        assert np.abs(np.array(b.box) - np.array(r[0], dtype=float)).max() <= 2


def test_bf16_reads_the_same_text(pipeline_bf16: OcrPipeline, ours: list[list[TextBox]], samples: list[Any]) -> None:
    # bf16 may split a line into boxes differently at a word gap; the text read must not change.
    for (*_, img), boxes in zip(samples, ours, strict=True):
        assert read_text(pipeline_bf16.read(img)) == read_text(boxes)


def test_batched_reading_equals_one_by_one(pipeline: OcrPipeline, ours: list[list[TextBox]], samples: list[Any]) -> None:
    imgs = [s[3] for s in samples[:4]]
    batched = pipeline.read_batch(imgs)
    for got, want in zip(batched, ours[:4], strict=True):
        assert [(b.text, b.box) for b in got] == [(b.text, b.box) for b in want]
        for g, w in zip(got, want, strict=True):
            assert g.confidence == pytest.approx(w.confidence, abs=1e-4)
    # One padded batch for all crops (the daemon's common-width mode) reads the same words.
    img = samples[0][3]
    crops = pipeline.crops(np.asarray(img.convert("L")), pipeline.detect(np.asarray(img)))
    assert len(crops) >= 2 and len({c.pad_width for c in crops}) >= 1
    common = pipeline.recognize_crops(crops, common_width=True)
    assert [t for t, _ in common] == [b.text for b in ours[0]]


def test_request_bytes_to_text(pipeline: OcrPipeline) -> None:
    # The daemon's path: PNG/JPEG bytes -> decode_image -> read -> read_text.
    from m4d.prepare.images import decode_image

    from tests.rendering import render_lines

    lines = ["Hello world", "Invoice 2024-07"]
    for fmt in ("PNG", "JPEG"):
        img = decode_image(render_lines(lines, "DejaVuSans.ttf", 32, fmt=fmt), max_bytes=1 << 20, max_pixels=1 << 22)
        assert char_accuracy(read_text(pipeline.read(img)), "\n".join(lines)) >= 0.95


def test_blank_and_tiny_images_read_nothing(pipeline: OcrPipeline) -> None:
    from PIL import Image

    assert pipeline.read(Image.new("RGB", (320, 120), "white")) == []
    assert pipeline.read(Image.new("RGB", (1, 1), "white")) == []
    assert read_text([]) == ""
