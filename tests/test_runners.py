"""Runners: the grant gate at the runner boundary, external runners by URL, managed runners
that crash and come back, and none left behind."""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from broadcaster.session import BroadcasterSession
from orchestrator.config import ModelEntry
from orchestrator.placement import DevicePool, Placement, Resident, place
from orchestrator.runner_pool import RunnerSettings
from orchestrator.server import Orchestrator, OrchestratorConfig
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol.errors import ErrorCode, ProtocolError
from protocol.job_events import JobError, JobResult, PaymentSent, ProgressUpdate
from protocol.messages import JobRequest, TextToImageParams
from protocol.runner import (
    AUTH_HEADER,
    FROM_RUNNER,
    TO_RUNNER,
    Awaiting,
    Begin,
    Done,
    Failed,
    Grant,
    Output,
    Plan,
    Planned,
    Ready,
    Run,
    StepGrant,
    Stop,
    decode,
    encode,
)
from runner.server import RunnerConfig, RunnerServer
from tests.conftest import PRICE

pytestmark = pytest.mark.anyio
TOKEN = "test-runner-token"
WAIT = 60.0
"""Bound on any wait for a runner process (torch import on a loaded CPU)."""


def t2i(steps: int, size: int = 32) -> TextToImageParams:
    return TextToImageParams(
        prompt="a lighthouse", width=size, height=size, num_inference_steps=steps, seed=5
    )


# ------------------------------------------------------------ sans-I/O pieces


def test_step_grant_admits_only_the_next_granted_step() -> None:
    gate = StepGrant()
    assert not gate.admit(1)
    gate.grant(2)
    assert not gate.admit(2) and gate.admit(1) and gate.admit(2) and not gate.admit(3)
    with pytest.raises(ProtocolError):
        gate.grant(1)
    gate.grant(5)
    gate.stop = Stop("j", "cancelled")
    assert not gate.admit(3)


def test_runner_messages_round_trip_and_bad_frames_are_refused() -> None:
    req = JobRequest(job_id="j", pipeline="text-to-image", model_id=TINY_SD, params=t2i(3))
    for message in (Run(req, 7, 2), Grant("j", 3), Stop("j", "cancelled", "bye"), Plan(req)):
        assert decode(encode(message), TO_RUNNER) == message
    with pytest.raises(ProtocolError) as err:
        decode(encode(Grant("j", 1)), FROM_RUNNER)
    assert err.value.code is ErrorCode.UNKNOWN_MESSAGE_TYPE
    with pytest.raises(ProtocolError):
        decode(b"\xc1", TO_RUNNER)


def test_placement_fits_evicts_idle_lru_and_refuses() -> None:
    a = DevicePool("a", 100, (Resident("x", 60, False, 1.0), Resident("y", 30, False, 2.0)))
    b = DevicePool("b", 100, (Resident("z", 80, True, 0.0),))
    assert place([a, b], 10) == Placement("b", ())  # most free memory, nothing evicted
    assert place([a, b], 50) == Placement("a", ("x",))  # the least recently used goes
    assert place([a, b], 101) is None
    assert place([b], 30) is None  # the busy model stays


# ----------------------------------------------- the runner boundary, in process


@contextlib.asynccontextmanager
async def runner_in_process(model: LoadedModel) -> AsyncIterator[str]:
    server = RunnerServer(RunnerConfig(device="cpu", token=TOKEN))
    server.models[model.model_id] = model
    async with server.serve("127.0.0.1", 0) as ws_server:
        yield f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}"


async def next_message(ws: ClientConnection) -> Any:
    import anyio

    with anyio.fail_after(WAIT):
        return decode(await ws.recv(), FROM_RUNNER)


