"""The Admin servicer, served only on the admin socket: daemon status, firmware images and
add-ons.

A thin adapter: each handler checks the caller (the kernel's uid and groups, via the admin
socket's PeerRelay: root, the daemon's own uid, or a member of `config.admin_group`),
converts the request, calls the image manager (`m4d.service.images`) or the add-on manager
(`m4d.service.addons`), and converts the answer. Errors become status codes in `m4d.server.status` (image errors through
`m4image.store.status_code_for`). Operations that change what is served (ActivateImage now,
Rollback, InstallAddon, RemoveAddon) run to completion even if the caller goes away: a swap
or an add-on change is never left half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from m4.admin.v1 import admin_pb2 as pb
from m4.admin.v1 import admin_pb2_grpc as pb_grpc
from m4image.store import ImageEntry

from m4d.engine.usage import EngineView, usage_view
from m4d.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from m4d.executor.devices import describe
from m4d.executor.memory import rss_bytes
from m4d.requests import Priority
from m4d.server.identity import PeerLookup, peer_from_context
from m4d.server.status import streaming, unary
from m4d.service.addons import AddonManager, AddonView
from m4d.service.daemon import Daemon
from m4d.service.images import ImageManager, InstallProgress

_STATES = {"loading": pb.DAEMON_STATE_LOADING, "ready": pb.DAEMON_STATE_READY,
           "draining": pb.DAEMON_STATE_DRAINING}
_CLASSES = {p: p.name.lower() for p in Priority}  # system, foreground, background
_IMAGE_STATES = {"installed": pb.IMAGE_STATE_INSTALLED, "active": pb.IMAGE_STATE_ACTIVE,
                 "previous": pb.IMAGE_STATE_PREVIOUS, "trial": pb.IMAGE_STATE_TRIAL}


def _timestamp(text: str) -> Timestamp:
    ts = Timestamp()
    with contextlib.suppress(ValueError):  # an unparsable time stays unset, the listing works
        ts.FromJsonString(text)
    return ts


def image_info(e: ImageEntry) -> pb.ImageInfo:
    return pb.ImageInfo(digest=e.digest, name=e.name, version=e.version,
                        security_version=e.security_version, compatible=e.compatible,
                        size_bytes=e.size, signed_by=e.signed_by or "",
                        installed_at=_timestamp(e.installed_at), state=_IMAGE_STATES[e.state])


def addon_info(view: AddonView) -> pb.AddonInfo:
    e, m = view.entry, view.manifest
    out = pb.AddonInfo(name=e.name, version=e.version, digest=e.digest, base_digest=e.base,
                       size_bytes=e.size, signed_by=e.signed_by or "",
                       installed_at=_timestamp(e.installed_at), applies=view.applies,
                       reason=view.reason)
    if m is None:
        return out
    out.tasks.extend(pb.AddonTask(id=t["id"], rpc=t["rpc"], description=t["description"],
                                  adapter=t.get("adapter") or "") for t in m.tasks)
    for name, spec in m.components.items():
        out.components.append(pb.AddonComponent(
            name=name, kind=spec["kind"], module=spec["module"], rank=spec.get("rank", 0),
            alpha=spec.get("alpha", 0.0), targets=spec.get("targets", []),
            labels=spec.get("labels", []), metrics=flat_numbers(spec.get("metrics", {})),
            served_as=view.served_as.get(name, "")))
    return out


def flat_numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a JSON object, by dotted key ({"a": {"b": 1}} -> {"a.b": 1.0})."""
    if isinstance(tree, bool):
        return {}
    if isinstance(tree, (int, float)):
        return {prefix: float(tree)}
    if not isinstance(tree, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in tree.items():
        out.update(flat_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class AdminServicer(pb_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, daemon: Daemon, images: ImageManager | None,
                 peers: PeerLookup | None = None, addons: AddonManager | None = None) -> None:
        self.daemon = daemon
        self.image_manager = images  # None when the daemon serves a directory, not a store
        self.addon_manager = addons  # likewise
        self.peers = peers  # the admin socket's PeerRelay: who is behind each connection

    # ---- who may call --------------------------------------------------------------

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Root, the daemon's own uid, or a member of the admin group; nobody else.

        Without a relay (a servicer built without one) the socket's mode is the only gate."""
        if self.peers is None:
            return
        peer = peer_from_context(context, self.peers)
        if peer is None:
            raise PermissionDenied("the caller's identity is unknown (the connection did not "
                                   "come through the admin socket); connect to the admin socket")
        if peer.uid in (0, os.geteuid()):
            return
        group = self.daemon.config.admin_group
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            gid = None
        if gid is not None and peer.in_group(gid):
            return
        raise PermissionDenied(
            f"uid {peer.uid} may not administer m4d: run as root or as a member of the "
            f"{group!r} group (config admin_group)")

    def images(self) -> ImageManager:
        if self.image_manager is None:
            raise FailedPrecondition(
                f"this daemon serves the image directory {self.daemon.config.image} as it is "
                "(image_source = \"image\"), without an image store; start m4d with "
                "--state-dir DIR (or image_source = \"store\") to install and activate images")
        return self.image_manager

    def addons(self) -> AddonManager:
        if self.addon_manager is None:
            raise FailedPrecondition(
                f"this daemon serves the image directory {self.daemon.config.image} as it is "
                "(image_source = \"image\"), without a state directory for add-ons; start m4d "
                "with --state-dir DIR (or image_source = \"store\") to install add-ons")
        return self.addon_manager

    # ---- status --------------------------------------------------------------------

    @unary
    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        self.authorize(context)
        d = self.daemon
        out = pb.StatusResponse(
            daemon_version=d.version, state=_STATES[d.state.value],
            uptime_seconds=d.uptime, memory_rss_bytes=rss_bytes(),
            threads=torch.get_num_threads(), image_operation=d.operation)
        if d.image is not None:
            out.image_name = d.image.manifest.name
            out.image_version = d.image.manifest.version
            out.image_digest = d.image.digest
        if d.engine is not None:
            s = d.engine.snapshot()
            out.requests_in_flight = s.stats.in_flight
            out.requests_total = s.stats.total
            out.requests_cancelled = s.stats.cancelled
            out.requests_stalled = s.stats.stalled
            out.requests_rejected = s.stats.rejected
            out.tokens_generated = s.stats.tokens_generated
            out.tokens_prompted = s.stats.tokens_prompted
            out.prefix_cache_tokens = d.engine.prefixes.cache.tokens
            out.prefix_tokens_reused = d.engine.prefixes.cache.tokens_reused
            out.active_sequences = s.active_sequences
            out.kv_slots = s.kv_slots
            view = usage_view(s, d.engine.recent)
            out.load.CopyFrom(engine_load(view))
            out.uids.extend(uid_usage(view))
            if d.runtime is not None:
                m = d.runtime.memory(d.engine.scheduler.kv_capacity(d.runtime.max_context))
                out.memory.CopyFrom(pb.MemoryUsage(
                    rss_bytes=m.rss, weights_mapped_bytes=m.weights_mapped,
                    weights_mapped_resident_bytes=m.weights_mapped_resident,
                    weights_converted_bytes=m.weights_converted, kv_resident_bytes=m.kv_resident,
                    kv_reserved_bytes=m.kv_reserved, kv_budget_bytes=m.kv_budget,
                    runtime_bytes=m.runtime))
        if d.runtime is not None:
            for c in d.runtime.components:
                out.components.append(pb.ComponentStatus(
                    name=c.name, kind=c.kind, parameters=c.parameters,
                    weight_format=c.weight_format, compute_dtype=c.compute_dtype,
                    device=c.device, kernels=c.kernels))
            executors = {str(d.runtime.device): f"m4-executor-{d.runtime.device}"}  # step loop
            if d.engine is not None:
                executors.update((dev, ex.thread_name) for dev, ex in d.engine.executors.items())
            for row in describe(d.runtime.registry, d.runtime.placement):
                out.devices.append(pb.DeviceStatus(
                    executor=executors.get(row["name"], "") if row["components"] else "", **row))
        return out

    # ---- images --------------------------------------------------------------------

    @streaming
    async def InstallImage(self, request_iterator: AsyncIterator[pb.InstallImageRequest],
                           context: grpc.aio.ServicerContext,
                           ) -> AsyncIterator[pb.InstallImageResponse]:
        self.authorize(context)
        images = self.images()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "options":
            raise InvalidArgument("an install stream starts with one InstallOptions message, "
                                  "then the tar's bytes in chunk messages")
        options = first.options

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("InstallOptions may only be sent once, first")
                yield message.chunk

        async for update in images.install(chunks(), total_bytes=options.total_bytes,
                                           allow_downgrade=options.allow_downgrade,
                                           activate=options.activate):
            if isinstance(update, InstallProgress):
                yield pb.InstallImageResponse(progress=pb.InstallProgress(
                    stage=update.stage, received_bytes=update.received_bytes,
                    total_bytes=update.total_bytes, written_bytes=update.written_bytes,
                    image_bytes=update.image_bytes))
            else:
                yield pb.InstallImageResponse(image=image_info(update))

    @unary
    async def ListImages(self, request: pb.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListImagesResponse:
        self.authorize(context)
        listing = await self.images().listing()
        out = pb.ListImagesResponse(
            images=[image_info(e) for e in listing.images],
            trial_attempts=listing.status.attempts,
            max_trial_attempts=self.daemon.config.max_boot_attempts,
            max_security_version=listing.status.max_security_version,
            trial_digest=listing.status.trial or "")
        if request.include_history:
            out.history.extend(
                pb.StoreEvent(time=_timestamp(h.get("time", "")), event=h.get("event", ""),
                              digest=h.get("digest") or "", detail=h.get("detail", ""))
                for h in listing.history)
        return out

    @unary
    async def ActivateImage(self, request: pb.ActivateImageRequest,
                            context: grpc.aio.ServicerContext) -> pb.ActivateImageResponse:
        self.authorize(context)
        if not request.image:
            raise InvalidArgument("name the image to activate: a digest (or 8+ hex digits of "
                                  "it), a version, or name@version")
        entry = await _complete(self.images().activate(
            request.image, allow_downgrade=request.allow_downgrade, now=request.now))
        return pb.ActivateImageResponse(image=image_info(entry))

    @unary
    async def MarkGood(self, request: pb.MarkGoodRequest,
                       context: grpc.aio.ServicerContext) -> pb.MarkGoodResponse:
        self.authorize(context)
        entry = await self.images().mark_good(request.image)
        return pb.MarkGoodResponse(image=image_info(entry))

    @unary
    async def Rollback(self, request: pb.RollbackRequest,
                       context: grpc.aio.ServicerContext) -> pb.RollbackResponse:
        self.authorize(context)
        active, previous = await _complete(
            self.images().rollback(allow_downgrade=request.allow_downgrade))
        out = pb.RollbackResponse(active=image_info(active))
        if previous is not None:
            out.previous.CopyFrom(image_info(previous))
        return out

    @unary
    async def RemoveImage(self, request: pb.RemoveImageRequest,
                          context: grpc.aio.ServicerContext) -> pb.RemoveImageResponse:
        self.authorize(context)
        if not request.image:
            raise InvalidArgument("name the image to remove (digest, prefix or version)")
        return pb.RemoveImageResponse(digest=await self.images().remove(request.image))


    # ---- add-ons -------------------------------------------------------------------

    @unary
    async def InstallAddon(self, request_iterator: AsyncIterator[pb.InstallAddonRequest],
                           context: grpc.aio.ServicerContext) -> pb.InstallAddonResponse:
        self.authorize(context)
        addons = self.addons()

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                yield message.chunk

        change = await _complete(addons.install(chunks()))
        out = pb.InstallAddonResponse(addon=addon_info(change.view),
                                      calls_finishing=change.finishing, changed=change.changed)
        if change.replaced is not None:
            out.replaced.CopyFrom(addon_info(AddonView(change.replaced, None, False, "replaced")))
        return out

    @unary
    async def ListAddons(self, request: pb.ListAddonsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListAddonsResponse:
        self.authorize(context)
        views = await self.addons().listing()
        image = self.daemon.image
        return pb.ListAddonsResponse(addons=[addon_info(v) for v in views],
                                     image_digest=image.digest if image is not None else "")

    @unary
    async def RemoveAddon(self, request: pb.RemoveAddonRequest,
                          context: grpc.aio.ServicerContext) -> pb.RemoveAddonResponse:
        self.authorize(context)
        if not request.name:
            raise InvalidArgument("name the add-on to remove (`m4ctl adapter list` shows them)")
        change = await _complete(self.addons().remove(request.name))
        return pb.RemoveAddonResponse(addon=addon_info(change.view),
                                      calls_finishing=change.finishing)


def engine_load(view: EngineView) -> pb.EngineLoad:
    return pb.EngineLoad(
        queues=[pb.ClassQueue(priority_class=_CLASSES.get(k, str(k)), depth=n)
                for k, n in sorted(view.queue_depth.items())],
        running_sequences=view.running_sequences, decode_batch_size=view.decode_batch,
        kv_blocks_used=view.kv_blocks_used, kv_blocks_total=view.kv_blocks_total,
        decode_tokens_per_second=view.decode_tokens_per_second,
        ttft_p50_ms=view.ttft_p50_ms, ttft_p99_ms=view.ttft_p99_ms,
        ttft_samples=view.ttft_samples, window_seconds=view.window_seconds,
        uid_limits=pb.UidLimits(
            max_in_flight=view.limits.max_in_flight, max_queued=view.limits.max_queued,
            max_running=view.limits.max_running,
            max_tokens_in_flight=view.limits.max_tokens_in_flight),
        paused_sequences=view.paused_sequences)


def uid_usage(view: EngineView) -> list[pb.UidUsage]:
    return [pb.UidUsage(
        uid=u.uid, user=u.user, apps=u.apps, requests_ok=u.requests_ok,
        requests_failed=u.requests_failed, requests_rejected=u.requests_rejected,
        tokens_in=u.tokens_in, tokens_out=u.tokens_out, tokens_per_second=u.tokens_per_second,
        in_flight=u.in_flight, queued=u.queued,
        priority_class=_CLASSES[u.priority] if u.priority is not None else "",
        running=u.running, tokens_in_flight=u.tokens_in_flight, preempted=u.preempted,
        stalled=u.stalled)
        for u in view.uids]


async def _complete(operation: Any) -> Any:
    """Runs an operation to its end even if the caller's RPC is cancelled meanwhile."""
    task = asyncio.ensure_future(operation)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved if orphaned
    return await asyncio.shield(task)
