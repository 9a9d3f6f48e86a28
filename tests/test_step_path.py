"""The step path as users run it: what a step costs the runner beyond the model, and whether
money ever holds the device (the runner's grant wait, as the orchestrator reports it)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import anyio
import pytest

from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from protocol.job_events import JobResult
from protocol.messages import TextToImageParams
from stepstream.bench import GrantWait, grant_wait, metrics_url
from stepstream.processes import ChildServer, model_entry, orchestrator_process

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


async def waited_in_one_job(url: str, steps: int, every: int) -> GrantWait:
    """The grant waits the orchestrator counted for one job (a new sender: no carried credit)."""
    scrape = metrics_url(url)
    before = await anyio.to_thread.run_sync(grant_wait, scrape)
    params = TextToImageParams(
        prompt="a red circle", width=32, height=32, num_inference_steps=steps, seed=3
    )
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
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
    # A window of 1 has no lead: each later step waits for the payment of the one before.
    behind = await waited_in_one_job(orchestrator.url, steps=3, every=1)
    assert behind.later_steps == 2 and behind.later > 0
