"""The messages of stepstream wire version 1, as frozen dataclasses.

Each message class has a ``TYPE`` (its name on the wire) and a ``SENDER``
(which role may send it). Field annotations carry the codec's constraints;
spec/PROTOCOL.md section 4 is the normative table of the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import Annotated, ClassVar

from protocol.fields import (
    U256,
    Added,
    Address,
    Bin,
    Float,
    Hash32,
    Int,
    Items,
    JobId,
    KeyedBy,
    ModelId,
    Name,
    Str,
    UInt32,
    UInt64,
)

PROTOCOL_VERSION = 1
"""The wire version every frame carries in its ``v`` key (spec v0.1)."""

MAX_PREVIEW_BYTES = 1 << 20
MAX_IMAGE_BYTES = 12 << 20
MAX_FRAMES = 128
"""Most video frames a job may ask for and a result may carry."""
MAX_LATENTS_BYTES = 4 << 20
"""Latents of the largest job (4 Mpx: 4 x 512 x 512 float32 values) fit with room to spare."""


class Role(StrEnum):
    BROADCASTER = "broadcaster"
    ORCHESTRATOR = "orchestrator"


class Message:
    """Base of all messages; subclasses are frozen dataclasses."""

    TYPE: ClassVar[str]
    SENDER: ClassVar[frozenset[Role]]


Gain = Annotated[float, Float(0.0, 1e6)]
"""A throughput ratio (a batch's over one job's)."""

B = frozenset({Role.BROADCASTER})
O = frozenset({Role.ORCHESTRATOR})  # noqa: E741 - the spec's name for the role
BOTH = B | O


# ---------------------------------------------------------------- structures


@dataclass(frozen=True)
class TextToImageParams:
    """Text-to-image request, with ai-runner's field names and defaults."""

    prompt: Annotated[str, Str(1, 4000)]
    negative_prompt: Annotated[str, Str(0, 4000)] = ""
    width: Annotated[int, Int(8, 4096)] = 1024
    height: Annotated[int, Int(8, 4096)] = 576
    guidance_scale: Annotated[float, Float(0.0, 50.0)] = 7.5
    num_inference_steps: Annotated[int, Int(1, 1000)] = 50
    seed: Annotated[int, Int(0, 2**32 - 1)] | None = None
    num_images_per_prompt: Annotated[int, Int(1, 16)] = 1

    PIPELINE: ClassVar[str] = "text-to-image"


@dataclass(frozen=True)
class ImageToImageParams:
    """Image-to-image request, with ai-runner's names and defaults.

    The output has the input image's size. `image` is optional on the wire so
    that a request without one is refused as a job (invalid_request), not as
    a broken frame.
    """

    prompt: Annotated[str, Str(1, 4000)]
    image: Annotated[bytes, Bin(1, MAX_IMAGE_BYTES)] | None = None
    """The input image, PNG, JPEG or WebP bytes."""
    negative_prompt: Annotated[str, Str(0, 4000)] = ""
    strength: Annotated[float, Float(0.0, 1.0)] = 0.8
    guidance_scale: Annotated[float, Float(0.0, 50.0)] = 7.5
    num_inference_steps: Annotated[int, Int(1, 1000)] = 100
    seed: Annotated[int, Int(0, 2**32 - 1)] | None = None
    num_images_per_prompt: Annotated[int, Int(1, 16)] = 1

    PIPELINE: ClassVar[str] = "image-to-image"


@dataclass(frozen=True)
class ImageToVideoParams:
    """Image-to-video (Stable Video Diffusion) request, with ai-runner's names and defaults."""

    image: Annotated[bytes, Bin(1, MAX_IMAGE_BYTES)] | None = None
    """The conditioning image, PNG, JPEG or WebP bytes; resized to width x height."""
    width: Annotated[int, Int(8, 4096)] = 1024
    height: Annotated[int, Int(8, 4096)] = 576
    fps: Annotated[int, Int(1, 120)] = 6
    motion_bucket_id: Annotated[int, Int(0, 1023)] = 127
    noise_aug_strength: Annotated[float, Float(0.0, 10.0)] = 0.02
    num_inference_steps: Annotated[int, Int(1, 1000)] = 25
    seed: Annotated[int, Int(0, 2**32 - 1)] | None = None
    num_frames: Annotated[int, Int(1, MAX_FRAMES)] = 25

    PIPELINE: ClassVar[str] = "image-to-video"


