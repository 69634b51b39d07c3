"""Every bad input gets its status and a message a developer understands, and the daemon
keeps serving; a corrupted image stops start-up with an error naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc

from tests.conftest import start_daemon

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def chat(text: str) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role="user", content=text)])


CASES = [
    ("unknown task", "Generate",
     pb.GenerateRequest(task="summarise-everything", prompt="hi"), INVALID, "unknown task"),
    ("task on the wrong rpc", "Generate",
     pb.GenerateRequest(task="embed", prompt="hi"), INVALID, "served by Embed"),
    ("no input", "Generate", pb.GenerateRequest(), INVALID, "set either prompt or chat"),
    ("empty prompt", "Generate", pb.GenerateRequest(prompt="  "), INVALID, "prompt is empty"),
    ("empty chat", "Generate", pb.GenerateRequest(chat=pb.Chat()), INVALID, "no messages"),
    ("bad role", "Generate", pb.GenerateRequest(chat=pb.Chat(messages=[
        pb.ChatMessage(role="robot", content="hi")])), INVALID, "role"),
    ("max_tokens zero", "Generate", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(max_tokens=0)), INVALID, "max_tokens must be > 0"),
    ("max_tokens negative", "Generate", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(max_tokens=-5)), INVALID, "max_tokens must be > 0"),
    ("max_tokens beyond context", "Generate", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(max_tokens=10_000_000)), INVALID, "does not fit"),
    ("negative temperature", "Generate", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(temperature=-0.1)), INVALID, "temperature"),
    ("top_p zero", "Generate", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(top_p=0.0)), INVALID, "top_p must be in (0, 1]"),
    ("top_p above one", "Generate", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), INVALID, "top_p must be in (0, 1]"),
    ("negative top_k", "Generate", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(top_k=-1)), INVALID, "top_k"),
    ("prompt longer than context", "Generate",
     pb.GenerateRequest(prompt="word " * 3000), INVALID, "context"),
    ("chat on a prompt task", "Generate",
     pb.GenerateRequest(task="generate", chat=chat("hi")), INVALID, "takes a prompt"),
    ("embed nothing", "Embed", pb.EmbedRequest(), INVALID, "texts is empty"),
    ("embed an empty text", "Embed", pb.EmbedRequest(texts=["ok", ""]), INVALID, "texts[1]"),
    ("embed beyond the batch limit", "Embed",
     pb.EmbedRequest(texts=["x"] * 65), INVALID, "limit is 64"),
    ("classify without labels", "Classify",
     pb.ClassifyRequest(text="hello"), INVALID, "labels is empty"),
    ("classify duplicate labels", "Classify",
     pb.ClassifyRequest(text="hello", labels=["a", "a"]), INVALID, "duplicates"),
    ("predict too many", "PredictNext",
     pb.PredictNextRequest(text="The", num_predictions=50), INVALID, "num_predictions"),
    ("predict empty", "PredictNext", pb.PredictNextRequest(text=""), INVALID, "text is empty"),
    ("run unknown input", "Run", pb.RunRequest(task="classify", inputs=[
        pb.Input(name="image", image=b"\x89PNG")]), INVALID, "has no input 'image'"),
    ("run wrong kind", "Run", pb.RunRequest(task="classify", inputs=[
        pb.Input(name="text", texts=pb.TextList(values=["a"]))]), INVALID, "must be text"),
    ("oversized message", "Embed", pb.EmbedRequest(texts=["a" * (17 * 2**20)]),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]


@pytest.fixture(scope="module")
def stub(daemon):
    channel = grpc.insecure_channel(daemon.address,
                                    options=[("grpc.max_send_message_length", 64 * 2**20)])
    yield pb_grpc.InferenceStub(channel)
    channel.close()


def invoke(stub, rpc: str, request):
    call = getattr(stub, rpc)(request, timeout=60)
    return list(call) if rpc in ("Generate", "Run") else call


@pytest.mark.parametrize(("name", "rpc", "request_", "code", "needle"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(stub, name, rpc, request_, code, needle) -> None:
    with pytest.raises(grpc.RpcError) as err:
        invoke(stub, rpc, request_)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details()


def test_daemon_serves_normally_after_bad_input(stub) -> None:
    for _, rpc, request_, _, _ in CASES[:6]:
        with pytest.raises(grpc.RpcError):
            invoke(stub, rpc, request_)
    reply = list(stub.Generate(pb.GenerateRequest(
        task="complete", prompt="The capital of France is", sampling=pb.SamplingParams(max_tokens=4,
                                                                       temperature=0.0))))
    assert "Paris" in "".join(m.text for m in reply)


def test_corrupted_image_stops_start_up_naming_the_file(default_image: Path,
                                                        tmp_path: Path) -> None:
    broken = tmp_path / "image"
    shutil.copytree(default_image, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    d = start_daemon(broken, tmp_path / "run", wait=False)
    code = d.proc.wait(timeout=120)
    assert code != 0
    assert "text_encoder/model.safetensors" in d.logs()
    assert not d.app_socket.exists(), "a failed start leaves no socket behind"
