"""m4client against a FAKE m4d: client mechanics only, no model.

The servicers below are fakes, not the daemon: they echo their input deterministically
(Generate streams the prompt's words back, Embed derives vectors from text lengths, ...),
abort with INVALID_ARGUMENT on empty input and record what arrived (requests, the
m4-app-name metadata, cancellations). They run on a real grpc.aio server on temporary Unix
sockets, in a background thread with its own event loop, so the sync client, the asyncio
client and m4ctl subprocesses (tests/cli/test_m4ctl_fake.py imports this fixture) can all
call it.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import m4client
import pytest
from m4.admin.v1 import admin_pb2, admin_pb2_grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc
from m4client import AdminClient, AsyncClient, ChatMessage, Client, FinishReason, M4Error

MODEL = pb.ModelInfo(image_name="fake-image", image_version="0.0.1", image_digest="f" * 64)
SLOW_WORD_S = 0.15  # a prompt starting with "slow" streams one word per this many seconds
INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAKE_WINDOW = 2048  # the context window the fake's sessions report


class FakeLog:
    """What the fake servicers saw, safe to read from the test thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, Any]] = []
        self.app_names: list[str | None] = []
        self.cancelled: list[str] = []
        self.cancel_event = threading.Event()
        self.started = threading.Event()

    def seen(self, rpc: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        app = dict(context.invocation_metadata() or ()).get("m4-app-name")
        with self.lock:
            self.requests.append((rpc, request))
            self.app_names.append(app)
        self.started.set()

    def cancel(self, rpc: str) -> None:
        # grpc.aio's done callbacks report cancelled() == False for streaming handlers, so
        # the fake records the CancelledError thrown into the handler instead.
        with self.lock:
            self.cancelled.append(rpc)
        self.cancel_event.set()

    def last(self, rpc: str) -> Any:
        with self.lock:
            return next(r for name, r in reversed(self.requests) if name == rpc)


def _usage(prompt: int, completion: int = 0) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


TIMINGS = pb.Timings(queue_ms=1.0, prefill_ms=2.0, decode_ms=3.0, first_token_ms=2.5, total_ms=6.0)


class FakeInference(pb_grpc.InferenceServicer):
    """A FAKE Inference service: deterministic echoes, no model."""

    def __init__(self, log: FakeLog) -> None:
        self.log = log
        self.sessions: dict[str, list[pb.ChatMessage]] = {}  # id -> transcript

    async def _words(
        self, text: str, s: pb.SamplingParams, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream `text` back word by word, honouring max_tokens and stop like a model would."""
        if s.max_tokens < 0:
            await context.abort(INVALID, f"max_tokens must be > 0 (got {s.max_tokens})")
        if not text.strip():
            await context.abort(INVALID, "prompt is empty")
        words = text.split()
        limit = s.max_tokens or len(words)
        finish, sent = pb.FINISH_REASON_EOS, 0
        for i, word in enumerate(words):
            if word in s.stop:
                finish = pb.FINISH_REASON_STOP
                break
            if sent == limit:
                finish = pb.FINISH_REASON_LENGTH
                break
            if words[0] == "slow":
                await asyncio.sleep(SLOW_WORD_S)
            first = {"model": MODEL} if i == 0 else {}
            yield pb.GenerateResponse(text=(" " if i else "") + word, token_ids=[i], **first)
            sent += 1
        yield pb.GenerateResponse(
            finish_reason=finish, usage=_usage(len(words), sent), timings=TIMINGS, model=MODEL
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.log.seen("Generate", request, context)
        if request.HasField("chat"):
            users = [m.content for m in request.chat.messages if m.role == "user"]
            text = users[-1] if users else ""
        else:
            text = request.prompt
        try:
            async for response in self._words(text, request.sampling, context):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            self.log.cancel("Generate")
            raise

    def _session(self, session_id: str) -> pb.Session:
        transcript = self.sessions[session_id]
        return pb.Session(session_id=session_id, task="chat", transcript=transcript,
                          context_tokens=sum(len(m.content.split()) for m in transcript),
                          context_window=FAKE_WINDOW, model=MODEL)

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.Session:
        self.log.seen("CreateSession", request, context)
        session_id = f"s{len(self.sessions) + 1}"
        self.sessions[session_id] = ([pb.ChatMessage(role="system", content=request.instructions)]
                                     if request.instructions else [])
        return self._session(session_id)

    async def GetSession(self, request: pb.SessionRef, context: Any) -> pb.Session:
        self.log.seen("GetSession", request, context)
        if request.session_id not in self.sessions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
        return self._session(request.session_id)

    async def DeleteSession(self, request: pb.SessionRef,
                            context: Any) -> pb.DeleteSessionResponse:
        self.log.seen("DeleteSession", request, context)
        if self.sessions.pop(request.session_id, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
        return pb.DeleteSessionResponse()

    async def SessionTurn(self, request: pb.SessionTurnRequest,
                          context: Any) -> AsyncIterator[pb.GenerateResponse]:
        """Echoes the user's message as a chat would answer it, and keeps the transcript."""
        self.log.seen("SessionTurn", request, context)
        transcript = self.sessions.get(request.session_id)
        if transcript is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
            return
        reply: list[str] = []
        async for response in self._words(request.user_message, request.sampling, context):
            reply.append(response.text)
            if response.finish_reason:
                transcript += [pb.ChatMessage(role="user", content=request.user_message),
                               pb.ChatMessage(role="assistant", content="".join(reply))]
                response.session.CopyFrom(pb.SessionContext(
                    session_id=request.session_id,
                    context_tokens=self._session(request.session_id).context_tokens,
                    context_window=FAKE_WINDOW))
            yield response

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        self.log.seen("Embed", request, context)
        if not request.texts:
            await context.abort(INVALID, "texts is empty")
        for i, t in enumerate(request.texts):
            if not t:
                await context.abort(INVALID, f"text {i} is empty")
        vectors = [pb.Embedding(values=[len(t), len(t.split()), 1.0, 0.5]) for t in request.texts]
        return pb.EmbedResponse(
            embeddings=vectors,
            dimensions=4,
            usage=_usage(sum(len(t.split()) for t in request.texts)),
            timings=TIMINGS,
            model=MODEL,
        )

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        self.log.seen("Classify", request, context)
        if not request.text:
            await context.abort(INVALID, "text is empty")
        if not request.labels:
            await context.abort(INVALID, "labels are empty")
        raw = {label: 1.0 + request.text.lower().count(label.lower()) for label in request.labels}
        total = sum(raw.values())
        ranked = sorted(request.labels, key=lambda label: -raw[label])
        return pb.ClassifyResponse(
            labels=[pb.LabelScore(label=x, score=raw[x] / total, raw_score=raw[x]) for x in ranked],
            usage=_usage(len(request.text.split())),
            timings=TIMINGS,
            model=MODEL,
        )

    async def PredictNext(
        self, request: pb.PredictNextRequest, context: Any
    ) -> pb.PredictNextResponse:
        self.log.seen("PredictNext", request, context)
        n = request.num_predictions or 5
        if not request.text.strip():
            await context.abort(INVALID, "text is empty")
        if not 0 < n <= 20:
            await context.abort(INVALID, f"num_predictions must be in 0..20 (got {n})")
        last = request.text.split()[-1]
        preds = [pb.WordPrediction(word=f"{last}{i}", probability=0.5 ** (i + 1)) for i in range(n)]
        return pb.PredictNextResponse(
            predictions=preds, usage=_usage(1), timings=TIMINGS, model=MODEL
        )

    async def ListTasks(self, request: pb.ListTasksRequest, context: Any) -> pb.ListTasksResponse:
        self.log.seen("ListTasks", request, context)
        text_in = pb.IOSpec(name="text", kind="text", required=True)
        return pb.ListTasksResponse(
            tasks=[
                pb.Task(
                    id="generate",
                    path=2,
                    modules=["backbone", "lm_head"],
                    inputs=[text_in],
                    outputs=[pb.IOSpec(name="text", kind="text")],
                    rpc="Generate",
                    streaming=True,
                ),
                pb.Task(
                    id="predict-next",
                    m4_id="T1",
                    path=2,
                    modules=["backbone"],
                    inputs=[text_in],
                    outputs=[pb.IOSpec(name="words", kind="texts")],
                    rpc="PredictNext",
                    context_window=FAKE_WINDOW,
                ),
                pb.Task(
                    id="echo",
                    path=2,
                    modules=["backbone"],
                    inputs=[
                        text_in,
                        pb.IOSpec(name="labels", kind="texts"),
                        pb.IOSpec(name="photo", kind="image"),
                    ],
                    outputs=[pb.IOSpec(name="text", kind="text")],
                    streaming=True,
                ),
            ],
            model=MODEL,
        )

    async def Run(self, request: pb.RunRequest, context: Any) -> AsyncIterator[pb.RunResponse]:
        self.log.seen("Run", request, context)
        inputs = {i.name: i for i in request.inputs}
        if request.task == "embed":
            text = inputs["text"].text
            yield pb.RunResponse(
                embeddings=[pb.Embedding(values=[len(text), 1.0])],
                model=MODEL,
                usage=_usage(1),
                timings=TIMINGS,
            )
            return
        if request.task != "echo":
            await context.abort(INVALID, f"unknown task {request.task!r}")
        text = inputs["text"].text if "text" in inputs else ""
        if "photo" in inputs:
            text += f" photo {len(inputs['photo'].image)} bytes"
        async for g in self._words(text, request.sampling, context):
            yield pb.RunResponse(
                text=g.text,
                finish_reason=g.finish_reason,
                usage=g.usage if g.HasField("usage") else None,
                model=MODEL,
            )
        if "labels" in inputs:
            labels = inputs["labels"].texts.values
            yield pb.RunResponse(
                labels=[pb.LabelScore(label=x, score=1 / len(labels)) for x in labels]
            )


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """A FAKE Admin service with fixed numbers."""

    def __init__(self, log: FakeLog) -> None:
        self.log = log

    async def Status(
        self, request: admin_pb2.StatusRequest, context: Any
    ) -> admin_pb2.StatusResponse:
        self.log.seen("Status", request, context)
        return admin_pb2.StatusResponse(
            image_name="fake-image",
            image_version="0.0.1",
            image_digest="f" * 64,
            daemon_version="9.9.9",
            state=admin_pb2.DAEMON_STATE_READY,
            uptime_seconds=3725.0,
            memory_rss_bytes=3 * 1024**3 // 2,
            requests_in_flight=2,
            requests_total=1234,
            requests_cancelled=5,
            requests_stalled=2,
            requests_rejected=1,
            tokens_generated=56789,
            tokens_prompted=4321,
            active_sequences=1,
            kv_slots=8,
            threads=4,
            components=[
                admin_pb2.ComponentStatus(
                    name="backbone",
                    kind="llama",
                    parameters=135_000_000,
                    weight_format="int4",
                    compute_dtype="float32",
                    device="cpu",
                )
            ],
            load=admin_pb2.EngineLoad(
                running_sequences=7, paused_sequences=1, window_seconds=10.0,
                uid_limits=admin_pb2.UidLimits(max_in_flight=32, max_queued=16, max_running=12,
                                               max_tokens_in_flight=8192)),
            uids=[admin_pb2.UidUsage(uid=1000, user="alice", in_flight=20, queued=8, running=12,
                                     tokens_in_flight=5000, preempted=3, stalled=1)],
        )


class FakeM4d:
    """Two fake servers (app and admin sockets) on a loop in a background thread."""

    def __init__(self, directory: Path) -> None:
        self.app_path = directory / "app.sock"
        self.admin_path = directory / "admin.sock"
        self.log = FakeLog()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fake-m4d", daemon=True)

    @property
    def app_address(self) -> str:
        return f"unix://{self.app_path}"

    @property
    def admin_address(self) -> str:
        return f"unix://{self.admin_path}"

    def reset(self) -> FakeLog:
        self.log = FakeLog()
        self._inference.log = self._admin.log = self.log
        return self.log

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "fake m4d did not start"

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._inference, self._admin = FakeInference(self.log), FakeAdmin(self.log)
        app, admin = grpc.aio.server(), grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(self._inference, app)
        admin_pb2_grpc.add_AdminServicer_to_server(self._admin, admin)
        app.add_insecure_port(self.app_address)
        admin.add_insecure_port(self.admin_address)
        await app.start()
        await admin.start()
        self._ready.set()
        await self._stop.wait()
        await asyncio.gather(app.stop(grace=None), admin.stop(grace=None))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def fake_m4d() -> Iterator[FakeM4d]:
    """A running fake m4d on short temporary socket paths (AF_UNIX paths are ≤ 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="m4fake-", dir="/tmp"))
    server = FakeM4d(directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fake(fake_m4d: FakeM4d) -> FakeM4d:
    """The fake m4d with a fresh log for this test."""
    fake_m4d.reset()
    return fake_m4d


@pytest.fixture
def client(fake: FakeM4d) -> Iterator[Client]:
    with Client(fake.app_address, app_name="test-app") as c:
        yield c


# ------------------------------------------------------------------------- sync client


def test_generate_streams_words_in_order(client: Client) -> None:
    chunks = list(client.generate("one two three"))
    assert [c.text for c in chunks] == ["one", " two", " three", ""]
    assert chunks[0].model is not None and chunks[0].model.image_name == "fake-image"
    last = chunks[-1]
    assert last.is_last and last.finish_reason is FinishReason.EOS
    assert last.usage == m4client.Usage(3, 3, 6)
    assert last.timings is not None and last.timings.total_ms == 6.0
    assert "raw" not in repr(last) and last.raw.finish_reason == pb.FINISH_REASON_EOS


def test_complete_and_sampling_fields_arrive(fake: FakeM4d, client: Client) -> None:
    result = client.complete(
        "a b c d e",
        max_tokens=2,
        temperature=0.0,
        top_p=0.9,
        top_k=7,
        seed=42,
        stop=["zzz"],
        ignore_eos=True,
        priority="background",
    )
    assert (result.text, result.finish_reason) == ("a b", FinishReason.LENGTH)
    assert result.usage.completion_tokens == 2 and result.token_ids == (0, 1)
    req = fake.log.last("Generate")
    s = req.sampling
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop), s.ignore_eos) == (2, 7, 42, ["zzz"], True)
    assert s.HasField("temperature") and s.temperature == 0.0
    assert abs(s.top_p - 0.9) < 1e-6 and req.priority == pb.PRIORITY_BACKGROUND
    assert client.complete("a b STOP c", stop="STOP").finish_reason is FinishReason.STOP


def test_unset_sampling_stays_unset(fake: FakeM4d, client: Client) -> None:
    client.complete("x")
    s = fake.log.last("Generate").sampling
    assert not s.HasField("temperature") and not s.HasField("seed") and not s.HasField("top_p")


def test_chat_accepts_dicts_and_messages(fake: FakeM4d, client: Client) -> None:
    history = [{"role": "system", "content": "be brief"}, ChatMessage("user", "hello there")]
    assert client.chat_complete(history).text == "hello there"
    chat = fake.log.last("Generate").chat
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "be brief"),
        ("user", "hello there"),
    ]
    with pytest.raises(m4client.InvalidArgumentError):
        client.chat([{"text": "no role"}])


def test_embed_vectors_and_numpy(client: Client) -> None:
    result = client.embed(["hi", "hello world"])
    assert result.vectors == [[2.0, 1.0, 1.0, 0.5], [11.0, 2.0, 1.0, 0.5]]
    assert result.dimensions == 4 and len(result) == 2
    array = result.numpy()
    assert array.shape == (2, 4) and str(array.dtype) == "float32"
    assert client.embed("single").vectors == [[6.0, 1.0, 1.0, 0.5]]


def test_classify_predict_next_tasks(client: Client) -> None:
    ranked = client.classify("the cat sat on the cat mat", ["dog", "cat", "mat"])
    assert [x.label for x in ranked] == ["cat", "mat", "dog"]
    assert ranked.best is not None and ranked.best.label == "cat"
    assert ranked.pairs()[0] == ("cat", pytest.approx(3 / 6))
    assert abs(sum(ranked.scores.values()) - 1.0) < 1e-6
    words = client.predict_next("hello wor", 3)
    assert words.words == ["wor0", "wor1", "wor2"] and words.predictions[0].probability == 0.5
    table = client.list_tasks()
    assert [t.id for t in table] == ["generate", "predict-next", "echo"]
    t1 = table.get("predict-next")
    assert t1 is not None and t1.m4_id == "T1" and t1.inputs[0].required
    assert table.model == m4client.ModelInfo("fake-image", "0.0.1", "f" * 64)


def test_run_inputs_by_type(fake: FakeM4d, client: Client) -> None:
    result = client.run_complete(
        "echo",
        {"text": "x y", "labels": ["a", "b"], "photo": m4client.Image(b"\x89PNG")},
        max_tokens=10,
    )
    assert result.text == "x y photo 4 bytes"
    assert [ls.label for ls in result.labels] == ["a", "b"]
    inputs = {i.name: i for i in fake.log.last("Run").inputs}
    assert inputs["labels"].WhichOneof("value") == "texts" and inputs["photo"].image == b"\x89PNG"
    assert fake.log.last("Run").sampling.max_tokens == 10
    with pytest.raises(m4client.InvalidArgumentError, match="wrap bytes"):
        client.run("echo", {"photo": b"raw"})


def test_errors_carry_code_and_message(client: Client) -> None:
    with pytest.raises(M4Error) as info:
        list(client.generate(""))
    err = info.value
    assert isinstance(err, m4client.InvalidArgumentError)
    assert (err.code, err.message) == ("INVALID_ARGUMENT", "prompt is empty")
    assert str(err) == "INVALID_ARGUMENT: prompt is empty"
    assert isinstance(err.__cause__, grpc.RpcError)
    assert err.status_code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(m4client.InvalidArgumentError, match="texts is empty"):
        client.embed([])
    with pytest.raises(M4Error, match=r"^INVALID_ARGUMENT: unknown task 'nope'$"):
        client.run_complete("nope", {})


def test_timeout_is_deadline_exceeded(fake: FakeM4d, client: Client) -> None:
    with pytest.raises(m4client.DeadlineExceededError) as info:
        client.complete("slow a b c d e f", timeout=0.2)
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_breaking_out_cancels_on_the_server(fake: FakeM4d, client: Client) -> None:
    for chunk in client.generate("slow " + "w " * 50):
        assert chunk.text
        break
    assert fake.log.cancel_event.wait(5), "server never saw the cancellation"
    assert fake.log.cancelled == ["Generate"]


def test_closing_a_held_stream_cancels(fake: FakeM4d, client: Client) -> None:
    stream = client.generate("slow " + "w " * 50)
    assert next(stream).text == "slow"
    stream.close()
    assert fake.log.cancel_event.wait(5)
    assert list(stream) == []


def test_app_name_metadata_arrives(fake: FakeM4d, client: Client) -> None:
    client.embed("x")
    with Client(fake.app_address) as anonymous:
        anonymous.embed("x")
    assert fake.log.app_names == ["test-app", None]


def test_env_var_and_plain_path(fake: FakeM4d, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M4_ADDRESS", str(fake.app_path))
    with Client() as c:
        assert c.target == f"unix://{fake.app_path}"
        assert c.complete("via env").text == "via env"
    monkeypatch.setenv("M4_ADMIN_ADDRESS", fake.admin_address)
    with AdminClient() as admin:
        assert admin.status().state == "READY"
    with Client(str(fake.app_path)) as c:
        assert c.complete("via path").text == "via path"


def test_address_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("M4_ADDRESS", raising=False)
    monkeypatch.delenv("M4_ADMIN_ADDRESS", raising=False)
    assert m4client.resolve_address(None) == "unix:///run/m4/app.sock"
    assert m4client.resolve_address(None, admin=True) == "unix:///run/m4/admin.sock"
    assert m4client.to_target("/tmp/x.sock") == "unix:///tmp/x.sock"
    assert m4client.to_target("unix:///tmp/x.sock") == "unix:///tmp/x.sock"
    assert m4client.to_target("unix:rel.sock") == "unix:rel.sock"
    assert m4client.to_target("localhost:50051") == "localhost:50051"
    assert m4client.to_target("x.sock") == f"unix://{Path.cwd() / 'x.sock'}"
    monkeypatch.setenv("M4_ADDRESS", "/tmp/env.sock")
    assert m4client.resolve_address(None) == "unix:///tmp/env.sock"
    assert m4client.resolve_address("/tmp/arg.sock") == "unix:///tmp/arg.sock"


def test_admin_status(fake: FakeM4d) -> None:
    with AdminClient(fake.admin_address) as admin:
        status = admin.status()
    assert (status.state, status.requests_total, status.kv_slots) == ("READY", 1234, 8)
    assert status.components[0].kind == "llama" and status.components[0].parameters == 135_000_000


def test_unreachable_daemon_is_unavailable(tmp_path: Path) -> None:
    with Client(str(tmp_path / "none.sock")) as c:
        with pytest.raises(m4client.UnavailableError):
            c.embed("x")
        with pytest.raises(m4client.UnavailableError, match="not reachable"):
            c.wait_ready(timeout=0.1)


# ------------------------------------------------------------------------- asyncio client


async def test_async_generate_and_complete(fake: FakeM4d) -> None:
    async with AsyncClient(fake.app_address, app_name="aio-app") as c:
        await c.wait_ready(timeout=5)
        texts = [chunk.text async for chunk in c.generate("alpha beta")]
        assert texts == ["alpha", " beta", ""]
        result = await c.complete("alpha beta gamma", max_tokens=2)
        assert (result.text, result.finish_reason) == ("alpha beta", FinishReason.LENGTH)
        assert (await c.chat_complete([{"role": "user", "content": "hi you"}])).text == "hi you"
        assert (await c.embed(["abc"])).vectors == [[3.0, 1.0, 1.0, 0.5]]
        assert (await c.classify("b b", ["a", "b"])).best.label == "b"  # type: ignore[union-attr]
        assert (await c.predict_next("go", 2)).words == ["go0", "go1"]
        assert len(await c.list_tasks()) == 3
        assert (await c.run_complete("echo", {"text": "r s"})).text == "r s"
    assert set(fake.log.app_names) == {"aio-app"}


async def test_async_errors_and_deadline(fake: FakeM4d) -> None:
    async with AsyncClient(fake.app_address) as c:
        with pytest.raises(m4client.InvalidArgumentError, match="max_tokens must be > 0"):
            await c.complete("x", max_tokens=-1)
        with pytest.raises(m4client.DeadlineExceededError):
            async for _ in c.generate("slow a b c d e", timeout=0.2):
                pass


async def test_async_break_cancels_on_the_server(fake: FakeM4d) -> None:
    async with AsyncClient(fake.app_address) as c:
        async with c.generate("slow " + "w " * 50) as stream:
            async for chunk in stream:
                assert chunk.text == "slow"
                break
        deadline = time.monotonic() + 5
        while not fake.log.cancel_event.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the server runs on another loop; poll its flag
    assert fake.log.cancelled == ["Generate"]


async def test_async_task_cancellation_cancels_the_call(fake: FakeM4d) -> None:
    async with AsyncClient(fake.app_address) as c:

        async def consume() -> None:
            async for _ in c.generate("slow " + "w " * 50):
                pass

        task = asyncio.create_task(consume())
        await asyncio.to_thread(fake.log.started.wait, 5)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(fake.log.cancel_event.wait, 5)
