"""Several text-to-image jobs as one pipeline run, each giving the bytes it gives alone.

Jobs batch when they share a model, a size, a step count and a guidance scale,
and ask for one image each (`batch_key`). Each keeps its own prompt, seed,
previews, credit and stop:

- the prompts are encoded one job at a time, as a job alone encodes its own;
- each job's latents come from its own generator, as alone;
- the UNet runs on the whole batch: the only batched work, and the gain;
- the VAE decodes one job at a time, as alone.

The UNet's layers are made batch-invariant (pipelines/batch_invariance.py), and
`identical_when_batched` checks the whole path on the model's device, so a
runner enables batching only where a batched job's image is byte-identical.

Between steps every member's hooks run in turn: its `on_step_end` with its own
row of the latents, then the wait for its next step's grant. A member whose wait
raises (a stop: cancelled, or its payment timed out at the orchestrator) leaves
the batch with that error. A member whose grant has not come pauses the batch,
for at most the `patience` given (two of its steps and 50 ms by default): then
it leaves with its latents (`Member.left`), to go on alone from that step once
its credit comes (pipelines/resume.py), and the others go on. Without patience
(a model that cannot resume) the batch waits for it. A row that left is still
computed until the run ends, but nothing of it is sent.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from pipelines.batch_invariance import make_batch_invariant
from pipelines.job_pipeline import job_pipeline
from pipelines.resume import ResumePoint
from pipelines.stepping import StepHooks, generators
from pipelines.text_to_image import executed_steps, validate_text_to_image
from protocol.messages import TextToImageParams

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.loader import LoadedModel


def batch_key(params: object) -> tuple[Any, ...] | None:
    """Jobs with equal keys can share a run; None: this job runs alone."""
    if not isinstance(params, TextToImageParams) or params.num_images_per_prompt != 1:
        return None
    return (params.width, params.height, params.num_inference_steps, params.guidance_scale)


@dataclass
class Member:
    """One job of a batch: what it asks, the hooks that gate and watch it, its seed."""

    params: TextToImageParams
    hooks: StepHooks
    seed: int
    error: BaseException | None = None
    """Why it left the batch (its hook raised); None while it is in."""
    left: ResumePoint | None = field(default=None, repr=False)
    """Where it left for want of credit: the steps done and their latents."""
    left_before_start: bool = False
    """It left for want of its first step's grant: it runs alone, from the start."""
    image: Image.Image | None = field(default=None, repr=False)


LEAVE_AFTER_STEPS = 2.0
LEAVE_FLOOR = 0.05
"""A member whose grant is late leaves after this many of the batch's steps plus this many
seconds: well inside a broadcaster's stall deadline (3 intervals + 0.15 s, spec 15.1)."""


def default_patience(step_seconds: float) -> float:
    """How long the batch waits for a member's grant, after a step of `step_seconds`."""
    return LEAVE_AFTER_STEPS * step_seconds + LEAVE_FLOOR


@runtime_checkable
class GrantWithin(Protocol):
    def granted_within(self, step: int, seconds: float) -> bool:
        """Wait at most `seconds` for step `step`'s grant: whether it came (raise to stop)."""


class _AllLeft(Exception):
    """Every member has left: the run stops at once."""


