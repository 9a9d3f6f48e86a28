"""The step path as users run it: what a step costs the runner beyond the model, and whether
money ever holds the device (the runner's grant wait, as the orchestrator reports it)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect

import runner.job as runner_job
from broadcaster.session import BroadcasterSession
from pipelines import previews
from pipelines.loader import LoadedModel
from pipelines.schedule import fresh_scheduler, schedule
from pipelines.tiny import TINY_SD
from protocol import codec
from protocol.job_events import JobResult
from protocol.messages import JobRequest, Latents, Preview, TextToImageParams
from protocol.runner import (
    AUTH_HEADER,
    FROM_RUNNER,
    Begin,
    Done,
    Failed,
    Output,
    Ready,
    Run,
    RunnerPreview,
    decode,
    encode,
)
from stepstream.bench import (
    Case,
    CaseResult,
    DirectRun,
    GrantWait,
    NetworkRun,
    grant_wait,
    metrics_url,
    per_window,
    report_case,
    table,
)
from stepstream.processes import ChildServer, model_entry, orchestrator_process
from tests.test_orchestrator_job import new_job, pay, to_b
from tests.test_runners import TOKEN, next_message, runner_in_process

pytestmark = pytest.mark.anyio
BOUND = 120.0
"""Bound on one job through the processes (a loaded CPU); a hang fails the test."""


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildServer]:
    """One `stepstream orchestrator` process with one runner process."""
    entries = [model_entry(TINY_SD, capacity=1)]
    with orchestrator_process(
        tmp_path_factory.mktemp("step-path"), entries, extra_args=["--runners", "1"]
    ) as child:
        yield child


async def waited_in_one_job(url: str, steps: int, every: int, lead: int = 1) -> GrantWait:
    """The grant waits the orchestrator counted for one job (a new sender: no carried credit),
    its broadcaster paying `lead` steps ahead (spec 7.3)."""
    scrape = metrics_url(url)
    before = await anyio.to_thread.run_sync(grant_wait, scrape)
    params = TextToImageParams(
        prompt="a red circle", width=32, height=32, num_inference_steps=steps, seed=3
    )
    async with BroadcasterSession(url, secrets.token_bytes(32), lead_steps=lead) as session:
        with anyio.fail_after(BOUND):
            async for event in session.generate(params, model_id=TINY_SD, preview_every=every):
                if isinstance(event, JobResult):
                    break
            else:
                raise AssertionError("the job ended without a result")
    return await anyio.to_thread.run_sync(grant_wait, scrape) - before


async def test_grant_wait_is_reported_and_zero_once_credit_is_ahead(
    orchestrator: ChildServer,
) -> None:
    # One window: the first payment covers every step, so no later step waits.
    ahead = await waited_in_one_job(orchestrator.url, steps=4, every=4)
    assert ahead.later_steps == 0 and ahead.later == 0
    # A window of 1 with no lead: each later step waits for the payment its predecessor's
    # progress triggers (the default lead of 1 pays it while that step runs).
    behind = await waited_in_one_job(orchestrator.url, steps=3, every=1, lead=0)
    assert behind.later_steps == 2 and behind.later > 0


# ------------------------------------------------- the runner's step thread, in process


def job_request(job_id: str, steps: int, every: int, want_latents: bool = False) -> JobRequest:
    params = TextToImageParams(
        prompt="a lighthouse", width=32, height=32, num_inference_steps=steps, seed=5
    )
    return JobRequest(
        job_id=job_id,
        pipeline="text-to-image",
        model_id=TINY_SD,
        params=params,
        preview_every=every,
        want_latents=want_latents,
    )


@dataclass
class Spy:
    """Calls of a real function, and the threads they ran on."""

    threads: list[str] = field(default_factory=list)

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            return real(*args, **kwargs)

        return spy


async def run_paid_ahead(url: str, req: JobRequest) -> list[Any]:
    """Run `req` with every step granted up front; the frames the runner sent, in order."""
    async with connect(url, additional_headers={AUTH_HEADER: f"Bearer {TOKEN}"}) as ws:
        assert isinstance(await next_message(ws), Ready)
        await ws.send(encode(Run(req, 5, granted=req.params.num_inference_steps)))
        seen: list[Any] = []
        while not isinstance(message := await next_message(ws), Output):
            assert not isinstance(message, Failed), message
            seen.append(message)
        return seen


@pytest.mark.parametrize("want_latents", [False, True])
async def test_a_step_without_a_preview_does_no_encode_and_no_copy(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, want_latents: bool
) -> None:
    render, copies = Spy(), Spy()
    monkeypatch.setattr(previews, "render_preview", render.wrap(previews.render_preview))
    monkeypatch.setattr(runner_job, "latents_later", copies.wrap(runner_job.latents_later))
    req = job_request("s", steps=8, every=4, want_latents=want_latents)
    async with runner_in_process(tiny_model) as url:
        seen = await run_paid_ahead(url, req)
    # Two previews (steps 4 and 8), each rendered on a preview worker, not the step thread.
    assert len(render.threads) == 2
    assert all(name.startswith("preview") for name in render.threads), render.threads
    # The latents leave the device only when the job asked for them (every step, spec 15.3).
    assert len(copies.threads) == (8 if want_latents else 0)
    # The wire order is the step thread's: each preview before the `done` of its step.
    kinds = [type(m).__name__ if not isinstance(m, RunnerPreview) else "preview" for m in seen]
    window = ["Begin", "Done"] * 3 + ["Begin", "preview", "Done"]
    assert kinds == window * 2
    assert [m.preview.step for m in seen if isinstance(m, RunnerPreview)] == [4, 8]
    assert all((m.latents is not None) == want_latents for m in seen if isinstance(m, Done))
    assert all(m.waited_us == 0 for m in seen if isinstance(m, Begin))  # paid ahead


def test_the_orchestrator_forwards_preview_and_latents_bytes_as_they_came() -> None:
    """The runner-to-orchestrator hop carries bytes once: O decodes the runner's frame but
    never the image or the latents in it, and hands the very same bytes to the broadcaster."""
    job = new_job(want_latents=True)
    job.start(0.0)
    job.on_payment(pay(2), 0.0)
    job.on_runner(Begin("j", 1), 0.0)
    preview = Preview(job_id="j", step=1, image=b"RIFF" + bytes(999), format="webp", width=8,
                      height=8)  # fmt: skip
    latents = Latents(scheduler="EulerDiscreteScheduler", dtype="float32", shape=(1, 4, 4, 4),
                      data=bytes(range(256)))  # fmt: skip
    came = decode(encode(RunnerPreview(preview)), FROM_RUNNER)  # as O's runner client reads it
    done = decode(encode(Done("j", 1, latents)), FROM_RUNNER)
    [forwarded] = to_b(job.on_runner(came, 0.0))
    [progress] = to_b(job.on_runner(done, 0.0))
    assert forwarded.image is came.preview.image and progress.latents is done.latents
    on_the_wire = codec.decode(codec.encode(forwarded))
    assert isinstance(on_the_wire, Preview) and on_the_wire.image == preview.image


def test_the_schedule_is_worked_out_once_and_matches_the_scheduler(
    tiny_model: LoadedModel,
) -> None:
    """Planning, pricing, previews and the job ask the scheduler once per step count, and
    each job still gets a scheduler of its own in its initial state."""
    scheduler = tiny_model.pipe.scheduler
    for steps in (1, 7, 20):
        probe = type(scheduler).from_config(scheduler.config)
        probe.set_timesteps(steps, device="cpu")
        plan = schedule(scheduler, steps)
        assert plan is schedule(scheduler, steps)
        assert plan.timesteps == len(probe.timesteps)
        assert plan.sigmas == tuple(float(s) for s in probe.sigmas)
    a, b = fresh_scheduler(scheduler), fresh_scheduler(scheduler)
    assert a is not b and a is not scheduler and type(a) is type(scheduler)
    assert a.step_index is None and dict(a.config) == dict(scheduler.config)
    a.set_timesteps(5, device="cpu")
    assert len(b.timesteps) != 5 or b.num_inference_steps is None  # b is untouched


def test_the_bench_reports_a_window_s_cost_and_runs_without_a_later_wait() -> None:
    def case(every: int, direct: float, network: float, later: int) -> CaseResult:
        runs = CaseResult(Case(64, every, 20))
        for _ in range(3):
            runs.direct.append(DirectRun(direct, 0.01))
            waited = GrantWait(0.002, 0.001 * later, later)
            runs.network.append(NetworkRun(network, 0.005, 0.045, every, waited))
        return runs

    results = [case(4, 0.400, 0.430, 0), case(1, 0.400, 0.505, 19)]
    # 15 more windows cost 75 ms more: 5 ms a window.
    assert per_window(results) == pytest.approx(0.005)
    assert results[0].runs_without_later_wait == 3 and results[1].runs_without_later_wait == 0
    assert GrantWait(1.0, 2.0, 3) - GrantWait(0.5, 2.0, 3) == GrantWait(0.5, 0.0, 0)
    text = table(results)
    row = "| 64x64, window 4 | 400.0 ms | 430.0 ms | 1.07x (1.07x) | 30.0 ms | 45.0 ms (35.0 ms)"
    assert row in text
    assert "| 3/3 |" in text and "| 0/3 |" in text
    assert "minus its 4 steps 5.0 ms" in report_case(results[0])
