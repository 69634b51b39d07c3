"""A real m4d process on the real default image, through stock gRPC stubs on a temporary
Unix socket: generation equals the in-process model, concurrency, cancellation, the other
RPCs, health and reflection."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4d.config import Config
from m4d.executor.runtime import backbone_plan
from m4d.model.llama import LlamaConfig, greedy_generate, load_llama
from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer
from m4image.verify import verify_image

CAPITAL = "What is the capital of France?"
PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The boiling point of water at sea level is",
    "My favourite fruit is",
    "Paris is the capital of",
    "1, 2, 3, 4,",
    "The quick brown fox",
]


@pytest.fixture(scope="module")
def stub(daemon) -> pb_grpc.InferenceStub:
    channel = grpc.insecure_channel(daemon.address)
    yield pb_grpc.InferenceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def admin(daemon) -> admin_pb2_grpc.AdminStub:
    channel = grpc.insecure_channel(daemon.admin_address)
    yield admin_pb2_grpc.AdminStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference(default_image: Path):
    """The same weights in the same format, run in this process by the reference loop."""
    image = verify_image(default_image)
    spec = image.manifest.components["backbone"]
    cfg = LlamaConfig.from_dict(spec["config"])
    # the daemon's default format, activation and KV cache dtypes (w4a8 in float32 here)
    fmt, dtype, kv_dtype = backbone_plan(Config(), torch.device("cpu"))
    model = load_llama(image.path / spec["weights"], cfg, weight_format=fmt, compute_dtype=dtype)
    model.setup_caches(1, 1024, kv_dtype)
    tok = TextTokenizer.from_file(image.path / spec["tokenizer"], bos_id=cfg.bos_id,
                                  eos_id=cfg.eos_id)
    template = ChatTemplate(spec["chat_template"], bos_token=tok.bos_token,
                            eos_token=tok.eos_token)

    def run(prompt: str, n: int) -> list[int]:
        with torch.inference_mode():
            return greedy_generate(model, tok.encode(prompt), n, tok.eos_id)

    run.tokenizer = tok  # type: ignore[attr-defined]
    run.template = template  # type: ignore[attr-defined]
    return run


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0)


def collect(stream) -> tuple[list[int], str, pb.GenerateResponse]:
    ids: list[int] = []
    text = ""
    last = None
    for msg in stream:
        ids.extend(msg.token_ids)
        text += msg.text
        last = msg
    assert last is not None
    return ids, text, last


def test_chat_answers_paris_and_streams_token_by_token(stub, reference) -> None:
    req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=CAPITAL)]),
                             sampling=greedy(32))
    messages = list(stub.Generate(req))
    assert len(messages) > 3, "the answer arrives as a stream, not one message"
    ids, text, last = collect(iter(messages))
    assert "Paris" in text
    assert last.finish_reason == pb.FINISH_REASON_EOS
    assert last.usage.completion_tokens == len(ids) + 1  # the EOS token is counted, not sent
    assert last.model.image_name == "m4-default" and last.model.image_digest
    assert messages[0].model.image_version == last.model.image_version
    prompt = reference.template.render([{"role": "user", "content": CAPITAL}],
                                       add_generation_prompt=True)
    assert last.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    expected = reference(prompt, 32)
    assert ids == [t for t in expected if t != reference.tokenizer.eos_id]


def test_streamed_generation_equals_in_process(stub, reference) -> None:
    ids, text, last = collect(stub.Generate(pb.GenerateRequest(task="complete", prompt=PROMPTS[0],
                                                               sampling=greedy(40))))
    assert ids == reference(PROMPTS[0], 40)[:len(ids)]
    assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert text == reference.tokenizer.decode(ids)


def test_eight_concurrent_clients_get_their_own_answers(stub, reference) -> None:
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            ids, _, _ = collect(stub.Generate(pb.GenerateRequest(
                task="complete", prompt=PROMPTS[i], sampling=greedy(24))))
            results[i] = ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for i, prompt in enumerate(PROMPTS):
        expected = reference(prompt, 24)
        assert results[i] == expected[:len(results[i])], f"prompt {i} ({prompt!r}) differs"


def test_seeded_sampling_is_reproducible(stub) -> None:
    params = pb.SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=7,
                               ignore_eos=True)
    a = collect(stub.Generate(pb.GenerateRequest(task="complete", prompt=PROMPTS[2], sampling=params)))[0]
    b = collect(stub.Generate(pb.GenerateRequest(task="complete", prompt=PROMPTS[2], sampling=params)))[0]
    assert a == b and len(a) == 16


def test_stop_string_ends_generation_without_it(stub) -> None:
    base = collect(stub.Generate(pb.GenerateRequest(task="complete", prompt="1, 2, 3, 4,", sampling=greedy(20))))
    assert "7" in base[1]
    stop = pb.SamplingParams(max_tokens=20, temperature=0.0, stop=["7"])
    _, text, last = collect(stub.Generate(pb.GenerateRequest(task="complete", prompt="1, 2, 3, 4,", sampling=stop)))
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert text == base[1][:base[1].index("7")]


def test_cancel_mid_stream_stops_the_work(stub, admin, daemon) -> None:
    before = admin.Status(admin_pb2.StatusRequest())
    call = stub.Generate(pb.GenerateRequest(
        task="complete", prompt="Write a very long story about a dragon.",
        sampling=pb.SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)))
    for i, _ in enumerate(call):
        if i == 3:
            call.cancel()
            break
    deadline = time.monotonic() + 10
    while True:
        status = admin.Status(admin_pb2.StatusRequest())
        if status.requests_cancelled > before.requests_cancelled and not status.requests_in_flight:
            break
        assert time.monotonic() < deadline, f"cancel not seen by the daemon: {status}"
        time.sleep(0.05)
    assert status.active_sequences == 0
    assert status.tokens_generated - before.tokens_generated < 200, "work went on after cancel"
    assert "request cancelled by client" in daemon.logs()


def test_embed_matches_in_process_encoder(stub, default_image: Path) -> None:
    from m4d.model.bert import BertConfig, embed_with_counts, load_bert

    texts = ["some text", "other text", "A longer sentence about the weather in Paris today."]
    reply = stub.Embed(pb.EmbedRequest(texts=texts))
    assert reply.dimensions == 384 and len(reply.embeddings) == 3
    image = verify_image(default_image)
    spec = image.manifest.components["text_encoder"]
    model = load_bert(image.path / spec["weights"], BertConfig.from_dict(spec["config"]),
                      compute_dtype=torch.float32)
    tok = TextTokenizer.from_file(image.path / spec["tokenizer"])
    with torch.inference_mode():
        expected = embed_with_counts(model, tok.tokenizer, texts, spec["max_seq_len"],
                                     normalize=True).vectors
    got = torch.tensor([list(e.values) for e in reply.embeddings])
    cos = torch.nn.functional.cosine_similarity(got, expected.float(), dim=-1)
    assert cos.min().item() >= 0.999
    assert reply.usage.prompt_tokens > 0


def test_classify_ranks_the_right_label_first(stub) -> None:
    reply = stub.Classify(pb.ClassifyRequest(
        text="The striker scored twice and the team won the match.",
        labels=["politics", "sports", "technology"]))
    assert next(ls.label for ls in reply.labels) == "sports"
    assert abs(sum(ls.score for ls in reply.labels) - 1.0) < 1e-4
    scores = [ls.score for ls in reply.labels]
    assert scores == sorted(scores, reverse=True)


def test_predict_next_word(stub) -> None:
    reply = stub.PredictNext(pb.PredictNextRequest(text="The capital of France is",
                                                   num_predictions=5))
    words = [p.word for p in reply.predictions]
    assert len(words) == 5 and "Paris" in words
    probs = [p.probability for p in reply.predictions]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(" " not in w for w in words)


def test_run_dispatches_by_task(stub) -> None:
    out = list(stub.Run(pb.RunRequest(task="classify", inputs=[
        pb.Input(name="text", text="Parliament passed the new budget law."),
        pb.Input(name="labels", texts=pb.TextList(values=["sports", "politics"]))])))
    assert out[-1].labels[0].label == "politics"
    gen = list(stub.Run(pb.RunRequest(task="generate", inputs=[
        pb.Input(name="prompt", text=PROMPTS[5])], sampling=greedy(8))))
    assert "".join(m.text for m in gen).strip()
    assert gen[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_list_tasks_describes_the_image(stub) -> None:
    reply = stub.ListTasks(pb.ListTasksRequest())
    tasks = {t.id: t for t in reply.tasks}
    assert {"generate", "complete", "chat", "embed", "classify", "predict-next"} <= set(tasks)
    assert tasks["predict-next"].m4_id == "T1"
    assert tasks["embed"].path == 3 and tasks["chat"].path == 2
    assert tasks["chat"].streaming and tasks["chat"].inputs[0].kind == "chat"


def test_status_reports_image_and_memory(admin) -> None:
    s = admin.Status(admin_pb2.StatusRequest())
    assert s.state == admin_pb2.DAEMON_STATE_READY
    assert s.image_name == "m4-default" and s.memory_rss_bytes > 50 * 2**20
    assert s.uptime_seconds > 0 and s.kv_slots > 0
    assert {c.name for c in s.components} == {"backbone", "text_encoder", "speech", "ocr"}


def test_admin_is_not_served_on_the_app_socket(daemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel, pytest.raises(grpc.RpcError) as err:
        admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_lists_the_services(daemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "m4.inference.v1.Inference" in names and "grpc.health.v1.Health" in names
