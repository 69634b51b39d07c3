"""Protobuf ⇄ domain: the one module that reads API messages and writes them.

Requests: each field is taken out of its message and handed to the served image's `Tasks`
(`m4d.service.tasks`), which checks it under its API name and builds the engine request.
Responses: engine events become API messages, stamped with the image that served them.
"""

from __future__ import annotations

from typing import Any

from m4.inference.v1 import inference_pb2 as pb

from m4d.errors import InvalidArgument
from m4d.prepare.constraints import ResponseFormat
from m4d.requests import (
    Caller,
    ClassifyRequest,
    Embeddings,
    EmbedRequest,
    Finished,
    FinishReason,
    GenerateRequest,
    KeywordsHeard,
    MediaInput,
    MediaRequest,
    Predictions,
    PredictNextRequest,
    Priority,
    Ranked,
    SourceText,
    TextDelta,
    TextRead,
    Timings,
    Transcribed,
    Usage,
)
from m4d.service.sessions import (
    Overflow,
    Session,
    Sessions,
    TurnInput,
    TurnResult,
    parse_tool,
)
from m4d.service.tasks import Origin, SamplingArgs, Tasks, Turn

_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.FOREGROUND,
    pb.PRIORITY_SYSTEM: Priority.SYSTEM,
    pb.PRIORITY_FOREGROUND: Priority.FOREGROUND,
    pb.PRIORITY_BACKGROUND: Priority.BACKGROUND,
}
_FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
}
_OVERFLOW_PB = {Overflow.FAIL: pb.OVERFLOW_FAIL, Overflow.DROP_OLDEST: pb.OVERFLOW_DROP_OLDEST}
_OVERFLOW = {pb.OVERFLOW_UNSPECIFIED: Overflow.FAIL, **{v: k for k, v in _OVERFLOW_PB.items()}}
MEDIA_EVENTS = (Transcribed, TextRead, KeywordsHeard, SourceText)
_LIST_INPUTS = ("keywords", "labels", "texts")  # text-list inputs of media tasks


def origin(priority: int, caller: Caller, deadline: float | None) -> Origin:
    return Origin(caller, _PRIORITY.get(priority, Priority.FOREGROUND), deadline)


def sampling_args(s: pb.SamplingParams) -> SamplingArgs:
    """The message's sampling fields; an unset optional field is None."""
    return SamplingArgs(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), ignore_eos=s.ignore_eos)


def generation_input(req: pb.GenerateRequest | pb.CountTokensRequest,
                     ) -> tuple[str, str | None, list[Turn] | None]:
    """(task id, prompt, chat) of a request with a prompt-or-chat input; the task defaults
    to "generate" for a prompt and "chat" for a chat."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("set either prompt or chat")
    if which == "chat":
        return req.task or "chat", None, [(m.role, m.content) for m in req.chat.messages]
    return req.task or "generate", req.prompt, None


def response_format(req: pb.GenerateRequest | pb.SessionTurnRequest) -> ResponseFormat | None:
    """The request's response format; None when unset (free text)."""
    if not req.HasField("response_format"):
        return None
    fmt = req.response_format
    which = fmt.WhichOneof("format")
    if which == "json_schema":
        return ResponseFormat("json_schema", json_schema=fmt.json_schema)
    if which == "regex":
        return ResponseFormat("regex", regex=fmt.regex)
    if which == "choices":
        return ResponseFormat("choices", choices=tuple(fmt.choices.values))
    raise InvalidArgument("response_format is set but empty: give json_schema, regex or choices")