async def test_runner_never_runs_a_step_not_granted(tiny_model: LoadedModel) -> None:
    req = JobRequest(
        job_id="g", pipeline="text-to-image", model_id=TINY_SD, params=t2i(6), preview_every=2
    )
    async with (
        runner_in_process(tiny_model) as url,
        connect(url, additional_headers={AUTH_HEADER: f"Bearer {TOKEN}"}) as ws,
    ):
        ready = await next_message(ws)
        assert isinstance(ready, Ready) and ready.models[0].model_id == TINY_SD
        assert ready.models[0].footprint_bytes > 0 and ready.memory_bytes > 0
        await ws.send(encode(Plan(req)))
        assert await next_message(ws) == Planned("g", 6)
        await ws.send(encode(Run(req, 5, granted=0)))
        # Nothing runs before a grant: the runner says it waits for step 1, then is silent.
        assert await next_message(ws) == Awaiting("g", 1)
        await ws.send(encode(Grant("g", 2)))
        seen = []
        while not isinstance(seen[-1:] and seen[-1], Awaiting):
            message = await next_message(ws)
            seen.append(message if not hasattr(message, "preview") else "preview")
        # Step 1 waited for its grant and says for how long; step 2 was granted already.
        assert isinstance(seen[0], Begin) and seen[0].step == 1 and seen[0].waited_us > 0
        assert seen[1:] == [Done("g", 1), Begin("g", 2), "preview", Done("g", 2)] + [
            Awaiting("g", 3)
        ]
        await ws.send(encode(Grant("g", 6)))
        while not isinstance(message := await next_message(ws), Output):
            assert not isinstance(message, Failed), message
            if isinstance(message, Begin):
                assert message.step <= 6
        assert len(message.images) == 1
        # A stop ends a paused job with the stop's code.
        await ws.send(encode(Run(JobRequest(**{**req.__dict__, "job_id": "h"}), 5, granted=1)))
        while (message := await next_message(ws)) != Awaiting("h", 2):
            pass
        await ws.send(encode(Stop("h", "cancelled", "by the test")))
        assert await next_message(ws) == Failed("h", "cancelled", "by the test")


async def test_runner_refuses_a_wrong_or_missing_token(tiny_model: LoadedModel) -> None:
    async with runner_in_process(tiny_model) as url:
        for headers in ({AUTH_HEADER: "Bearer nope"}, {}):
            with pytest.raises(InvalidStatus) as err:
                async with connect(url, additional_headers=headers):
                    pass
            assert err.value.response.status_code == 401


# ---------------------------------------------------- runner processes


def read_listening_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The URL from a process's 'listening on' line, waiting at most `timeout` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                line = proc.stdout.readline().decode()
                if not line:
                    break
                if line.startswith("listening on "):
                    return line.removeprefix("listening on ").strip()
    raise AssertionError("runner did not report its port")


