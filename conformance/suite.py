"""Running cases against an orchestrator: one at a time, each cleaned up after, timed."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from conformance.context import CaseContext, Options
from conformance.registry import Case
from conformance.report import Report
from conformance.verdicts import CaseFailed, CaseResult, CaseSkipped, Info, Verdict
from conformance.wire import Closed, Wire
from protocol.messages import Info as InfoMessage
from protocol.sender import TicketSender

CLEANUP_CASE = "cleanup-no-slot-held"


async def probe(options: Options) -> InfoMessage:
    """The orchestrator's `info` (its offer, max_frame_bytes) on a connection of its own."""
    wire = await Wire.open(options.url, TicketSender(options.key), options.timeout)
    try:
        return await wire.hello()
    finally:
        await wire.close()


async def run_case(case: Case, options: Options, info: InfoMessage) -> CaseResult:
    ctx = CaseContext(options, info)
    started = time.monotonic()
    verdict, detail = Verdict.PASS, ""
    budget = 4 * options.timeout + 2 * options.idle_timeout + 60
    try:
        with anyio.fail_after(budget):
            outcome = await case.run(ctx)
        if isinstance(outcome, Info):
            verdict, detail = Verdict.INFO, outcome.detail
        elif isinstance(outcome, str):
            detail = outcome
    except CaseFailed as failed:
        verdict, detail = Verdict.FAIL, str(failed)
    except CaseSkipped as skipped:
        verdict, detail = Verdict.SKIP, str(skipped)
    except Closed as closed:
        verdict, detail = Verdict.FAIL, f"the orchestrator closed the connection ({closed.code})"
    except TimeoutError:
        verdict, detail = Verdict.FAIL, f"the case did not end within {budget:g} s"
    except OSError as exc:
        verdict, detail = Verdict.FAIL, f"cannot reach {options.url}: {exc}"
    finally:
        with anyio.CancelScope(shield=True):
            await ctx.cleanup()
    return CaseResult(case.name, case.ids, case.title, verdict, detail, time.monotonic() - started)


async def run_suite(
    options: Options,
    cases: list[Case],
    on_result: Callable[[CaseResult], None] | None = None,
) -> Report:
    """Run `cases` in order against `options.url`; the report ends with the cleanup check."""
    report = Report(options.url)
    started = time.monotonic()
    try:
        info = await probe(options)
    except (CaseFailed, Closed, OSError, TimeoutError) as exc:
        report.results.append(
            CaseResult(
                "S3-hello-answered-with-info",
                ("S3",),
                "the orchestrator answers hello with info",
                Verdict.FAIL,
                f"no info from {options.url}: {exc}",
                time.monotonic() - started,
            )
        )
        report.seconds = time.monotonic() - started
        return report
    baseline = {(c.pipeline, c.model_id): c.in_use for c in info.capabilities}
    done: dict[str, CaseResult] = {}
    background = [c for c in cases if c.background]
    background_done = anyio.Event()

    async def run(case: Case) -> None:
        done[case.name] = await run_case(case, options, info)
        if on_result is not None:
            on_result(done[case.name])
        if all(c.name in done for c in background):
            background_done.set()

    if not background:
        background_done.set()
    async with anyio.create_task_group() as tg:
        for case in background:  # the node's timers run while the other cases do
            tg.start_soon(run, case)
        for case in cases:
            if case.alone:
                await background_done.wait()
            if not case.background:
                await run(case)
    report.results.extend(done[c.name] for c in cases)
    report.results.append(await _cleanup_check(options, baseline))
    report.seconds = time.monotonic() - started
    return report


async def _cleanup_check(options: Options, baseline: dict[tuple[str, str], int]) -> CaseResult:
    """The suite never leaves a slot held: `in_use` returns to what it was before it ran."""
    started = time.monotonic()
    held: list[str] = []
    with anyio.move_on_after(options.timeout):
        while True:
            try:
                info = await probe(options)
            except (CaseFailed, Closed, OSError, TimeoutError) as exc:
                held = [f"no info: {exc}"]
                break
            held = [
                f"{c.model_id} ({c.pipeline}) in_use {c.in_use}"
                for c in info.capabilities
                if c.in_use > baseline.get((c.pipeline, c.model_id), 0)
            ]
            if not held:
                break
            await anyio.sleep(0.2)
    verdict = Verdict.INFO if held else Verdict.PASS
    detail = "still held: " + ", ".join(held) if held else "every slot the suite used is free"
    return CaseResult(
        CLEANUP_CASE,
        (),
        "the suite left no job running and no slot held",
        verdict,
        detail,
        time.monotonic() - started,
    )