@dataclass(frozen=True)
class OtherParams:
    """`params` of a pipeline this version does not define: any map, contents ignored."""

    PIPELINE: ClassVar[str] = ""


JobParams = TextToImageParams | ImageToImageParams | ImageToVideoParams | OtherParams
PARAMS_BY_PIPELINE: dict[str, type] = {
    cls.PIPELINE: cls for cls in (TextToImageParams, ImageToImageParams, ImageToVideoParams)
}


@dataclass(frozen=True)
class Capability:
    """One pipeline and model an orchestrator offers, with its price."""

    pipeline: Name
    model_id: ModelId
    warm: bool
    capacity: UInt32
    in_use: UInt32
    price_per_pixel_step: Fraction
    """Wei per pixel-step (spec section 6)."""
    resume_scheduler: Annotated[str, Str(0, 64), Added()] = ""
    """The scheduler a job of this model can be resumed with (spec 15); empty: no resume."""
    load_seconds: Annotated[Annotated[float, Float(0.0, 1e6)] | None, Added()] = None
    """Measured time the model took to load (warm models, or cold ones loaded before)."""
    queued: Annotated[UInt32, Added()] = 0
    """Jobs of this capability waiting for a slot (spec 4.5)."""
    step_seconds: Annotated[Annotated[float, Float(0.0, 1e6)] | None, Added()] = None
    """The node's claim of its speed: one warm step of the reference job, timed at load."""
    step_pixels: Annotated[UInt64, Added()] = 0
    """Pixels of that reference step (the model's default size, times its frames)."""
    batch_gains: Annotated[tuple[Gain, ...], Items(0, 3), Added()] = ()
    """Throughput of a batch of 2, 4, 8 jobs over one job, measured at load (spec 4.5)."""
    max_batch: Annotated[UInt32, Added()] = 1
    """Jobs of this capability that may run as one batch; 1: never batched."""

    @property
    def claimed_pixel_steps_per_second(self) -> float | None:
        """The speed the node claims, in the unit a broadcaster measures; None: no claim."""
        if not self.step_seconds or not self.step_pixels:
            return None
        return self.step_pixels / self.step_seconds


@dataclass(frozen=True)
class Device:
    """One device of the orchestrator's runners: what it is, its memory, its warm models."""

    name: Name
    """The runner's device: `cuda:0`, `cpu`."""
    gpu: Annotated[str, Str(1, 128)]
    """The GPU's model name, or `cpu` for a runner without one."""
    vram_total: UInt64 | None = None
    """Bytes of GPU memory; nil on the CPU (it has none)."""
    vram_free: UInt64 | None = None
    """Bytes not held by the models loaded there; nil on the CPU."""
    models: Annotated[tuple[ModelId, ...], Items(0, 256)] = ()
    """Models loaded (warm) on this device."""


@dataclass(frozen=True)
class Latents:
    """A job's denoising state after a step: what another orchestrator needs to resume it."""

    scheduler: Name
    """The scheduler's class name; a resume needs the same one."""
    dtype: Name
    """float32, float16 or bfloat16; data is little-endian."""
    shape: Annotated[tuple[UInt32, ...], Items(1, 8)]
    data: Annotated[bytes, Bin(1, MAX_LATENTS_BYTES)]


@dataclass(frozen=True)
class ResumeFrom:
    """Continue a job whose first `step` steps ran elsewhere, from those steps' latents."""

    step: Annotated[int, Int(1, 999)]
    latents: Latents


@dataclass(frozen=True)
class TicketParams:
    """What the recipient issues for tickets, echoed in every payment."""

    recipient: Address
    face_value: U256
    win_prob: U256
    recipient_rand_hash: Hash32
    seed: Hash32
    expiration_block: UInt64
    creation_round: UInt64 = 0
    creation_round_block_hash: Hash32 = bytes(32)


@dataclass(frozen=True)
class SignedTicket:
    """The per-ticket part of a payment: go-livepeer's TicketSenderParams."""

    sender_nonce: UInt32
    sig: Annotated[bytes, Bin(65, 65)]


@dataclass(frozen=True)
class FirstPayment:
    """The first window's tickets, attached to a `job` (feature `first_payment`, spec 8.11)."""

    ticket_params: TicketParams
    """One of the connection's first-window parameters (`info.first_params`)."""
    tickets: Annotated[tuple[SignedTicket, ...], Items(1, 1024)]