@pytest.fixture(scope="module")
def external_runner() -> Iterator[str]:
    """`stepstream runner` as an operator would start it, with the tiny model warm."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepstream.cli", "runner", "--model", TINY_SD]
        + ["--host", "127.0.0.1", "--port", "0", "--token", TOKEN, "--device", "cpu"],
        stdout=subprocess.PIPE,
    )
    try:
        yield read_listening_line(proc, WAIT)
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


@dataclass
class Served:
    orch: Orchestrator
    url: str


@contextlib.asynccontextmanager
async def orchestrator_with(entry: ModelEntry, **config: Any) -> AsyncIterator[Served]:
    orch = Orchestrator(
        OrchestratorConfig(models=[entry], private_key=secrets.token_bytes(32), **config)
    )
    async with orch.serve("127.0.0.1", 0) as server:
        yield Served(orch, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}")


async def run_job(url: str, params: TextToImageParams, **kw: Any) -> list[Any]:
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        return [e async for e in session.generate(params, model_id=TINY_SD, **kw)]


def external_entry(url: str, token: str) -> ModelEntry:
    return ModelEntry("text-to-image", TINY_SD, False, 1, PRICE, url=url, token=token)


async def test_external_runner_by_url_serves_a_job(external_runner: str) -> None:
    async with orchestrator_with(external_entry(external_runner, TOKEN)) as running:
        events = await run_job(running.url, t2i(3, 48), preview_every=2)
        result = events[-1]
        assert isinstance(result, JobResult), result
        assert result.steps == 3 and result.fee == 48 * 48 * 3 * PRICE
        assert [e.step for e in events if isinstance(e, ProgressUpdate)] == [1, 2, 3]
        info = await running.orch._info(bytes(20))
        cap = info.capabilities[0]
        assert cap.warm and cap.load_seconds is not None and cap.load_seconds > 0


async def test_external_runner_with_a_wrong_token_is_refused_unpaid(external_runner: str) -> None:
    async with orchestrator_with(external_entry(external_runner, "wrong")) as running:
        events = await run_job(running.url, t2i(2))
        assert not any(isinstance(e, PaymentSent) for e in events)
        error = events[-1]
        assert isinstance(error, JobError) and error.code == "model_unavailable"
        assert "refused our token" in error.message


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; ask /proc whether it is one.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"
    return True


async def test_killed_managed_runner_fails_its_job_restarts_and_is_stopped_at_shutdown() -> None:
    entry = ModelEntry("text-to-image", TINY_SD, False, 1, PRICE)
    settings = RunnerSettings(devices=["cpu"])
    async with orchestrator_with(entry, runners=settings) as running:
        managed = running.orch.runners.managed[0]
        async with BroadcasterSession(running.url, secrets.token_bytes(32)) as session:
            events = []
            first_pid = None
            async for event in session.generate(t2i(400), model_id=TINY_SD, preview_every=50):
                events.append(event)
                if isinstance(event, ProgressUpdate) and first_pid is None:
                    first_pid = managed.pid
                    assert first_pid is not None
                    os.kill(first_pid, signal.SIGKILL)
        error = events[-1]
        assert isinstance(error, JobError) and error.code == ErrorCode.RUNNER_LOST.value
        assert first_pid is not None
        # The next job waits for the restarted runner, which loads the model again.
        events = await run_job(running.url, t2i(2))
        assert isinstance(events[-1], JobResult), events[-1]
        assert managed.pid is not None and managed.pid != first_pid
        assert running.orch.metrics.runner_restarts._value.get() == 1
        second_pid = managed.pid
    # Leaving the orchestrator stops its runner.
    assert not alive(second_pid)


def test_managed_runner_exits_when_its_stdin_closes() -> None:
    """A managed runner's lifeline: its orchestrator gone (even by SIGKILL), it goes too."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepstream.cli", "runner", "--managed", "--device", "cpu"]
        + ["--host", "127.0.0.1", "--port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "STEPSTREAM_RUNNER_TOKEN": TOKEN},
    )
    try:
        read_listening_line(proc, WAIT)
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


def test_every_runner_must_is_indexed_to_a_test_that_exists() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = (root / "spec" / "RUNNER.md").read_text()
    body, index = spec.split("## 9.", 1)
    tagged = set(re.findall(r"\*\*\[(R\d+)\]\*\*", body))
    rows = dict(re.findall(r"^\| (R\d+) \| (.+) \|$", index, re.M))
    assert tagged and tagged == set(rows)
    for cell in rows.values():
        for ref in re.findall(r"tests/[\w/]+\.py::\w+", cell):
            path, name = ref.split("::")
            assert f"def {name}(" in (root / path).read_text(), ref


@pytest.mark.parametrize("pipeline", ["image-to-image", "image-to-video"])
async def test_image_pipelines_run_on_a_runner(
    pipeline: str, tiny_sdxl_model: LoadedModel, tiny_svd_model: LoadedModel
) -> None:
    """The runner protocol carries every pipeline, not only text-to-image."""
    from tests.test_network_pipelines import i2i, i2v

    model, params, outputs = (
        (tiny_sdxl_model, i2i(6, 0.5), "images")
        if pipeline == "image-to-image"
        else (tiny_svd_model, i2v(3, frames=3), "frames")
    )
    async with runner_in_process(model) as url:
        entry = ModelEntry(pipeline, model.model_id, False, 1, PRICE, url=url, token=TOKEN)
        async with (
            orchestrator_with(entry) as running,
            BroadcasterSession(running.url, secrets.token_bytes(32)) as session,
        ):
            events = [e async for e in session.generate(params, model_id=model.model_id)]
    result = events[-1]
    assert isinstance(result, JobResult), result
    assert result.steps == 3
    produced = getattr(result, outputs)
    assert len(produced) == (1 if pipeline == "image-to-image" else 3)
    assert all((p.width, p.height) == (64, 48) for p in produced)
    assert [e.step for e in events if isinstance(e, ProgressUpdate)] == [1, 2, 3]
