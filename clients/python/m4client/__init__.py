"""m4client: the Python client of m4d, the daemon that serves the M4 model on the device.

    from m4client import Client

    with Client(app_name="notes") as m4:
        print(m4.complete("The capital of France is", max_tokens=8).text)
        print(m4.embed(["hello", "world"]).numpy().shape)

`Client` (sync) and `AsyncClient` (asyncio) call the app socket, `AdminClient` and
`AsyncAdminClient` the admin socket. Results are the dataclasses of `m4client.types`; every
failure is an `M4Error` whose `.code` is the gRPC status code name.
"""

from __future__ import annotations

from ._addons import AddonChange, AddonComponent, AddonInfo, AddonList, AddonTask
from ._channel import (
    ADDRESS_ENV,
    ADMIN_ADDRESS_ENV,
    APP_NAME_METADATA,
    DEFAULT_ADDRESS,
    DEFAULT_ADMIN_ADDRESS,
    resolve_address,
    to_target,
)
from ._images import ImageInfo, ImageList, InstallProgress, StoreEvent
from ._session import AsyncSession, Session
from ._stream import AsyncStream, Stream
from .aio import AsyncAdminClient, AsyncClient
from .client import AdminClient, Client
from .errors import (
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    M4Error,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from .status import (
    ComponentStatus,
    DaemonStatus,
    DeviceStatus,
    EngineLoad,
    MemoryUsage,
    UidLimits,
    UidUsage,
)
from .types import (
    Audio,
    AudioInput,
    ChatInput,
    ChatMessage,
    ClassifyResult,
    EmbedResult,
    FinishReason,
    GenerationChunk,
    GenerationResult,
    Image,
    ImageInput,
    IOSpec,
    KeywordHit,
    LabelScore,
    ModelInfo,
    Overflow,
    PcmAudio,
    PredictNextResult,
    Priority,
    RunChunk,
    RunResult,
    SessionContext,
    SessionInfo,
    Task,
    TaskTable,
    Tensor,
    TextBox,
    Timings,
    TokenCount,
    Tool,
    ToolCall,
    Usage,
    WordPrediction,
)

__all__ = [
    "ADDRESS_ENV",
    "ADMIN_ADDRESS_ENV",
    "APP_NAME_METADATA",
    "DEFAULT_ADDRESS",
    "DEFAULT_ADMIN_ADDRESS",
    "AddonChange",
    "AddonComponent",
    "AddonInfo",
    "AddonList",
    "AddonTask",
    "AdminClient",
    "AsyncAdminClient",
    "AsyncClient",
    "AsyncSession",
    "AsyncStream",
    "Audio",
    "AudioInput",
    "CallCancelledError",
    "ChatInput",
    "ChatMessage",
    "ClassifyResult",
    "Client",
    "ComponentStatus",
    "DaemonStatus",
    "DeadlineExceededError",
    "DeviceStatus",
    "EmbedResult",
    "EngineLoad",
    "FailedPreconditionError",
    "FinishReason",
    "GenerationChunk",
    "GenerationResult",
    "IOSpec",
    "Image",
    "ImageInfo",
    "ImageInput",
    "ImageList",
    "InstallProgress",
    "InvalidArgumentError",
    "KeywordHit",
    "LabelScore",
    "M4Error",
    "MemoryUsage",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "Overflow",
    "PcmAudio",
    "PermissionDeniedError",
    "PredictNextResult",
    "Priority",
    "ResourceExhaustedError",
    "RunChunk",
    "RunResult",
    "Session",
    "SessionContext",
    "SessionInfo",
    "StoreEvent",
    "Stream",
    "Task",
    "TaskTable",
    "Tensor",
    "TextBox",
    "Timings",
    "TokenCount",
    "Tool",
    "ToolCall",
    "UidLimits",
    "UidUsage",
    "UnavailableError",
    "Usage",
    "WordPrediction",
    "resolve_address",
    "to_target",
]