@dataclass(frozen=True)
class ResultImage:
    image: Annotated[bytes, Bin(1, MAX_IMAGE_BYTES)]
    format: Name
    width: UInt32
    height: UInt32
    seed: UInt32
    nsfw: bool = False


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Hello(Message):
    """First frame of a connection: who the broadcaster is (its payment address)."""

    TYPE: ClassVar[str] = "hello"
    SENDER: ClassVar[frozenset[Role]] = B
    sender: Address
    agent: Annotated[str, Str(0, 128)] = ""
    features: Annotated[tuple[Name, ...], Items(0, 32), Added()] = ()
    """Optional messages B understands (spec 12.1): O sends them to no one else."""


@dataclass(frozen=True)
class Info(Message):
    """The orchestrator's advertisement: capabilities, prices, ticket parameters."""

    TYPE: ClassVar[str] = "info"
    SENDER: ClassVar[frozenset[Role]] = O
    orchestrator: Address
    capabilities: Annotated[tuple[Capability, ...], Items(0, 256)]
    ticket_params: TicketParams
    max_frame_bytes: UInt32
    agent: Annotated[str, Str(0, 128)] = ""
    devices: Annotated[tuple[Device, ...], Items(0, 64), Added()] = ()
    """The devices of O's live runners (spec 4.5)."""
    features: Annotated[tuple[Name, ...], Items(0, 32), Added()] = ()
    """Optional messages O accepts from B (spec 12.1): `info_request`."""
    first_params: Annotated[tuple[TicketParams, ...], Items(0, 16), Added()] = ()
    """Parameters for the first window of this connection's jobs, one-ticket EVs a factor
    of 4 apart (feature `first_payment`, spec 8.11); empty unless hello listed the feature."""


@dataclass(frozen=True)
class InfoRequest(Message):
    """Ask for a fresh `info` on an open connection (feature `info_request`, spec 4.5)."""

    TYPE: ClassVar[str] = "info_request"
    SENDER: ClassVar[frozenset[Role]] = B


@dataclass(frozen=True)
class JobRequest(Message):
    TYPE: ClassVar[str] = "job"
    SENDER: ClassVar[frozenset[Role]] = B
    job_id: JobId
    pipeline: Name
    model_id: ModelId
    params: Annotated[
        JobParams, KeyedBy("pipeline", tuple(PARAMS_BY_PIPELINE.items()), OtherParams)
    ]
    """The structure named by `pipeline` (spec 4.3)."""
    preview_every: Annotated[int, Int(1, 1000)] = 1
    preview_method: Name = "latent_rgb"
    preview_format: Name = "webp"
    preview_frame: Annotated[int, Int(0, MAX_FRAMES - 1)] | None = None
    """Video jobs: preview only this frame; nil previews every frame."""
    want_latents: Annotated[bool, Added()] = False
    """Ask previews to carry the latents, so the job can be resumed elsewhere (spec 15)."""
    resume: Annotated[ResumeFrom | None, Added()] = None
    first_payment: Annotated[FirstPayment | None, Added()] = None
    """The first window's payment, made against `info.first_params` (spec 8.11)."""


@dataclass(frozen=True)
class JobAccepted(Message):
    """The quote: steps, price and fee of the job, and ticket params sized to its window."""

    TYPE: ClassVar[str] = "accepted"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    steps: UInt32
    pixels_per_step: UInt64
    price_per_pixel_step: Fraction
    fee: Fraction
    window_steps: UInt32
    seed: UInt32
    ticket_params: TicketParams
    credit: Annotated[Fraction, Added()] = Fraction(0)
    """EV the job starts with: the sender's balance left by earlier jobs (spec 7.5)."""


@dataclass(frozen=True)
class Payment(Message):
    """Tickets for a job, with the parameters they were made against."""

    TYPE: ClassVar[str] = "payment"
    SENDER: ClassVar[frozenset[Role]] = B
    job_id: JobId
    sender: Address
    ticket_params: TicketParams
    tickets: Annotated[tuple[SignedTicket, ...], Items(1, 1024)]


@dataclass(frozen=True)
class Credit(Message):
    """Acknowledges a payment: the job's credit and how many steps it covers."""

    TYPE: ClassVar[str] = "credit"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    credit: Fraction
    covered_steps: UInt32
    tickets_accepted: UInt32
    winners: UInt32


@dataclass(frozen=True)
class Progress(Message):
    TYPE: ClassVar[str] = "progress"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    step: UInt32
    total_steps: UInt32
    covered_steps: UInt32
    ticket_params: TicketParams | None = None
    """Fresh parameters for this job, sent before the current ones expire (spec 8.9)."""
    latents: Annotated[Latents | None, Added()] = None
    """The job's state after this step, when it asked for it (spec 15.3)."""