class Converter:
    """Converts the calls and answers of one served image (its `Tasks`)."""

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks

    # ---- requests ------------------------------------------------------------------

    def generate(self, req: pb.GenerateRequest, caller: Caller,
                 deadline: float | None) -> GenerateRequest:
        task_id, prompt, chat = generation_input(req)
        return self.tasks.generate(task_id, origin(req.priority, caller, deadline),
                                   prompt=prompt, chat=chat, sampling=sampling_args(req.sampling),
                                   response_format=response_format(req))

    def count_tokens(self, req: pb.CountTokensRequest) -> pb.CountTokensResponse:
        task_id, prompt, chat = generation_input(req)
        tokens, window = self.tasks.count_tokens(task_id, prompt=prompt, chat=chat)
        return pb.CountTokensResponse(tokens=tokens, context_window=window,
                                      model=self.model_info())

    # ---- sessions ------------------------------------------------------------------

    def create_session(self, req: pb.CreateSessionRequest, sessions: Sessions,
                       uid: int) -> Session:
        if req.overflow not in _OVERFLOW:
            raise InvalidArgument(f"overflow {req.overflow} is not an Overflow value")
        tools = [parse_tool(t.name, t.description, t.parameters_schema, i)
                 for i, t in enumerate(req.tools)]
        return sessions.create(uid, self.tasks, task=req.task, instructions=req.instructions,
                               tools=tools, overflow=_OVERFLOW[req.overflow])

    def session_turn(self, req: pb.SessionTurnRequest) -> TurnInput:
        which = req.WhichOneof("turn")
        if which is None:
            raise InvalidArgument("set either user_message or tool_result")
        return TurnInput(
            user_message=req.user_message if which == "user_message" else None,
            tool_result=((req.tool_result.call_id, req.tool_result.content)
                         if which == "tool_result" else None),
            sampling=sampling_args(req.sampling), response_format=response_format(req),
            tool_choice=req.tool_choice)

    def session(self, session: Session, sessions: Sessions) -> pb.Session:
        tokens, window = sessions.context_tokens(session, self.tasks)
        return pb.Session(
            session_id=session.id, task=session.task,
            transcript=[pb.ChatMessage(role=r, content=c) for r, c in session.chat()],
            context_tokens=tokens, context_window=window,
            overflow=_OVERFLOW_PB[session.overflow],
            tools=[pb.Tool(name=t.name, description=t.description,
                           parameters_schema=t.schema_text) for t in session.toolbox.tools],
            model=self.model_info())

    @staticmethod
    def turn_finished(msg: pb.GenerateResponse, session_id: str, result: TurnResult) -> None:
        """The last message of a session's turn: its tool call and the session's context."""
        if result.tool_call is not None:
            msg.finish_reason = pb.FINISH_REASON_TOOL_CALL
            msg.tool_call.CopyFrom(pb.ToolCall(call_id=result.tool_call.call_id,
                                               name=result.tool_call.name,
                                               arguments_json=result.tool_call.arguments_json))
        msg.session.CopyFrom(pb.SessionContext(
            session_id=session_id, context_tokens=result.context_tokens,
            context_window=result.window, dropped_messages=result.dropped))

    # ---- Embed, Classify, PredictNext ----------------------------------------------

    def embed(self, req: pb.EmbedRequest, caller: Caller, deadline: float | None) -> EmbedRequest:
        return self.tasks.embed(req.task or "embed", origin(req.priority, caller, deadline),
                                req.texts)

    def classify(self, req: pb.ClassifyRequest, caller: Caller,
                 deadline: float | None) -> ClassifyRequest:
        return self.tasks.classify(req.task or "classify", origin(req.priority, caller, deadline),
                                   req.text, req.labels)

    def predict_next(self, req: pb.PredictNextRequest, caller: Caller,
                     deadline: float | None) -> PredictNextRequest:
        return self.tasks.predict_next(req.task or "predict-next",
                                       origin(req.priority, caller, deadline), req.text,
                                       req.num_predictions)

    def run(self, req: pb.RunRequest, caller: Caller, deadline: float | None) -> Any:
        """Any task by id: a media request, or the request of the task's own RPC."""
        task = self.tasks.task(req.task, "Run")
        inputs: dict[str, pb.Input] = {}
        for i, item in enumerate(req.inputs):
            if not item.name:
                raise InvalidArgument(f"inputs[{i}] has no name")
            inputs[item.name] = item
        kinds = {name: item.WhichOneof("value") for name, item in inputs.items()}
        if self.tasks.check_inputs(task, kinds):
            return self.media(task, req, inputs, origin(req.priority, caller, deadline))
        rpc = task.get("rpc")
        prio = req.priority
        if rpc == "Generate":
            g = pb.GenerateRequest(task=req.task, sampling=req.sampling, priority=prio)
            for item in inputs.values():
                if item.WhichOneof("value") == "chat":
                    g.chat.CopyFrom(item.chat)
                else:
                    g.prompt = item.text
            return self.generate(g, caller, deadline)
        if rpc == "Embed":
            texts = next(iter(inputs.values())).texts.values if inputs else []
            return self.embed(pb.EmbedRequest(task=req.task, texts=texts, priority=prio),
                              caller, deadline)
        if rpc == "Classify":
            return self.classify(pb.ClassifyRequest(
                task=req.task, text=inputs["text"].text if "text" in inputs else "",
                labels=inputs["labels"].texts.values if "labels" in inputs else [],
                priority=prio), caller, deadline)
        if rpc == "PredictNext":
            return self.predict_next(pb.PredictNextRequest(
                task=req.task, text=inputs["text"].text if "text" in inputs else "",
                num_predictions=req.num_predictions, priority=prio), caller, deadline)
        raise InvalidArgument(f"task {req.task!r} cannot run on this daemon (rpc {rpc!r})")

    def media(self, task: dict[str, Any], req: pb.RunRequest, inputs: dict[str, pb.Input],
              where: Origin) -> MediaRequest:
        """A task on an image, audio clip or tensor: decoded here (the caller runs this off
        the event loop), then checked and built by `Tasks.media`."""
        op = self.tasks.media_op(task)
        media: MediaInput | None = None
        for name, item in inputs.items():
            kind = item.WhichOneof("value")
            if kind == "image":
                media = self.tasks.image_input(name, item.image)
            elif kind == "audio":
                media = self.tasks.wav_input(name, item.audio)
            elif kind == "pcm":
                media = self.tasks.pcm_input(name, item.pcm.data, item.pcm.sample_rate,
                                             item.pcm.encoding, item.pcm.channels)
            elif kind == "tensor":
                media = self.tasks.tensor_input(
                    name, item.tensor.dtype, item.tensor.shape, item.tensor.data,
                    next(s for s in task["inputs"] if s["name"] == name))
        return self.tasks.media(
            task, op, media, where,
            lists={n: list(inputs[n].texts.values) for n in _LIST_INPUTS if n in inputs},
            question=inputs["question"].text if "question" in inputs else None,
            sampling=sampling_args(req.sampling))

    # ---- responses -----------------------------------------------------------------

    def reply(self, event: object) -> Any:
        """The RPC's own response to an engine event; None for an event it has none for."""
        if isinstance(event, TextDelta):
            return self.delta(event)
        if isinstance(event, Finished):
            return self.finished(event)
        if isinstance(event, Embeddings):
            return self.embeddings(event)
        if isinstance(event, Ranked):
            return self.ranked(event)
        if isinstance(event, Predictions):
            return self.predictions(event)
        return None

    def run_reply(self, event: object) -> pb.RunResponse | None:
        """An engine event as Run answers it; None for an event it has no answer for."""
        if isinstance(event, MEDIA_EVENTS):
            return self.media_event(event)
        reply = self.reply(event)
        return None if reply is None else self.run_response(reply)

    def media_event(self, event: Any) -> pb.RunResponse:
        """Engine events of media tasks → RunResponse."""
        out = pb.RunResponse()
        if isinstance(event, Transcribed):
            out.text = event.text
            out.audio_seconds = event.audio_seconds
        elif isinstance(event, KeywordsHeard):
            out.source_text = event.transcript
            out.audio_seconds = event.audio_seconds
            out.keywords.extend(pb.KeywordHit(keyword=h.keyword, detected=h.detected,
                                              score=h.score, heard=h.heard) for h in event.hits)
        elif isinstance(event, TextRead):
            out.text = event.text
            out.boxes.extend(pb.TextBox(text=b.text, confidence=b.confidence,
                                        corners=[pb.Point(x=x, y=y) for x, y in b.corners])
                             for b in event.boxes)
        elif isinstance(event, SourceText):
            out.source_text = event.text
            out.audio_seconds = event.audio_seconds
            out.model.CopyFrom(self.model_info())
            return out
        else:
            raise TypeError(f"not a media event: {event!r}")
        out.usage.CopyFrom(usage(event.usage))
        out.timings.CopyFrom(timings(event.timings))
        out.model.CopyFrom(self.model_info())
        return out

    def model_info(self) -> pb.ModelInfo:
        image = self.tasks.image
        return pb.ModelInfo(image_name=image.name, image_version=image.version,
                            image_digest=image.digest)

    def delta(self, event: TextDelta) -> pb.GenerateResponse:
        return pb.GenerateResponse(text=event.text, token_ids=list(event.token_ids))

    def finished(self, event: Finished) -> pb.GenerateResponse:
        return pb.GenerateResponse(finish_reason=_FINISH[event.reason], usage=usage(event.usage),
                                   timings=timings(event.timings), model=self.model_info())

    def embeddings(self, event: Embeddings) -> pb.EmbedResponse:
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in event.vectors],
            dimensions=event.dimensions, usage=usage(event.usage),
            timings=timings(event.timings), model=self.model_info())

    def ranked(self, event: Ranked) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            labels=[pb.LabelScore(label=ls.label, score=ls.score, raw_score=ls.raw_score)
                    for ls in event.labels],
            usage=usage(event.usage), timings=timings(event.timings), model=self.model_info())

    def predictions(self, event: Predictions) -> pb.PredictNextResponse:
        return pb.PredictNextResponse(
            predictions=[pb.WordPrediction(word=p.word, probability=p.probability)
                         for p in event.predictions],
            usage=usage(event.usage), timings=timings(event.timings), model=self.model_info())

    def run_response(self, msg: Any) -> pb.RunResponse:
        """Wraps any of the RPC-specific responses into a RunResponse."""
        out = pb.RunResponse()
        if isinstance(msg, pb.GenerateResponse):
            out.text = msg.text
            out.token_ids.extend(msg.token_ids)
            out.finish_reason = msg.finish_reason
        elif isinstance(msg, pb.EmbedResponse):
            out.embeddings.extend(msg.embeddings)
        elif isinstance(msg, pb.ClassifyResponse):
            out.labels.extend(msg.labels)
        elif isinstance(msg, pb.PredictNextResponse):
            out.predictions.extend(msg.predictions)
        for name in ("usage", "timings", "model"):
            if msg.HasField(name):
                getattr(out, name).CopyFrom(getattr(msg, name))
        return out

    def task_table(self) -> pb.ListTasksResponse:
        out = pb.ListTasksResponse(model=self.model_info())
        for t in self.tasks.task_list:
            out.tasks.append(pb.Task(
                id=t["id"], m4_id=t.get("m4_id") or "", path=int(t.get("path", 0)),
                description=t.get("description", ""), modules=t.get("modules", []),
                adapter=t.get("adapter") or "", head=t.get("head") or "",
                labels=t.get("labels") or [], rpc=t.get("rpc", ""),
                streaming=bool(t.get("streaming")),
                context_window=self.tasks.context_window(t),
                response_schema=t.get("response_schema") or "",
                inputs=[_io(s) for s in t.get("inputs", [])],
                outputs=[_io(s) for s in t.get("outputs", [])]))
        return out


def _io(spec: dict[str, Any]) -> pb.IOSpec:
    return pb.IOSpec(name=spec["name"], kind=spec.get("kind", ""), dtype=spec.get("dtype") or "",
                     shape=spec.get("shape") or [], required=bool(spec.get("required")),
                     description=spec.get("description", ""))


def usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    total_tokens=u.total_tokens)


def timings(t: Timings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, decode_ms=t.decode_ms,
                      first_token_ms=t.first_token_ms, total_ms=t.total_ms)
