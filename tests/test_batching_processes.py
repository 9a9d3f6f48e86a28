"""Batching through the real processes: `stepstream orchestrator` and its runner process.

An aiModels.json entry asks for batches of 2; the runner times the gain and checks
the bytes when the model loads, the offer says what it found, and two jobs sent
together run as one batch: each pays its own fee, and each image is byte-identical
to the same job run alone.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from protocol.job_events import JobError, JobResult, JobStatus, ProgressUpdate
from protocol.messages import TextToImageParams
from runner.batcher import BATCH_GAIN_THRESHOLD
from stepstream.processes import ChildServer, model_entry, orchestrator_process
from tests.test_payments import UnderpayingSession

BATCH_LINE = f"running 2 jobs of {TINY_SD} as one batch"
LATE_LINE = "its grant was late"


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChildServer, Path]]:
    workdir = tmp_path_factory.mktemp("batching")
    entry = {**model_entry(TINY_SD, capacity=2), "max_batch": 2, "batch_wait_ms": 1500}
    with orchestrator_process(workdir, [entry], extra_args=["--runners", "1"]) as child:
        yield child, workdir / "orchestrator.log"


def job(prompt: str, seed: int) -> TextToImageParams:
    return TextToImageParams(prompt=prompt, width=64, height=64, num_inference_steps=8, seed=seed)


JOBS = [job("a red circle on a blue background", 5), job("a yellow triangle", 6)]


async def run(url: str, params: TextToImageParams, phases: list[str] | None = None) -> JobResult:
    """The job's result; `phases` gets the phases without steps B was told of."""
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        events = [e async for e in session.generate(params, model_id=TINY_SD, preview_every=2)]
    if phases is not None:
        phases.extend(e.phase for e in events if isinstance(e, JobStatus))
    previews = [e for e in events if type(e).__name__ == "PreviewFrame"]
    assert len(previews) == 4, events[-1]  # its own previews: steps 2, 4, 6, 8
    result = events[-1]
    assert not isinstance(result, JobError), result
    assert isinstance(result, JobResult)
    return result


@pytest.fixture(scope="module")
def alone_bytes(orchestrator: tuple[ChildServer, Path]) -> list[bytes]:
    """Each job run alone (each waits out the batch wait): the bytes a batch must give."""
    child, log = orchestrator

    phases: list[str] = []

    async def both() -> list[bytes]:
        return [(await run(child.url, params, phases)).images[0].image for params in JOBS]

    images = anyio.run(both)
    assert BATCH_LINE not in log.read_text()
    assert "batching" in phases  # a wait of 1.5 s: B heard the job was alive, and why
    return images


@pytest.mark.anyio
async def test_the_offer_says_the_measured_gain_and_the_batch_it_runs(
    orchestrator: tuple[ChildServer, Path],
) -> None:
    child, _ = orchestrator
    async with BroadcasterSession(child.url, secrets.token_bytes(32)) as session:
        assert session.info is not None
        (cap,) = session.info.capabilities
    (gain,) = cap.batch_gains  # at 2: the only size up to max_batch
    assert gain >= BATCH_GAIN_THRESHOLD and cap.max_batch == 2, cap


@pytest.mark.anyio
async def test_two_jobs_sent_together_run_as_one_batch_and_each_gets_its_alone_bytes(
    orchestrator: tuple[ChildServer, Path], alone_bytes: list[bytes]
) -> None:
    child, log = orchestrator
    batches = log.read_text().count(BATCH_LINE)
    together: list[JobResult] = [None, None]  # type: ignore[list-item]

    async def one(i: int) -> None:
        together[i] = await run(child.url, JOBS[i])

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(one, i)
    assert log.read_text().count(BATCH_LINE) == batches + 1
    assert [r.images[0].image for r in together] == alone_bytes  # byte for byte
    for result in together:
        # Each paid its own fee, in its own tickets.
        assert result.tickets_sent >= 1 and result.ev_paid >= result.fee > 0
    assert together[0].images[0].image != together[1].images[0].image


async def one_stops(
    url: str, session: BroadcasterSession, other_done: anyio.Event, cancel_at: int | None
) -> list[object]:
    """Job 0 on `session`: cancelled at step `cancel_at`, or (unpaid) once the other ends."""
    events: list[object] = []
    async with session:
        async for event in session.generate(JOBS[0], model_id=TINY_SD, preview_every=2):
            events.append(event)
            if isinstance(event, ProgressUpdate) and event.step == cancel_at:
                await session.cancel(event.job_id)
                break
            if isinstance(event, ProgressUpdate) and cancel_at is None:
                await other_done.wait()  # it stopped paying: wait while the batch goes on
                await session.cancel(event.job_id)
                break
    return events


@pytest.mark.anyio
@pytest.mark.parametrize("why", ["cancelled", "unpaid"])
async def test_a_member_that_is_cancelled_or_stops_paying_leaves_and_the_other_finishes(
    orchestrator: tuple[ChildServer, Path], alone_bytes: list[bytes], why: str
) -> None:
    child, log = orchestrator
    batches = log.read_text().count(BATCH_LINE)
    late_before = log.read_text().count(LATE_LINE)
    key = secrets.token_bytes(32)
    session = (
        BroadcasterSession(child.url, key) if why == "cancelled"
        else UnderpayingSession(child.url, key)
    )  # fmt: skip
    other_done = anyio.Event()
    first: list[object] = []
    other: list[JobResult] = []

    async def stopping() -> None:
        first.extend(await one_stops(child.url, session, other_done, 3 if why == "cancelled"
                                     else None))  # fmt: skip

    async def finishing() -> None:
        other.append(await run(child.url, JOBS[1]))
        other_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stopping)
        tg.start_soon(finishing)
    assert log.read_text().count(BATCH_LINE) == batches + 1
    steps = [e.step for e in first if isinstance(e, ProgressUpdate)]
    assert max(steps) < JOBS[0].num_inference_steps
    assert other[0].images[0].image == alone_bytes[1]
    if why == "unpaid":  # it left for want of credit (an honest one may too, on a slow box)
        assert log.read_text().count(LATE_LINE) > late_before