@dataclass(frozen=True)
class AwaitingPayment(Message):
    """The orchestrator is paused at the credit boundary before ``next_step``."""

    TYPE: ClassVar[str] = "awaiting_payment"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    next_step: UInt32
    covered_steps: UInt32
    timeout_ms: UInt32


@dataclass(frozen=True)
class Preview(Message):
    TYPE: ClassVar[str] = "preview"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    step: UInt32
    image: Annotated[bytes, Bin(1, MAX_PREVIEW_BYTES)]
    format: Name
    width: UInt32
    height: UInt32
    method: Name | None = None
    """The method that made this preview, when it differs from the request's (a fallback)."""
    frames: UInt32 = 1
    """Video frames shown: 1, or all of them as an animation (webp) or a grid (jpeg)."""


@dataclass(frozen=True)
class Result(Message):
    """The output: images (text/image-to-image) or video frames in order (image-to-video)."""

    TYPE: ClassVar[str] = "result"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    images: Annotated[tuple[ResultImage, ...], Items(0, 16)]
    steps: UInt32
    pixel_steps: UInt64
    fee: Fraction
    frames: Annotated[tuple[ResultImage, ...], Items(0, MAX_FRAMES)] = ()
    fps: UInt32 = 0
    streamed_frames: Annotated[UInt32, Added()] = 0
    """Frames sent before this in `result_frame` messages (feature result_frames, 9.4)."""


@dataclass(frozen=True)
class ResultFrame(Message):
    """One frame of a video result, ahead of the `result` (feature `result_frames`)."""

    TYPE: ClassVar[str] = "result_frame"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    index: UInt32
    frame: ResultImage


@dataclass(frozen=True)
class Status(Message):
    """The job is alive in a phase without steps (feature `status`, spec 9.6)."""

    TYPE: ClassVar[str] = "status"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    phase: Name
    """loading (a model, before `accepted`), decoding (after the last step), ..."""
    next_within_ms: UInt32
    """O sends another message for the job within this many milliseconds."""


@dataclass(frozen=True)
class Queued(Message):
    """Every slot of the model is busy: the job waits for one, unpaid (feature `queue`, 4.6)."""

    TYPE: ClassVar[str] = "queued"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    position: UInt32
    """1: the next job of this capability to start."""
    estimated_start_ms: UInt32
    """When O expects the job to start, from its recent jobs' durations; 0: no estimate yet."""
    next_within_ms: UInt32
    """O sends another message for the job (`queued`, `accepted`, ...) within this many ms."""


@dataclass(frozen=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    SENDER: ClassVar[frozenset[Role]] = B
    job_id: JobId


@dataclass(frozen=True)
class Cancelled(Message):
    TYPE: ClassVar[str] = "cancelled"
    SENDER: ClassVar[frozenset[Role]] = O
    job_id: JobId
    steps: UInt32


@dataclass(frozen=True)
class Error(Message):
    """An error; with a job_id it ends that job, without one it ends the connection."""

    TYPE: ClassVar[str] = "error"
    SENDER: ClassVar[frozenset[Role]] = BOTH
    code: Name
    message: Annotated[str, Str(0, 1024)]
    job_id: JobId | None = None


def error_message(code: str, message: str, job_id: str | None = None) -> Error:
    """An Error that always fits its field limits (messages may quote peer input)."""
    limit = 1024
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return Error(code=code, message=message, job_id=job_id)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Info,
        JobRequest,
        JobAccepted,
        Payment,
        Credit,
        Progress,
        AwaitingPayment,
        Preview,
        Result,
        Cancel,
        Cancelled,
        Error,
        ResultFrame,
        Status,
        InfoRequest,
        Queued,
    )
}

FEATURE_RESULT_FRAMES = "result_frames"
FEATURE_STATUS = "status"
FEATURE_INFO_REQUEST = "info_request"
FEATURE_QUEUE = "queue"
FEATURE_FIRST_PAYMENT = "first_payment"
FEATURES = frozenset(
    {
        FEATURE_RESULT_FRAMES,
        FEATURE_STATUS,
        FEATURE_INFO_REQUEST,
        FEATURE_QUEUE,
        FEATURE_FIRST_PAYMENT,
    }
)
"""The features of this revision (spec 12.1), by the name `hello.features` lists: optional
message types, and (first_payment) fields O fills only for a B that asked."""
