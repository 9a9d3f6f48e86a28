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
row of the latents, then its `wait_for_step`. A member whose grant has not come
holds the batch (it pauses, and the others with it); one whose wait raises (a
stop: cancelled, or its payment timed out at the orchestrator) leaves the
batch, keeping that error, and the others go on. Its row is still computed
until the run ends, but nothing of it is sent.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pipelines.batch_invariance import make_batch_invariant
from pipelines.job_pipeline import job_pipeline
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
    image: Image.Image | None = field(default=None, repr=False)


class _AllLeft(Exception):
    """Every member has left: the run stops at once."""


def run_text_to_image_batch(model: LoadedModel, members: Sequence[Member]) -> None:
    """Run `members` (equal `batch_key`s) as one pipeline call.

    Sets each member's `image`, or its `error` when one of its hooks raised; the
    others are not affected by it. Errors of the run itself (the pipeline
    failing) propagate, for every member alike.
    """
    if len({batch_key(m.params) for m in members}) != 1 or batch_key(members[0].params) is None:
        raise ValueError("these jobs cannot share a run")
    for m in members:
        validate_text_to_image(m.params)
    first = members[0].params
    total = executed_steps(first, model)
    live = list(members)
    _each(live, lambda m: m.hooks.wait_for_step(1))
    if not live:
        return

    rows = {id(m): row for row, m in enumerate(members)}

    def on_step_end(pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        step, latents = i + 1, kwargs["latents"]
        _each(live, lambda m: m.hooks.on_step_end(step, latents[rows[id(m)]][None]))
        steps = getattr(pipe, "num_timesteps", None) or total
        if step < steps:
            _each(live, lambda m: m.hooks.wait_for_step(step + 1))
        if not live:
            raise _AllLeft
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
            if member.error is None:
                member.image = image


_PER_JOB_TEXT = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
"""encode_prompt's text arguments, one entry per job of the batch (SD and SDXL)."""


def _each(live: list[Member], call: Any) -> None:
    """`call(m)` for every live member; one that raises leaves, with its error."""
    for member in list(live):
        try:
            call(member)
        except Exception as exc:
            member.error = exc
            live.remove(member)


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


class _Unwatched:
    """Hooks of a job nobody pays for or watches: the load-time check's."""

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
            _Unwatched(),
            seed=i,
        )
        for i in range(size)
    ]
    run_text_to_image_batch(model, members)
    for m in members:
        alone = run_text_to_image(model, m.params, _Unwatched(), m.seed)[0]
        if m.image is None or not np.array_equal(np.asarray(m.image), np.asarray(alone)):
            return False
    return True
