"""m4ctl against a FAKE m4d: output formats, exit codes, streaming, cancellation, no model.

The fake servicers and the `fake`/`fake_m4d` fixtures live in test_client_fake.py (see its
docstring). Streaming, errors, exit codes, signals and pipes are tested on the real command
(`python -m m4ctl` in a subprocess); output formatting is tested in-process through `main()`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import test_client_fake as fakes
from google.protobuf import json_format
from m4.inference.v1 import inference_pb2 as pb
from m4ctl.__main__ import main
from test_client_fake import FakeM4d

from tests.conftest import default_sigint

# The fake daemon's fixtures, shared with test_client_fake.py (pytest imports test modules by
# their basename, tests/cli being on sys.path).
fake_m4d = fakes.fake_m4d
fake = fakes.fake

SLOW = "slow " + " ".join(f"w{i}" for i in range(40))  # ~6 s if nobody cancels


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M4_")}
    return {**env, **extra}


def m4ctl(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real command and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "m4ctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=60,
    )


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "m4ctl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        preexec_fn=default_sigint,
    )


def read_until(proc: subprocess.Popen[bytes], needle: bytes) -> bytes:
    """Read stdout as it arrives until `needle` shows up."""
    assert proc.stdout is not None
    seen = b""
    while needle not in seen:
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"stdout closed before {needle!r}; got {seen!r}"
        seen += chunk
    return seen


# ------------------------------------------------------------------ the real command


def test_generate_streams_before_the_call_ends(fake: FakeM4d) -> None:
    proc = spawn("--address", fake.app_address, "generate", "slow a b c d e f")
    first = read_until(proc, b"slow")
    assert proc.poll() is None, "text must be flushed per chunk, not at exit"
    rest, stderr = proc.communicate(timeout=30)
    assert (first + rest).decode() == "slow a b c d e f\n"
    assert proc.returncode == 0 and stderr == b""


def test_generate_json_lines_parse(fake: FakeM4d) -> None:
    r = m4ctl("--address", fake.app_address, "generate", "--json", "one two")
    assert r.returncode == 0, r.stderr
    messages = [json_format.Parse(line, pb.GenerateResponse()) for line in r.stdout.splitlines()]
    assert [m.text for m in messages] == ["one", " two", ""]
    assert json.loads(r.stdout.splitlines()[-1])["finishReason"] == "FINISH_REASON_EOS"
    assert messages[0].model.image_name == "fake-image"


def test_rpc_error_is_one_line_exit_1(fake: FakeM4d) -> None:
    r = m4ctl("--address", fake.app_address, "generate", "--max-tokens", "-1", "hi")
    assert r.returncode == 1
    assert r.stderr == "m4ctl: error: INVALID_ARGUMENT: max_tokens must be > 0 (got -1)\n"
    assert r.stdout == ""


def test_usage_error_is_one_line_exit_2() -> None:
    r = m4ctl("generate")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("m4ctl: error: ")
    r = m4ctl("--timeout", "-3", "tasks")
    assert r.returncode == 2 and "--timeout" in r.stderr


def test_timeout_is_deadline_exceeded_line(fake: FakeM4d) -> None:
    r = m4ctl("--address", fake.app_address, "--timeout", "0.3", "generate", SLOW)
    assert r.returncode == 1
    assert r.stderr.startswith("m4ctl: error: DEADLINE_EXCEEDED: ") and r.stderr.count("\n") == 1
    assert fake.log.cancel_event.wait(5)


def test_ctrl_c_cancels_the_call_and_exits_130(fake: FakeM4d) -> None:
    proc = spawn("--address", fake.app_address, "generate", SLOW)
    read_until(proc, b"slow")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"Traceback" not in stderr
    assert fake.log.cancel_event.wait(5) and fake.log.cancelled == ["Generate"]


def test_broken_pipe_exits_quietly(fake: FakeM4d, tmp_path: Path) -> None:
    errors = tmp_path / "stderr"
    script = (
        f'"{sys.executable}" -m m4ctl --address {fake.app_address} generate "{SLOW}"'
        f' 2>"{errors}" | head -c 4; echo "${{PIPESTATUS[0]}}"'
    )
    r = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert r.stdout == "slow141\n"
    assert errors.read_text() == ""
    assert fake.log.cancel_event.wait(5)


def test_env_vars_and_plain_paths(fake: FakeM4d) -> None:
    env = _env(M4_ADDRESS=str(fake.app_path), M4_ADMIN_ADDRESS=str(fake.admin_path))
    r = m4ctl("generate", "from the env", env=env)
    assert (r.returncode, r.stdout) == (0, "from the env\n"), r.stderr
    r = m4ctl("status", "-q", env=env)
    assert r.returncode == 0 and "READY" in r.stdout, r.stderr
    r = m4ctl("--address", "/nonexistent/m4.sock", "tasks", env=env)
    assert r.returncode == 1 and r.stderr.startswith("m4ctl: error: UNAVAILABLE: ")


def test_chat_reads_turns_into_a_session_and_deletes_it_at_exit(fake: FakeM4d) -> None:
    r = m4ctl(
        "--address",
        fake.app_address,
        "chat",
        "--system",
        "be brief",
        stdin="hello there\n\nsecond turn\n/exit\nnever sent\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello there\nsecond turn\n"  # no "> " prompt: stdin is not a TTY
    assert fake.log.last("CreateSession").instructions == "be brief"
    turns = [r for name, r in fake.log.requests if name == "SessionTurn"]
    assert [t.user_message for t in turns] == ["hello there", "second turn"]  # only the new
    session_id = turns[0].session_id
    assert fake.log.last("DeleteSession").session_id == session_id
    r = m4ctl("--address", fake.app_address, "chat", "--session", session_id, "-m", "x")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_chat_keep_prints_the_session_and_resumes_it(fake: FakeM4d) -> None:
    r = m4ctl("--address", fake.app_address, "chat", "--keep", "-m", "first")
    assert r.returncode == 0, r.stderr
    session_id = r.stderr.split("session: ")[1].split()[0]
    r = m4ctl("--address", fake.app_address, "chat", "--session", session_id, "--stats",
              "-m", "second one")
    assert (r.returncode, r.stdout) == (0, "second one\n"), r.stderr
    assert f"context: 6 of {fakes.FAKE_WINDOW} tokens" in r.stderr  # both turns
    assert fake.log.last("DeleteSession").session_id == session_id


# ------------------------------------------------------------------ in-process formatting


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_single_message_and_stats(fake: FakeM4d, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        capsys, "--address", fake.app_address, "chat", "-m", "one shot", "--stats", "--seed", "3"
    )
    assert (code, out) == (0, "one shot\n")
    assert "tokens: 2 prompt + 2 completion = 4; finish: eos" in err
    assert "model: fake-image 0.0.1" in err
    assert fake.log.last("SessionTurn").sampling.seed == 3


def test_app_name_flag(fake: FakeM4d, capsys: pytest.CaptureFixture[str]) -> None:
    run_main(capsys, "--address", fake.app_address, "embed", "x")
    run_main(capsys, "--address", fake.app_address, "embed", "--app-name", "my-app", "x")
    assert fake.log.app_names == ["m4ctl", "my-app"]


def test_embed_human_and_json(fake: FakeM4d, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--address", fake.app_address, "embed", "hi", "hello world")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("0  4d  norm 2.5000  [2.0000, 1.0000, 1.0000, 0.5000]")
    assert lines[1].endswith("'hello world'")
    code, out, _ = run_main(capsys, "--address", fake.app_address, "--json", "embed", "hi")
    assert json.loads(out)["embeddings"][0]["values"] == [2.0, 1.0, 1.0, 0.5]


def test_classify_and_predict_next(fake: FakeM4d, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(
        capsys,
        "--address",
        fake.app_address,
        "classify",
        "--labels",
        "dog,cat",
        "-l",
        "mat",
        "the cat sat on the cat mat",
    )
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["cat", "mat", "dog"]
    assert out.splitlines()[0].split()[1] == "0.5000"
    code, out, _ = run_main(capsys, "--address", fake.app_address, "predict-next", "hel", "-n", "2")
    assert out.splitlines() == ["hel0  0.5000", "hel1  0.2500"]
    code, out, err = run_main(
        capsys, "--address", fake.app_address, "predict-next", "x", "-n", "99"
    )
    assert (code, err) == (
        1,
        "m4ctl: error: INVALID_ARGUMENT: num_predictions must be in 0..20 (got 99)\n",
    )


def test_tasks_table(fake: FakeM4d, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--address", fake.app_address, "tasks")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == [
        "ID",
        "M4",
        "PATH",
        "MODULES",
        "ADAPTER",
        "WINDOW",
        "INPUTS",
        "→",
        "OUTPUTS",
    ]
    assert lines[2].split()[:6] == ["predict-next", "T1", "2", "backbone", "-", str(fakes.FAKE_WINDOW)]
    assert lines[3].split()[5] == "-"  # a task without a context window
    assert "text:text → words:texts?" in lines[2]
    code, out, _ = run_main(capsys, "--address", fake.app_address, "tasks", "-q")
    assert out.split() == ["generate", "predict-next", "echo"]


def test_run_with_inputs_and_files(
    fake: FakeM4d, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text_file = tmp_path / "in.txt"
    text_file.write_text("from a file")
    photo = tmp_path / "p.png"
    photo.write_bytes(b"12345")
    code, out, err = run_main(
        capsys,
        "--address",
        fake.app_address,
        "run",
        "echo",
        "--input",
        f"text=@{text_file}",
        "-i",
        f"photo=@{photo}",
        "-i",
        "labels=a,b",
    )
    assert code == 0, err
    assert out.splitlines()[0] == "from a file photo 5 bytes"
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["a", "b"]
    inputs = {i.name: i for i in fake.log.last("Run").inputs}
    assert inputs["photo"].image == b"12345" and list(inputs["labels"].texts.values) == ["a", "b"]
    code, _, err = run_main(capsys, "--address", fake.app_address, "run", "echo", "-i", "novalue")
    assert code == 2 and err.startswith("m4ctl: error: --input expects NAME=VALUE")
    code, _, err = run_main(capsys, "--address", fake.app_address, "run", "nope", "-i", "text=x")
    assert (code, err) == (1, "m4ctl: error: INVALID_ARGUMENT: unknown task 'nope'\n")


def test_status_human(fake: FakeM4d, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--admin-address", fake.admin_address, "status")
    assert code == 0
    assert "image:     fake-image 0.0.1" in out
    assert "9.9.9, READY, up 1h 02m 05s" in out and "1.5 GiB RSS" in out
    assert "2 in flight, 1,234 total, 5 cancelled (2 stalled), 1 rejected" in out
    assert "batch: 7 running (1 paused for their readers)" in out
    assert "backbone  llama  135.0M params  int4/float32  cpu" in out
    assert ("per-uid caps: 32 in flight, 16 queued, 12 KV slots, 8,192 tokens in flight"
            in out)
    header = next(line for line in out.splitlines() if line.strip().startswith("uid "))
    alice = next(line for line in out.splitlines() if line.strip().startswith("1000 "))
    assert header.split()[-6:] == ["queued", "slots", "tokens", "held", "preempted", "stalled"]
    assert alice.split()[-6:] == ["20", "8", "12", "5,000", "3", "1"]
    assert fake.log.requests[0][0] == "Status"


def test_every_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (
        [],
        ["generate"],
        ["chat"],
        ["embed"],
        ["classify"],
        ["predict-next"],
        ["tasks"],
        ["run"],
        ["status"],
        ["image"],
        ["image", "build"],
        ["image", "verify"],
    ):
        assert main([*cmd, "--help"]) == 0
        help_text = capsys.readouterr().out
        assert help_text.startswith(f"usage: {' '.join(['m4ctl', *cmd])}")
        assert "--address ADDR" in help_text  # global flags are accepted everywhere


# ------------------------------------------------------------------ image commands


@pytest.fixture
def fake_m4image(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """FAKE m4d.builder.build and m4image.verify modules: record calls, report progress,
    fail on request."""
    import m4d.builder
    import m4image

    calls = types.SimpleNamespace(build=[], verify=[])
    verify_mod = types.ModuleType("m4image.verify")
    build_mod = types.ModuleType("m4d.builder.build")

    class ImageError(Exception):
        pass

    class SignatureError(ImageError):
        pass

    def image(path: Path) -> Any:
        manifest = types.SimpleNamespace(name="m4-default", version="1.2.3")
        return types.SimpleNamespace(path=path, manifest=manifest, digest="ab" * 32,
                                     signed_by=None)

    def build_default_image(output: Path, *, progress: Any = None, force: bool = False) -> Any:
        calls.build.append((output, force))
        for stage, done, total in (("fetch", 0, 4), ("fetch", 4, 4), ("convert", 1, 1)):
            progress(stage, done, total)
        return image(output)

    def verify_image(directory: Path, *, progress: Any = None, **checks: Any) -> Any:
        calls.verify.append(directory)
        if directory.name == "bad":
            raise SignatureError(f"{directory}/manifest.sig does not verify; re-sign the image")
        return image(directory)

    verify_mod.ImageError = ImageError  # type: ignore[attr-defined]
    verify_mod.verify_image = verify_image  # type: ignore[attr-defined]
    build_mod.build_default_image = build_default_image  # type: ignore[attr-defined]
    for package, mod in ((m4d.builder, build_mod), (m4image, verify_mod)):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setattr(package, mod.__name__.rpartition(".")[2], mod, raising=False)
    return calls


def test_image_build_and_verify(
    fake_m4image: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_main(
        capsys, "image", "build", "--default", "--output", str(tmp_path / "img"), "--force"
    )
    assert code == 0
    assert fake_m4image.build == [(tmp_path / "img", True)]
    assert err.splitlines() == ["fetch", "convert: 1/1 (100%)"]  # a line per stage off a TTY
    assert out.startswith(f"built m4-default 1.2.3 at {tmp_path / 'img'}\n")
    code, out, _ = run_main(capsys, "--json", "image", "verify", "--unsigned",
                            str(tmp_path / "img"))
    assert json.loads(out) == {
        "path": str(tmp_path / "img"),
        "name": "m4-default",
        "version": "1.2.3",
        "digest": "ab" * 32,
        "signed_by": None,
    }
    code, out, err = run_main(capsys, "image", "verify", "--unsigned", str(tmp_path / "bad"))
    assert (code, out) == (1, "")
    assert (
        err == f"m4ctl: error: {tmp_path / 'bad'}/manifest.sig does not verify; re-sign the image\n"
    )
    code, _, err = run_main(capsys, "image", "build", "--output", "x")
    assert code == 2 and "say what to build" in err  # --default or some component is required


def test_real_verify_of_a_missing_dir_is_one_line(tmp_path: Path) -> None:
    r = m4ctl("image", "verify", str(tmp_path / "missing"))
    assert r.returncode == 1 and r.stderr.startswith("m4ctl: error: ") and r.stderr.count("\n") == 1