def run_text_to_image_batch(
    model: LoadedModel,
    members: Sequence[Member],
    patience: Callable[[float], float] | None = None,
    on_leave: Callable[[Member], None] | None = None,
) -> None:
    """Run `members` (equal `batch_key`s) as one pipeline call.

    Sets each member's `image`, or its `error` when one of its hooks raised, or
    `left` when its grant was later than `patience(last step's seconds)` (members
    whose hooks have `granted_within`); `on_leave(member)` runs as it leaves. The
    others are not affected. Errors of the run itself (the pipeline failing)
    propagate, for every member alike.
    """
    if len({batch_key(m.params) for m in members}) != 1 or batch_key(members[0].params) is None:
        raise ValueError("these jobs cannot share a run")
    for m in members:
        validate_text_to_image(m.params)
    first = members[0].params
    total = executed_steps(first, model)
    live = list(members)
    rows = {id(m): row for row, m in enumerate(members)}
    ready = [time.perf_counter()]

    def leave(member: Member) -> None:
        live.remove(member)
        if on_leave is not None:
            on_leave(member)

    def first_step(m: Member) -> None:
        if patience is None or not isinstance(m.hooks, GrantWithin):
            m.hooks.wait_for_step(1)
        elif not m.hooks.granted_within(1, patience(0.0)):
            m.left_before_start = True
            leave(m)

    _each(live, first_step, leave)
    if not live:
        return
    ready[0] = time.perf_counter()  # step 1's time then counts its prompt encodes, not waits

    def on_step_end(pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        step, latents = i + 1, kwargs["latents"]
        step_seconds = time.perf_counter() - ready[0]
        _each(live, lambda m: m.hooks.on_step_end(step, latents[rows[id(m)]][None]), leave)
        steps = getattr(pipe, "num_timesteps", None) or total
        if step < steps:
            wait = None if patience is None else patience(step_seconds)
            deadline = None if wait is None else time.perf_counter() + wait

            def next_step(m: Member) -> None:
                if deadline is None or not isinstance(m.hooks, GrantWithin):
                    m.hooks.wait_for_step(step + 1)
                elif not m.hooks.granted_within(step + 1, deadline - time.perf_counter()):
                    m.left = ResumePoint(step, latents[rows[id(m)]][None].clone())
                    leave(m)

            _each(live, next_step, leave)
        if not live:
            raise _AllLeft
        ready[0] = time.perf_counter()
        return kwargs

    with (
        job_pipeline(model) as pipe,
        _one_job_at_a_time(pipe),
        torch.inference_mode(),
        contextlib.suppress(_AllLeft),
    ):
        out = pipe(
            prompt=[m.params.prompt for m in members],
            negative_prompt=[m.params.negative_prompt for m in members],
            width=first.width,
            height=first.height,
            guidance_scale=first.guidance_scale,
            num_inference_steps=first.num_inference_steps,
            generator=[generators(model.device, m.seed, 1)[0] for m in members],
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        for member, image in zip(members, out.images, strict=True):
            if member in live:
                member.image = image


_PER_JOB_TEXT = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
"""encode_prompt's text arguments, one entry per job of the batch (SD and SDXL)."""


def _each(live: list[Member], call: Any, leave: Callable[[Member], None]) -> None:
    """`call(m)` for every live member (it may `leave`); one that raises leaves, with its
    error."""
    for member in list(live):
        try:
            call(member)
        except Exception as exc:
            member.error = exc
            leave(member)


@contextlib.contextmanager
def _one_job_at_a_time(pipe: Any) -> Iterator[None]:
    """Encode prompts and decode latents per job on this (per-run) pipeline copy: the
    text encoder and the VAE then see what a job alone gives them."""
    encode = pipe.encode_prompt
    signature = inspect.signature(encode)

    def encode_each(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind(*args, **kwargs).arguments
        count = len(given["prompt"])
        parts = []
        for i in range(count):
            one = dict(given)
            for name in _PER_JOB_TEXT:
                if isinstance(given.get(name), list):
                    one[name] = [given[name][i]] if given[name][i] else None
            parts.append(encode(**one))
        return tuple(
            None if parts[0][k] is None else torch.cat([part[k] for part in parts])
            for k in range(len(parts[0]))
        )

    pipe.encode_prompt = encode_each
    pipe.vae = _DecodeEach(pipe.vae)
    yield


class _DecodeEach:
    """The VAE, decoding a batch one latent at a time (everything else passes through)."""

    def __init__(self, vae: Any) -> None:
        self._vae = vae

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)

    def decode(self, latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kwargs["return_dict"] = False
        rows = [
            self._vae.decode(latents[i : i + 1], *args, **kwargs)[0] for i in range(len(latents))
        ]
        return (torch.cat(rows),)


def prepare_for_batching(model: LoadedModel) -> None:
    """Hook the model's UNet for batch-invariant arithmetic (alone and batched alike)."""
    make_batch_invariant(model.pipe.unet)


class Unwatched:
    """Hooks of a job nobody pays for or watches: the load-time checks' and the bench's."""

    def wait_for_step(self, step: int) -> None: ...

    def on_step_end(self, step: int, latents: torch.Tensor) -> None: ...


def identical_when_batched(model: LoadedModel, size: int, width: int, height: int) -> bool:
    """Whether `size` jobs run as one give each its alone bytes, on this model and device."""
    import numpy as np

    from pipelines.text_to_image import run_text_to_image

    members = [
        Member(
            TextToImageParams(
                prompt=f"a lighthouse {i}", width=width, height=height, num_inference_steps=2
            ),
            Unwatched(),
            seed=i,
        )
        for i in range(size)
    ]
    run_text_to_image_batch(model, members)
    for m in members:
        alone = run_text_to_image(model, m.params, Unwatched(), m.seed)[0]
        if m.image is None or not np.array_equal(np.asarray(m.image), np.asarray(alone)):
            return False
    return True
