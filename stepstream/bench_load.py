"""`stepstream bench load`: many broadcaster sessions against one orchestrator process.

One `stepstream orchestrator` process (with its runner process) takes
`--sessions` connections, each from its own sender key, opened at `--rate`
a second and then all at once. Per phase it reports p50/p99 from `hello`
to `info`, the orchestrator's RSS per open session, and its RSS once they
closed against its RSS before; while the sessions are open, `--jobs`
one-step jobs run one after another, each on a session of its own, for
p50/p99 from `payment` to `credit`.
Connections come from as many loopback addresses as the orchestrator's
per-address cap asks (spec 3.5), as distinct clients would.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import secrets
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import anyio
from websockets.asyncio.client import ClientConnection, connect

from orchestrator.connection_limits import DEFAULT_MAX_CONNECTIONS_PER_CLIENT
from protocol import codec
from protocol.messages import (
    Credit,
    Error,
    Hello,
    Info,
    JobAccepted,
    JobRequest,
    Result,
    TextToImageParams,
)
from protocol.pm import ticket_ev
from protocol.sender import TicketSender
from stepstream.processes import model_entry, orchestrator_process

SETTLE_SECONDS = 3.0
"""After the last close: time for the orchestrator to end the connections' tasks."""


@dataclass
class Phase:
    name: str
    hello_info: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_open: int = 0
    rss_closed: int = 0
    seconds: float = 0.0


@dataclass
class Session:
    ws: ClientConnection
    sender: TicketSender
    info: Info


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _client_ip(index: int) -> str:
    """127.0.0.2 and up, DEFAULT_MAX_CONNECTIONS_PER_CLIENT connections each."""
    n = 2 + index // DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    return f"127.0.{n // 256}.{n % 256}"


async def open_session(url: str, index: int, sender: TicketSender, phase: Phase) -> Session | None:
    """Connect, send `hello`, time the `info`; None (and an error noted) on any failure."""
    try:
        ws = await connect(
            url, compression=None, open_timeout=60, local_addr=(_client_ip(index), 0)
        )
    except Exception as exc:  # refused, timed out, a bad handshake: counted, never raised
        phase.errors.append(f"connect: {exc!r}")
        return None
    hello = Hello(sender=sender.address_bytes, agent="stepstream-bench-load")
    try:
        start = time.perf_counter()
        await ws.send(codec.encode(hello))
        reply = codec.decode(await ws.recv())
        phase.hello_info.append(time.perf_counter() - start)
    except Exception as exc:  # a closed connection, a bad frame: counted, never raised
        phase.errors.append(f"hello: {exc!r}")
        await ws.close()
        return None
    if not isinstance(reply, Info):
        phase.errors.append(f"hello: got {reply.TYPE}: {getattr(reply, 'message', '')}")
        await ws.close()
        return None
    return Session(ws, sender, reply)


async def open_all(
    url: str, senders: list[TicketSender], rate: float | None, phase: Phase
) -> list[Session]:
    """Open one session per sender, `rate` a second (None: all at once)."""
    opened: list[Session | None] = [None] * len(senders)
    start = time.perf_counter()

    async def one(i: int) -> None:
        if rate is not None:
            await anyio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        opened[i] = await open_session(url, i, senders[i], phase)

    async with anyio.create_task_group() as tg:
        for i in range(len(senders)):
            tg.start_soon(one, i)
    phase.seconds = time.perf_counter() - start
    return [s for s in opened if s is not None]


async def close_all(sessions: list[Session]) -> None:
    async with anyio.create_task_group() as tg:
        for s in sessions:
            tg.start_soon(s.ws.close)


