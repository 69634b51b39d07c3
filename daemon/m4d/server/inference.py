"""The Inference servicer: a thin adapter from gRPC calls to engine requests.

Each handler validates and converts the request (`convert`), submits it to the engine,
and converts the engine's events back. When the client goes away, the handler's
CancelledError cancels the request in the engine, which frees its KV row within a step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc

from m4d.engine.stream import RequestStream
from m4d.errors import Internal
from m4d.requests import (
    Caller,
    Embeddings,
    Failed,
    Finished,
    GenerateRequest,
    MediaRequest,
    Predictions,
    Ranked,
    RequestBase,
    TextDelta,
)
from m4d.server.convert import Converter, origin
from m4d.server.identity import PeerLookup, caller_from_context
from m4d.server.status import streaming, unary
from m4d.service.daemon import Daemon
from m4d.service.sessions import ReplyGate

MEDIA_VALUES = ("image", "audio", "pcm", "tensor")  # Input values that take decoding


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.InferenceServicer):  # type: ignore[misc]
    def __init__(self, daemon: Daemon, peers: PeerLookup | None = None) -> None:
        self.daemon = daemon
        self.peers = peers  # the app socket's PeerRelay: who is behind each connection

    def caller_of(self, context: grpc.aio.ServicerContext) -> Caller:
        """uid and pid from the kernel (via the relay); the app name is only a label."""
        return caller_from_context(context, self.peers)

    def converter(self) -> Converter:
        """For the image that serves new calls (Unavailable while loading or swapping)."""
        return Converter(self.daemon.tasks())

    async def _submit(self, request: RequestBase) -> RequestStream:
        return self.daemon.engine_for_requests().submit(request)

    @unary
    async def ListTasks(self, request: pb.ListTasksRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        return self.converter().task_table()

    @unary
    async def CountTokens(self, request: pb.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        return self.converter().count_tokens(request)

    @streaming
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        conv = self.converter()
        domain = conv.generate(request, self.caller_of(context), deadline_of(context))
        async for msg in self._generate(conv, domain):
            yield msg

    async def _generate(self, conv: Converter,
                        domain: GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        stream = await self._submit(domain)
        first = True
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    msg = conv.delta(event)
                    if first:
                        msg.model.CopyFrom(conv.model_info())
                        first = False
                    yield msg
                elif isinstance(event, Finished):
                    yield conv.finished(event)
                elif isinstance(event, Failed):
                    raise event.error
        finally:
            stream.cancel()  # a no-op when the stream ended; frees the KV row otherwise

    # ---- sessions ------------------------------------------------------------------

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.Session:
        conv, sessions = self.converter(), self.daemon.sessions
        session = conv.create_session(request, sessions, self.caller_of(context).uid)
        return conv.session(session, sessions)

    @unary
    async def GetSession(self, request: pb.SessionRef,
                         context: grpc.aio.ServicerContext) -> pb.Session:
        sessions = self.daemon.sessions
        session = sessions.get(self.caller_of(context).uid, request.session_id)
        return self.converter().session(session, sessions)

    @unary
    async def CloneSession(self, request: pb.SessionRef,
                           context: grpc.aio.ServicerContext) -> pb.Session:
        sessions = self.daemon.sessions
        copy = sessions.clone(self.caller_of(context).uid, request.session_id)
        return self.converter().session(copy, sessions)

    @unary
    async def DeleteSession(self, request: pb.SessionRef,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        self.daemon.sessions.delete(self.caller_of(context).uid, request.session_id)
        return pb.DeleteSessionResponse()

    @streaming
    async def SessionTurn(self, request: pb.SessionTurnRequest,
                          context: grpc.aio.ServicerContext,
                          ) -> AsyncIterator[pb.GenerateResponse]:
        conv, sessions, caller = self.converter(), self.daemon.sessions, self.caller_of(context)
        session = sessions.get(caller.uid, request.session_id)
        with sessions.turn(session):
            plan = sessions.plan(session, conv.session_turn(request), conv.tasks,
                                 origin(request.priority, caller, deadline_of(context)))
            gate, first = ReplyGate(plan.tool_choice != "none"), True
            async for msg in self._generate(conv, plan.request):
                if msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                    text, ids = gate.push(msg.text, msg.token_ids)  # a tool call is held
                    if text:
                        out = pb.GenerateResponse(text=text, token_ids=ids)
                        if first:  # the model on the first message streamed
                            out.model.CopyFrom(conv.model_info())
                            first = False
                        yield out
                    continue
                text, ids = gate.rest()
                msg.text = text
                msg.token_ids.extend(ids)
                conv.turn_finished(msg, session.id,
                                   sessions.commit(plan, gate.text, msg.usage.completion_tokens))
                yield msg

    async def _unary(self, domain: RequestBase) -> object:
        stream = await self._submit(domain)
        try:
            return await stream.result()
        finally:
            stream.cancel()

    async def _answer(self, build: Callable[[Converter], RequestBase], result: type) -> Any:
        """One request, one engine result of type `result`, one response."""
        conv = self.converter()
        event = await self._unary(build(conv))
        assert isinstance(event, result)
        return conv.reply(event)

    @unary
    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        caller, deadline = self.caller_of(context), deadline_of(context)
        return await self._answer(lambda c: c.embed(request, caller, deadline), Embeddings)

    @unary
    async def Classify(self, request: pb.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        caller, deadline = self.caller_of(context), deadline_of(context)
        return await self._answer(lambda c: c.classify(request, caller, deadline), Ranked)

    @unary
    async def PredictNext(self, request: pb.PredictNextRequest,
                          context: grpc.aio.ServicerContext) -> pb.PredictNextResponse:
        caller, deadline = self.caller_of(context), deadline_of(context)
        return await self._answer(lambda c: c.predict_next(request, caller, deadline),
                                  Predictions)

    @streaming
    async def Run(self, request: pb.RunRequest,
                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunResponse]:
        conv = self.converter()
        caller, deadline = self.caller_of(context), deadline_of(context)
        if any(i.WhichOneof("value") in MEDIA_VALUES for i in request.inputs):
            # decoding images and audio takes milliseconds: keep it off the event loop
            domain = await asyncio.to_thread(conv.run, request, caller, deadline)
            conv = self.converter()  # the answer names the image serving now (after a swap)
        else:
            domain = conv.run(request, caller, deadline)
        if isinstance(domain, MediaRequest):
            async for run_msg in self._media(conv, domain):
                yield run_msg
            return
        if isinstance(domain, GenerateRequest):
            async for msg in self._generate(conv, domain):
                yield conv.run_response(msg)
            return
        event = await self._unary(domain)
        if not isinstance(event, (Embeddings, Ranked, Predictions)):
            raise Internal(f"task {request.task!r} produced an unexpected result")
        yield conv.run_response(conv.reply(event))

    async def _media(self, conv: Converter, domain: MediaRequest) -> AsyncIterator[pb.RunResponse]:
        """A media task: one answer (transcript, text boxes, keyword hits), or for a
        cascade the recognised text first and then the backbone's streamed answer."""
        stream = await self._submit(domain)
        try:
            async for event in stream:
                if isinstance(event, Failed):
                    raise event.error
                msg = conv.run_reply(event)
                if msg is None:
                    raise Internal(f"task {domain.task!r} produced an unexpected result")
                yield msg
        finally:
            stream.cancel()
