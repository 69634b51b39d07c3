"""A Q4_K_M GGUF through the whole product: `m4ctl image build --gguf` (no text encoder),
a real m4d serving it in its stored blocks (w4a8, m4's kernels), a chat Generate answered,
and `m4ctl status` / the Status RPC showing the backbone's format and kernel variant.

The file is SmolLM2 widened to 768 and re-encoded as llama.cpp's Q4_K_M
(``tests.model.q4_k_m_gguf``), so that every linear is a k-quant: q/k in Q4_K beside v in
Q6_K (one mixed linear), Q4_K/Q6_K elsewhere and a Q6_K head.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from m4client import AdminClient, Client
from m4d.model import kernels
from m4image.verify import verify_image

from tests.conftest import DaemonProcess, start_daemon
from tests.integration.imagetools import m4ctl
from tests.model.conftest import smollm2_gguf_path
from tests.model.q4_k_m_gguf import write_q4_k_m

CAPITAL = "What is the capital of France?"


@pytest.fixture(scope="module")
def q4_k_m_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    folder = tmp_path_factory.mktemp("q4_k_m_image")
    gguf = folder / "SmolLM2-135M-Instruct-w768.Q4_K_M.gguf"
    start = time.perf_counter()
    write_q4_k_m(smollm2_gguf_path(), gguf, width=768)
    written = time.perf_counter()
    out = m4ctl("-q", "image", "build", "--gguf", str(gguf), "--name", "m4-q4-k-m",
                "--output", str(folder / "image"))
    assert out.returncode == 0, out.stderr
    built = time.perf_counter()
    daemon = start_daemon(folder / "image", folder / "run")
    print(f"GGUF written in {written - start:.1f} s, image built in {built - written:.1f} s, "
          f"daemon ready in {time.perf_counter() - built:.1f} s")
    yield daemon, folder / "image"
    daemon.stop()


def test_image_holds_the_q4_k_m_backbone(q4_k_m_daemon: tuple[DaemonProcess, Path]) -> None:
    m = verify_image(q4_k_m_daemon[1]).manifest
    backbone = m.components["backbone"]
    assert set(m.components) == {"backbone"}
    assert backbone["quantization"] == "mixed"
    assert backbone["source"]["file"] == "SmolLM2-135M-Instruct-w768.Q4_K_M.gguf"
    assert backbone["config"]["dim"] == 768
    assert {c["task"] for c in m.self_test} == {"chat", "complete"}


def test_daemon_answers_in_the_stored_blocks(q4_k_m_daemon: tuple[DaemonProcess, Path]) -> None:
    daemon, _ = q4_k_m_daemon
    with Client(daemon.address, timeout=120) as m4:
        result = m4.chat_complete([{"role": "user", "content": CAPITAL}], temperature=0.0,
                                  max_tokens=32)
    print(f"m4d on the Q4_K_M image: {result.text!r}")
    assert "Paris" in result.text
    with AdminClient(daemon.admin_address, timeout=30) as admin:
        status = admin.status()
    backbone = next(c for c in status.components if c.name == "backbone")
    assert (backbone.kind, backbone.weight_format, backbone.compute_dtype) == (
        "llama", "w4a8", "float32")
    assert backbone.kernels in kernels.runnable_variants(), backbone.kernels
    shown = m4ctl("status", env=daemon.env())
    assert shown.returncode == 0, shown.stderr
    line = next(row for row in shown.stdout.splitlines() if row.strip().startswith("backbone"))
    print(f"m4ctl status: {line.strip()}")
    assert f"w4a8/float32 ({backbone.kernels})" in line, shown.stdout
