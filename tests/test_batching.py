"""Batched jobs (pipelines/batching.py): each job's bytes, rows, hooks and errors its own.

Real tiny diffusers pipelines on the CPU, loaded here (the hooks of
`prepare_for_batching` stay on a model, so the session's shared models are left
alone). tests/test_batching_processes.py runs batches through the real processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pipelines.batching import (
    LEAVE_FLOOR,
    Member,
    batch_key,
    default_patience,
    identical_when_batched,
    prepare_for_batching,
    run_text_to_image_batch,
)
from pipelines.loader import LoadedModel, load_model
from pipelines.text_to_image import run_text_to_image
from pipelines.tiny import TINY_SD, TINY_SDXL, quiet_diffusers
from protocol.messages import TextToImageParams
from runner.batcher import batch_to_run


@pytest.fixture(scope="module", params=[TINY_SD, TINY_SDXL])
def model(request: pytest.FixtureRequest) -> LoadedModel:
    with quiet_diffusers():
        loaded = load_model(request.param, device="cpu")
    prepare_for_batching(loaded)
    return loaded


class Recorder:
    """Step hooks that keep each step's latents, and raise at `stop_at` if set."""

    def __init__(self, stop_at: int | None = None, late_at: int | None = None) -> None:
        self.latents: dict[int, torch.Tensor] = {}
        self.waited: list[int] = []
        self.stop_at = stop_at
        self.late_at = late_at
        self.offered: list[tuple[int, float]] = []

    def granted_within(self, step: int, seconds: float) -> bool:
        """The grant for `late_at` never comes within the batch's patience."""
        self.offered.append((step, seconds))
        if step == self.late_at:
            return False
        self.wait_for_step(step)
        return True

    def wait_for_step(self, step: int) -> None:
        if step == self.stop_at:
            raise RuntimeError(f"stopped before step {step}")
        self.waited.append(step)

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        self.latents[step] = latents.clone()


def job(prompt: str, seed: int, **kw: Any) -> TextToImageParams:
    fields: dict[str, Any] = dict(width=64, height=64, num_inference_steps=8, seed=seed)
    return TextToImageParams(prompt=prompt, **{**fields, **kw})


JOBS = [
    job("a red circle on a blue background", 3),
    job("a yellow triangle", 11, negative_prompt="blurry"),
    job("a green square on white", 12),
]


def alone(model: LoadedModel, params: TextToImageParams) -> tuple[np.ndarray, Recorder]:
    hooks = Recorder()
    image = run_text_to_image(model, params, hooks, params.seed)[0]
    return np.asarray(image), hooks


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_batched_jobs_give_the_bytes_and_the_step_latents_they_give_alone(
    model: LoadedModel, guidance: float
) -> None:
    params = [p.__class__(**{**p.__dict__, "guidance_scale": guidance}) for p in JOBS]
    members = [Member(p, Recorder(), p.seed) for p in params]
    run_text_to_image_batch(model, members)
    for member in members:
        image, hooks = alone(model, member.params)
        assert member.error is None and member.image is not None
        assert np.array_equal(np.asarray(member.image), image)
        # Its previews are its own: each step's latents are its row, bit for bit.
        mine = member.hooks.latents  # type: ignore[attr-defined]
        assert sorted(mine) == list(range(1, 9))
        assert all(torch.equal(mine[k], hooks.latents[k]) for k in mine)
        assert member.hooks.waited == list(range(1, 9))  # type: ignore[attr-defined]


def test_a_member_that_stops_leaves_and_the_others_finish_as_alone(model: LoadedModel) -> None:
    members = [Member(p, Recorder(stop_at=4 if i == 1 else None), p.seed) for i, p in
               enumerate(JOBS)]  # fmt: skip
    run_text_to_image_batch(model, members)
    left = members[1]
    assert isinstance(left.error, RuntimeError) and left.image is None
    assert sorted(left.hooks.latents) == [1, 2, 3]  # type: ignore[attr-defined]
    for member in (members[0], members[2]):
        assert np.array_equal(np.asarray(member.image), alone(model, member.params)[0])


def test_a_member_whose_grant_is_late_leaves_with_its_latents_and_goes_on_alone(
    model: LoadedModel,
) -> None:
    members = [Member(p, Recorder(late_at=5 if i == 0 else None), p.seed) for i, p in
               enumerate(JOBS)]  # fmt: skip
    gone: list[Member] = []
    run_text_to_image_batch(model, members, patience=default_patience, on_leave=gone.append)
    late = members[0]
    assert gone == [late] and late.error is None and late.image is None
    assert late.left is not None and late.left.step == 4
    # The batch waited a bounded time for it: two steps and 50 ms.
    step, waited = late.hooks.offered[-1]  # type: ignore[attr-defined]
    assert step == 5 and waited >= LEAVE_FLOOR
    for member in members[1:]:
        assert np.array_equal(np.asarray(member.image), alone(model, member.params)[0])
    # Its credit comes: it resumes alone from step 4, and ends where it would have alone.
    hooks = Recorder()
    rest = run_text_to_image(model, late.params, hooks, late.seed, resume=late.left)[0]
    assert sorted(hooks.latents) == [1, 2, 3, 4]  # steps 5..8, counted from the resume
    assert np.array_equal(np.asarray(rest), alone(model, late.params)[0])


def test_when_every_member_has_stopped_the_run_ends_there(model: LoadedModel) -> None:
    members = [Member(p, Recorder(stop_at=2), p.seed) for p in JOBS[:2]]
    run_text_to_image_batch(model, members)
    assert all(isinstance(m.error, RuntimeError) and m.image is None for m in members)
    assert all(sorted(m.hooks.latents) == [1] for m in members)  # type: ignore[attr-defined]


def test_only_jobs_with_one_image_of_one_shape_share_a_run() -> None:
    a = job("x", 1)
    assert batch_key(a) == batch_key(job("y", 2, negative_prompt="z"))
    assert batch_key(a) != batch_key(job("x", 1, width=128))
    assert batch_key(a) != batch_key(job("x", 1, num_inference_steps=9))
    assert batch_key(a) != batch_key(job("x", 1, guidance_scale=3.0))
    assert batch_key(job("x", 1, num_images_per_prompt=2)) is None


def test_the_load_time_check_passes_on_a_prepared_model(model: LoadedModel) -> None:
    assert identical_when_batched(model, 4, 64, 64)


def test_a_model_batches_only_where_the_gain_pays_and_the_bytes_match() -> None:
    asked: list[int] = []

    def identical(size: int) -> bool:
        asked.append(size)
        return size <= 4

    assert batch_to_run({2: 1.19}, identical) == 1 and asked == []  # no gain: never asked
    assert batch_to_run({2: 1.7, 4: 2.9, 8: 1.1}, identical) == 4 and asked == [4]
    # 8 pays, but its bytes differ: the next size down that pays and matches.
    assert batch_to_run({2: 1.7, 4: 2.9, 8: 4.0}, identical) == 4 and asked == [4, 8, 4]
    assert batch_to_run({2: 1.7}, lambda size: False) == 1
    assert batch_to_run({}, identical) == 1
