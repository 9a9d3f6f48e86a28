"""The orchestrator-runner protocol (spec/RUNNER.md), sans-I/O: messages, codec, grants.

A runner is the process that holds warm models and runs jobs; the
orchestrator talks to it over one WebSocket, with frames built like the
network's (a msgpack map with `v` and `type`) and the same field codecs. The
one rule that matters for money is the grant: a runner runs step k of a job
only once the orchestrator has granted steps 1..k (`StepGrant`), which the
orchestrator does only as credit covers them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgpack

from protocol.codec import _struct_codec, _unpack
from protocol.errors import ErrorCode, ProtocolError
from protocol.fields import Added, Float, Items, JobId, ModelId, Name, Str, UInt32, UInt64
from protocol.messages import MAX_FRAMES, Gain, JobRequest, Latents, Preview, ResultImage

RUNNER_PROTOCOL_VERSION = 2
AUTH_HEADER = "Authorization"
"""Handshake header carrying `Bearer <token>` (spec/RUNNER.md 2)."""
Message = Any
Code = Annotated[str, Str(1, 64)]
Text = Annotated[str, Str(0, 1024)]


@dataclass(frozen=True)
class ModelState:
    """A model loaded on a runner, with what loading it cost."""

    model_id: ModelId
    family: Name
    pipelines: Annotated[tuple[Name, ...], Items(0, 16)]
    load_seconds: Annotated[float, Float(0.0, 1e6)]
    footprint_bytes: UInt64
    """Memory the model holds on the runner's device, measured at load."""
    resume_scheduler: Annotated[str, Str(0, 64)] = ""
    """The scheduler a job of this model resumes with (PROTOCOL.md 15); empty: none."""
    step_seconds: Annotated[Annotated[float, Float(0.0, 1e6)] | None, Added()] = None
    """One warm step of the reference job, timed at load (RUNNER.md 5.1); None: not timed."""
    step_pixels: Annotated[UInt64, Added()] = 0
    """Pixels of that step: the model's default size, times its frames."""
    batch_gains: Annotated[tuple[Gain, ...], Items(0, 3), Added()] = ()
    """Throughput at batch 2, 4, 8 over batch 1, timed at load up to the Load's max_batch."""
    max_batch: Annotated[UInt32, Added()] = 1
    """The batch the runner runs (RUNNER.md 5.2): 1 unless a gain paid and bytes matched."""


# ----------------------------------------------------- runner -> orchestrator


@dataclass(frozen=True)
class Ready:
    """First frame from a runner: its device, memory pool, and the models it holds."""

    TYPE: ClassVar[str] = "ready"
    device: Name
    memory_bytes: UInt64
    """The pool models are placed in: GPU memory, or a CPU budget."""
    models: Annotated[tuple[ModelState, ...], Items(0, 256)]
    agent: Annotated[str, Str(0, 128)] = ""
    gpu: Annotated[str, Str(0, 128), Added()] = ""
    """The GPU's model name; empty on the CPU."""
    vram_bytes: Annotated[UInt64, Added()] = 0
    """The GPU's whole memory (not a budget); 0 on the CPU."""


@dataclass(frozen=True)
class Loaded:
    TYPE: ClassVar[str] = "loaded"
    model: ModelState


@dataclass(frozen=True)
class Unloaded:
    TYPE: ClassVar[str] = "unloaded"
    model_id: ModelId


@dataclass(frozen=True)
class LoadFailed:
    TYPE: ClassVar[str] = "load_failed"
    model_id: ModelId
    code: Code
    message: Text


@dataclass(frozen=True)
class Planned:
    """Steps the job will execute on this model (its scheduler decides), before acceptance."""

    TYPE: ClassVar[str] = "planned"
    job_id: JobId
    steps: UInt32


@dataclass(frozen=True)
class Awaiting:
    """The job is paused before `next_step`: it has not been granted."""

    TYPE: ClassVar[str] = "awaiting"
    job_id: JobId
    next_step: UInt32


@dataclass(frozen=True)
class Begin:
    """Step `step` starts now; it was granted.

    `waited_us`: how long the step, ready to run, waited for its grant (0 when the
    grant was already there), so that O can tell whether money ever held the device.
    """

    TYPE: ClassVar[str] = "begin"
    job_id: JobId
    step: UInt32
    waited_us: Annotated[UInt32, Added()] = 0


@dataclass(frozen=True)
class Done:
    """Step `step` is complete (its preview, if any, was sent just before).

    `latents` (the state after the step) when the job asked for them and the
    model can resume, so that another orchestrator can continue from here.
    """

    TYPE: ClassVar[str] = "done"
    job_id: JobId
    step: UInt32
    latents: Latents | None = None


@dataclass(frozen=True)
class RunnerPreview:
    TYPE: ClassVar[str] = "preview"
    preview: Preview


@dataclass(frozen=True)
class OutputFrame:
    """One frame of a video job's output, sent ahead of its `output`, one message each."""

    TYPE: ClassVar[str] = "output_frame"
    job_id: JobId
    index: UInt32
    frame: ResultImage