async def paid_job(session: Session, model: str) -> float:
    """One one-step job on the session; seconds from sending the payment to its `credit`."""
    job_id = uuid.uuid4().hex
    params = TextToImageParams(prompt="a dot", width=64, height=64, num_inference_steps=1, seed=1)
    ws = session.ws
    await ws.send(codec.encode(JobRequest(job_id, params.PIPELINE, model, params)))
    accepted = codec.decode(await ws.recv())
    if not isinstance(accepted, JobAccepted):
        raise RuntimeError(f"job refused: {accepted}")
    tp = accepted.ticket_params
    window = accepted.fee / accepted.steps * accepted.window_steps - accepted.credit
    count = max(1, math.ceil(max(Fraction(0), window) / ticket_ev(tp.face_value, tp.win_prob)))
    payment = session.sender.pay(job_id, tp, min(count, 1024))
    start = time.perf_counter()
    await ws.send(codec.encode(payment))
    credited = None
    while True:
        message = codec.decode(await ws.recv())
        if isinstance(message, Credit) and credited is None:
            credited = time.perf_counter() - start
        elif isinstance(message, Error):
            raise RuntimeError(f"job failed: {message.code}: {message.message}")
        elif isinstance(message, Result):
            break
    if credited is None:
        raise RuntimeError("the job ended without a credit")
    return credited


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def run_phases(
    url: str, pid: int, args: argparse.Namespace
) -> tuple[list[Phase], list[float], int]:
    senders = [TicketSender(secrets.token_bytes(32)) for _ in range(args.sessions)]
    # Warm up: the first job and a few sessions load what every later one reuses.
    warm = Phase("warm-up")
    sessions = await open_all(url, senders[:64], None, warm)
    if sessions:
        await paid_job(sessions[0], args.model)
    await close_all(sessions)
    await anyio.sleep(SETTLE_SECONDS)
    base = rss_bytes(pid)
    phases, credit_times = [], []
    for name, rate in ((f"{args.rate:g}/s", args.rate), ("at once", None)):
        phase = Phase(name)
        sessions = await open_all(url, senders, rate, phase)
        phase.rss_open = rss_bytes(pid)
        if rate is not None:
            # Each job on a session of its own, opened now: the held ones would idle out
            # (spec 3.5) while the jobs before theirs run.
            job_phase = Phase("job sessions")  # their hello->info is not the phase's
            for j in range(args.jobs):
                extra = await open_session(
                    url, args.sessions + j, TicketSender(secrets.token_bytes(32)), job_phase
                )
                if extra is None:
                    continue
                try:
                    credit_times.append(await paid_job(extra, args.model))
                except Exception as exc:
                    phase.errors.append(f"job: {exc}")
                finally:
                    await extra.ws.close()
            phase.errors += job_phase.errors
        await close_all(sessions)
        await anyio.sleep(SETTLE_SECONDS)
        phase.rss_closed = rss_bytes(pid)
        phases.append(phase)
    return phases, credit_times, base


def run_load_bench(args: argparse.Namespace) -> int:
    entries = [model_entry(args.model, capacity=1)]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stepstream-load-")))
        print("starting a `stepstream orchestrator` process with its runner", flush=True)
        o = stack.enter_context(orchestrator_process(tmp, entries, extra_args=["--runners", "1"]))
        phases, credits, base = anyio.run(run_phases, o.url, o.pid, args)
    mib = 1024 * 1024
    print(
        f"{args.sessions} sessions against one orchestrator process, each its own sender key; "
        f"orchestrator RSS before {base / mib:.1f} MiB"
    )
    errors = 0
    for p in phases:
        errors += len(p.errors)
        print(
            f"  opened {p.name:>8}: {len(p.hello_info)} in {p.seconds:.1f} s, hello->info "
            f"p50 {_pct(p.hello_info, 0.5) * 1000:7.1f} ms, p99 "
            f"{_pct(p.hello_info, 0.99) * 1000:7.1f} ms; RSS "
            f"{(p.rss_open - base) / max(1, len(p.hello_info)) / 1024:6.1f} KiB a session, "
            f"after close {p.rss_closed / mib:.1f} MiB ({p.rss_closed / base:.3f}x before); "
            f"{len(p.errors)} errors"
        )
        for e in p.errors[:5]:
            print(f"      {e}")
    if credits:
        print(
            f"  payment->credit ({len(credits)} one-step jobs, one at a time): p50 "
            f"{statistics.median(credits) * 1000:.1f} ms, p99 {_pct(credits, 0.99) * 1000:.1f} ms"
        )
    return 1 if errors else 0
