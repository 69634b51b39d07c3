"""The Inference servicer: a thin adapter from gRPC calls to engine requests.

Each handler validates and converts the request (`convert`), submits it to the engine,
and converts the engine's events back. When the client goes away, the handler's
CancelledError cancels the request in the engine, which frees its KV row within a step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from m4.inference.v1 import inference_pb2 as pb
from m4.inference.v1 import inference_pb2_grpc as pb_grpc

from m4d.engine.engine import RequestStream
from m4d.errors import Internal
from m4d.requests import (
    Caller,
    Embeddings,
    Failed,
    Finished,
    GenerateRequest,
    KeywordsHeard,
    MediaRequest,
    Predictions,
    Ranked,
    RequestBase,
    SourceText,
    TextDelta,
    TextRead,
    Transcribed,
)
from m4d.server.identity import PeerLookup, caller_from_context
from m4d.server.status import streaming, unary

if TYPE_CHECKING:
    from m4d.service.daemon import Daemon


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

    async def _submit(self, request: RequestBase) -> RequestStream:
        return self.daemon.engine_for_requests().submit(request)

    @unary
    async def ListTasks(self, request: pb.ListTasksRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        return self.daemon.converter().task_table()

    @streaming
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        conv = self.daemon.converter()
        domain = conv.generate(request, self.caller_of(context), deadline_of(context))
        async for msg in self._generate(domain):
            yield msg

    async def _generate(self, domain: GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        conv = self.daemon.converter()
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

    async def _unary(self, domain: RequestBase) -> object:
        stream = await self._submit(domain)
        try:
            return await stream.result()
        finally:
            stream.cancel()

    @unary
    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        conv = self.daemon.converter()
        event = await self._unary(
            conv.embed(request, self.caller_of(context), deadline_of(context)))
        assert isinstance(event, Embeddings)
        return conv.embeddings(event)

    @unary
    async def Classify(self, request: pb.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        conv = self.daemon.converter()
        event = await self._unary(
            conv.classify(request, self.caller_of(context), deadline_of(context)))
        assert isinstance(event, Ranked)
        return conv.ranked(event)

    @unary
    async def PredictNext(self, request: pb.PredictNextRequest,
                          context: grpc.aio.ServicerContext) -> pb.PredictNextResponse:
        conv = self.daemon.converter()
        event = await self._unary(
            conv.predict_next(request, self.caller_of(context), deadline_of(context)))
        assert isinstance(event, Predictions)
        return conv.predictions(event)

    @streaming
    async def Run(self, request: pb.RunRequest,
                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunResponse]:
        conv = self.daemon.converter()
        caller, deadline = self.caller_of(context), deadline_of(context)
        if any(i.WhichOneof("value") in ("image", "audio", "pcm", "tensor") for i in request.inputs):
            # decoding images and audio takes milliseconds: keep it off the event loop
            domain = await asyncio.to_thread(conv.run, request, caller, deadline)
        else:
            domain = conv.run(request, caller, deadline)
        if isinstance(domain, MediaRequest):
            async for run_msg in self._media(domain):
                yield run_msg
            return
        if isinstance(domain, GenerateRequest):
            async for msg in self._generate(domain):
                yield conv.run_response(msg)
            return
        event = await self._unary(domain)
        if isinstance(event, Embeddings):
            yield conv.run_response(conv.embeddings(event))
        elif isinstance(event, Ranked):
            yield conv.run_response(conv.ranked(event))
        elif isinstance(event, Predictions):
            yield conv.run_response(conv.predictions(event))
        else:
            raise Internal(f"task {request.task!r} produced an unexpected result")

    async def _media(self, domain: MediaRequest) -> AsyncIterator[pb.RunResponse]:
        """A media task: one answer (transcript, text boxes, keyword hits), or for a
        cascade the recognised text first and then the backbone's streamed answer."""
        conv = self.daemon.converter()
        stream = await self._submit(domain)
        try:
            async for event in stream:
                if isinstance(event, (Transcribed, TextRead, KeywordsHeard, SourceText)):
                    yield conv.media_event(event)
                elif isinstance(event, Ranked):
                    yield conv.run_response(conv.ranked(event))
                elif isinstance(event, Embeddings):
                    yield conv.run_response(conv.embeddings(event))
                elif isinstance(event, TextDelta):
                    yield conv.run_response(conv.delta(event))
                elif isinstance(event, Finished):
                    yield conv.run_response(conv.finished(event))
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    raise Internal(f"task {domain.task!r} produced an unexpected result")
        finally:
            stream.cancel()