@dataclass(frozen=True)
class Output:
    """The job's images, or the end of a video's frames (sent before it, in order)."""

    TYPE: ClassVar[str] = "output"
    job_id: JobId
    images: Annotated[tuple[ResultImage, ...], Items(0, MAX_FRAMES)]
    video: bool = False
    fps: UInt32 = 0
    frames: UInt32 = 0
    """Video jobs: how many `output_frame` messages came before this one."""


@dataclass(frozen=True)
class Working:
    """The job is alive in a phase without steps (decoding frames, encoding output)."""

    TYPE: ClassVar[str] = "working"
    job_id: JobId
    phase: Name
    next_within_ms: UInt32


@dataclass(frozen=True)
class Failed:
    """The job (or its plan) ended on the runner: `code` is a protocol error code."""

    TYPE: ClassVar[str] = "failed"
    job_id: JobId
    code: Code
    message: Text


# ----------------------------------------------------- orchestrator -> runner


@dataclass(frozen=True)
class Load:
    TYPE: ClassVar[str] = "load"
    model_id: ModelId
    max_batch: Annotated[UInt32, Added()] = 1
    """Jobs the runner may run as one batch (RUNNER.md 5.2); 1: never batched."""
    batch_wait_ms: Annotated[UInt32, Added()] = 0
    """How long a job waits for others to batch with, when batching is on."""


@dataclass(frozen=True)
class Unload:
    TYPE: ClassVar[str] = "unload"
    model_id: ModelId


@dataclass(frozen=True)
class Plan:
    TYPE: ClassVar[str] = "plan"
    request: JobRequest


@dataclass(frozen=True)
class Run:
    """Start a job; steps 1..granted may run at once."""

    TYPE: ClassVar[str] = "run"
    request: JobRequest
    seed: UInt32
    granted: UInt32 = 0


@dataclass(frozen=True)
class Grant:
    """Steps 1..granted of the job may run; never lower than an earlier grant."""

    TYPE: ClassVar[str] = "grant"
    job_id: JobId
    granted: UInt32


@dataclass(frozen=True)
class Stop:
    """End the job before its next step, answering `failed` with this code."""

    TYPE: ClassVar[str] = "stop"
    job_id: JobId
    code: Code
    message: Text = ""


FROM_RUNNER: dict[str, type] = {
    c.TYPE: c
    for c in (Ready, Loaded, Unloaded, LoadFailed, Planned, Awaiting, Begin, Done, RunnerPreview)
}
FROM_RUNNER.update({c.TYPE: c for c in (OutputFrame, Output, Working, Failed)})
TO_RUNNER: dict[str, type] = {c.TYPE: c for c in (Load, Unload, Plan, Run, Grant, Stop)}


def encode(message: Message) -> bytes:
    """One runner-protocol frame."""
    if not dataclasses.is_dataclass(message) or not hasattr(message, "TYPE"):
        raise TypeError(f"not a runner message: {message!r}")
    body = _struct_codec(type(message))[0](message)
    frame = {"v": RUNNER_PROTOCOL_VERSION, "type": message.TYPE, **body}
    return msgpack.packb(frame, use_bin_type=True)


def decode(frame: bytes | str, types: dict[str, type]) -> Message:
    """Parse a frame into one of `types` (FROM_RUNNER or TO_RUNNER), or raise ProtocolError."""
    if not isinstance(frame, bytes):
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "runner frames are binary")
    try:
        raw = _unpack(frame)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"not one msgpack value: {exc}") from None
    if type(raw) is not dict or raw.get("v") != RUNNER_PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "expected a map with v = 1")
    name = raw.get("type")
    cls = types.get(name) if type(name) is str else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown runner message {name!r:.80}")
    return _struct_codec(cls)[1](raw, name)


@dataclass
class StepGrant:
    """Runner-side gate of one job: which steps were granted, and whether it must stop.

    `admit(k)` is the runner's only way into step k: it answers True only
    for the next step in order and only once it is granted.
    """

    granted: int = 0
    started: int = 0
    stop: Stop | None = None

    def grant(self, upto: int) -> None:
        if upto < self.granted:
            raise ProtocolError(
                ErrorCode.INVALID_FIELD, f"grant {upto} is below the earlier {self.granted}"
            )
        self.granted = upto

    def may_start(self, step: int) -> bool:
        return self.stop is None and step == self.started + 1 and step <= self.granted

    def admit(self, step: int) -> bool:
        """Record step `step` as started if it may start; False means wait (or stop)."""
        if not self.may_start(step):
            return False
        self.started = step
        return True


__all__ = [
    "AUTH_HEADER",
    "FROM_RUNNER",
    "RUNNER_PROTOCOL_VERSION",
    "TO_RUNNER",
    "Awaiting",
    "Begin",
    "Done",
    "Failed",
    "Grant",
    "Load",
    "LoadFailed",
    "Loaded",
    "ModelState",
    "Output",
    "OutputFrame",
    "Plan",
    "Planned",
    "Ready",
    "Run",
    "RunnerPreview",
    "Stop",
    "StepGrant",
    "Unload",
    "Unloaded",
    "Working",
    "decode",
    "encode",
]
