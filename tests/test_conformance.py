"""The conformance suite itself: it passes the reference nodes, run as users run them, and
each planted fault fails exactly the cases of the rule it breaks.

Timings here are never asserted; the full run's wall time is printed (pytest -s) and the
report says it.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from junitparser import JUnitXml

from broadcaster.session import BroadcasterSession
from conformance.all_cases import REGISTRY
from conformance.context import Options
from conformance.serve import ConformanceOrchestrator, ServeOptions
from conformance.serve_cases import SERVE_CASES
from conformance.suite import CLEANUP_CASE, run_suite
from conformance.verdicts import Verdict
from orchestrator.server import Orchestrator
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol.broadcaster_job import BroadcasterJob
from protocol.job_events import JobError, JobResult
from protocol.messages import TextToImageParams
from protocol.orchestrator_job import OrchestratorJob
from stepstream.processes import orchestrator_process, stepstream_process
from tests import conformance_faults as faults
from tests.conftest import PRICE
from tests.loopback import loopback_orchestrator

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepstream.cli", "conformance", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_the_orchestrator_passes_every_fast_case(tmp_path: Path) -> None:
    """`stepstream conformance` against `stepstream orchestrator`, both separate processes:
    no FAIL; the JSON and JUnit files parse and count every case; no slot is left held."""
    limits = ["--hello-timeout", "3", "--idle-timeout", "4"]
    extra = [*limits, "--payment-timeout", "3", "--max-connections-per-client", "8"]
    with orchestrator_process(tmp_path, extra_args=extra) as orch:
        started = time.monotonic()
        done = _cli(
            orch.url,
            *limits,
            "--max-connections-per-client", "8",
            "--timeout", "30",
            "--json", str(tmp_path / "o.json"),
            "--junit", str(tmp_path / "o.xml"),
        )  # fmt: skip
        took = time.monotonic() - started
    print(done.stdout[-3000:])
    report = json.loads((tmp_path / "o.json").read_text())
    failed = {n: c["detail"] for n, c in report["cases"].items() if c["verdict"] == "FAIL"}
    assert not failed and done.returncode == 0, (failed, done.stderr[-2000:])
    fast = [c.name for c in REGISTRY.cases if not c.slow]
    assert list(report["cases"]) == [*fast, CLEANUP_CASE]
    assert report["cases"][CLEANUP_CASE]["verdict"] == "PASS"
    suites = list(JUnitXml.fromfile(str(tmp_path / "o.xml")))
    assert len(suites) == 1 and suites[0].tests == len(fast) + 1
    assert suites[0].failures == 0 and suites[0].skipped == report["counts"]["SKIP"]
    assert sum(1 for _ in suites[0]) == len(fast) + 1
    print(f"{len(fast)} fast cases in {took:.1f} s: {report['counts']}")


def test_a_failing_node_exits_1_and_a_bad_command_exits_2(tmp_path: Path) -> None:
    nobody = _cli(
        "ws://127.0.0.1:9", "--case", "S3", "--timeout", "2", "--json", str(tmp_path / "f.json")
    )
    assert nobody.returncode == 1 and "FAIL" in nobody.stdout
    assert json.loads((tmp_path / "f.json").read_text())["counts"]["FAIL"] == 1
    assert _cli("http://127.0.0.1:9").returncode == 2
    assert _cli("ws://127.0.0.1:9", "--case", "Z99").returncode == 2
    listed = _cli("--list")
    assert listed.returncode == 0 and "K2-check-order" in listed.stdout


# ------------------------------------------------------------ planted O faults


async def failures(
    model: LoadedModel,
    patterns: list[str],
    *,
    job_type: type[OrchestratorJob] | None = None,
    orchestrator_type: type[Orchestrator] = Orchestrator,
    nonces: Any = None,
) -> dict[str, Verdict]:
    async with loopback_orchestrator(
        model, price=PRICE, capacity=1, payment_timeout=2.0, orchestrator_type=orchestrator_type
    ) as lo:
        if job_type is not None:
            lo.orch.job_type = job_type  # type: ignore[misc]
        if nonces is not None:
            lo.orch.cashier.recipient.nonces = nonces
        options = Options(url=lo.url, key=secrets.token_bytes(32), timeout=8.0)
        report = await run_suite(options, REGISTRY.select(patterns, slow=False))
    verdicts = {r.name: r.verdict for r in report.results if r.name != CLEANUP_CASE}
    skipped = {n for n, v in verdicts.items() if v is Verdict.SKIP}
    assert skipped <= {"K14-insufficient-funds"}, skipped  # off chain, funds are not checked
    return verdicts


def failed(verdicts: dict[str, Verdict]) -> set[str]:
    return {name for name, v in verdicts.items() if v is Verdict.FAIL}


async def test_running_a_step_without_credit_fails_c1(tiny_model: LoadedModel) -> None:
    got = await failures(
        tiny_model, ["C1", "C2", "C5", "X1"], job_type=faults.RunsAStepWithoutCredit
    )
    assert failed(got) == {"C1-no-step-before-credit", "C1-stops-at-the-credit-boundary"}, got


async def test_one_preview_too_few_fails_j2(tiny_model: LoadedModel) -> None:
    got = await failures(tiny_model, ["J2", "J3", "J4"], job_type=faults.SendsOnePreviewTooFew)
    assert failed(got) == {"J2-preview-every-n-steps"}, got


async def test_a_fee_one_wei_off_fails_p1(tiny_model: LoadedModel) -> None:
    got = await failures(
        tiny_model, ["P1", "K1", "C1", "C5", "J3"], orchestrator_type=faults.QuotesAFeeOneWeiOff
    )
    assert failed(got) == {"P1-quote-follows-6.1"}, got


async def test_accepting_a_replayed_nonce_fails_k2_6(tiny_model: LoadedModel) -> None:
    got = await failures(tiny_model, ["K2"], nonces=faults.ForgetsNonces())
    assert failed(got) == {"K2-6-nonce-replayed"}, got


async def test_an_error_without_closing_fails_f3(tiny_model: LoadedModel) -> None:
    got = await failures(
        tiny_model, ["F1", "F3"], orchestrator_type=faults.SendsAnErrorWithoutClosing
    )
    assert failed(got) == {c.name for c in REGISTRY.cases if c.ids[0] == "F3"}, got


async def test_silence_after_a_text_frame_fails_f1_text_frame(tiny_model: LoadedModel) -> None:
    got = await failures(
        tiny_model, ["F1", "F3"], orchestrator_type=faults.AnswersATextFrameWithNothing
    )
    assert failed(got) == {"F1-text-frame"}, got


# ------------------------------------------------------------ broadcasters


def test_generate_passes_every_serve_case(tmp_path: Path) -> None:
    """`stepstream conformance --serve` and `stepstream generate`, separate processes: one
    generate per case, no FAIL."""
    out = tmp_path / "serve.json"
    args = ["conformance", "--serve", "--port", "0", "--json", str(out), "--wait", "300"]
    with stepstream_process(args, "serving ", tmp_path / "serve.log", 60) as served:
        for i in range(len(SERVE_CASES)):
            subprocess.run(
                [
                    sys.executable, "-m", "stepstream.cli", "generate",
                    "--orchestrator", served.url, "--model", TINY_SD, "--prompt", "a test card",
                    "--width", "64", "--height", "64", "--steps", "8", "--preview-every", "2",
                    "--out", str(tmp_path / f"out-{i}.png"),
                    "--metrics-db", str(tmp_path / "metrics.sqlite3"),
                ],
                capture_output=True, timeout=120, cwd=ROOT,
            )  # fmt: skip
        assert served.process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    report = json.loads(out.read_text())
    verdicts = {n: c["verdict"] for n, c in report["cases"].items()}
    assert verdicts == {c.name: "PASS" for c in SERVE_CASES}, report["cases"]


async def serve_verdicts(
    session_type: type[BroadcasterSession], observe: float = 1.0
) -> dict[str, str]:
    """Every serve case against an in-process broadcaster, one session and job per case."""
    options = ServeOptions(key=secrets.token_bytes(32), models=[TINY_SD], observe=observe)
    orch = ConformanceOrchestrator(list(SERVE_CASES), options)
    async with orch.serve("127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        params = TextToImageParams(prompt="p", width=64, height=64, num_inference_steps=8, seed=1)
        for _ in SERVE_CASES:
            async with session_type(url, secrets.token_bytes(32), idle_timeout=30) as session:
                events = [
                    e async for e in session.generate(params, model_id=TINY_SD, preview_every=2)
                ]
                assert isinstance(events[-1], JobResult | JobError)
        await orch.all_done.wait()
    report = orch.report(0)
    return {r.name: f"{r.verdict.value} {r.detail}" for r in report.results}


def serve_failed(verdicts: dict[str, str]) -> set[str]:
    return {n for n, v in verdicts.items() if v.startswith("FAIL")}


async def test_the_session_passes_every_serve_case() -> None:
    got = await serve_verdicts(BroadcasterSession)
    assert not serve_failed(got), got


PLANTED_BROADCASTERS: list[
    tuple[type[BroadcasterJob] | None, type[BroadcasterSession] | None, set[str]]
] = [
    (faults.PaysTwoWindowsAhead, None, {"C3-paid-ahead-within-the-bound"}),
    (
        faults.PaysOneTicketTooMany,
        None,
        {"C4-paid-the-fee-at-the-end", "C8-carried-credit-counted-as-paid"},
    ),
    (faults.IgnoresCarriedCredit, None, {"C8-carried-credit-counted-as-paid"}),
    (faults.PaysWhenAsked, None, {"C6-awaiting-payment-for-paid-steps"}),
    (faults.SkipsTheFeeCheck, None, {"P3-fee-one-wei-off"}),
    (
        faults.SkipsTheEvCheck,
        None,
        {"K15-quote-ev-above-a-window", "K15-refreshed-ev-above-a-window"},
    ),
    (faults.IgnoresRefreshedParams, None, {"K16-pays-with-refreshed-params"}),
    (faults.AcceptsAnyResultSize, None, {"J7-result-of-the-wrong-size"}),
    (None, faults.PaysOnAClock, {"M1-no-payment-after-a-stall"}),
    (None, faults.AttachesOneTicketTooMany, {"C9-first-window-attached-within-a-window"}),
]


@pytest.mark.parametrize(
    ("job_type", "session_type", "expected"),
    PLANTED_BROADCASTERS,
    ids=[(j or s).__name__ for j, s, _ in PLANTED_BROADCASTERS],  # type: ignore[union-attr]
)
async def test_each_planted_broadcaster_fault_fails_its_case(
    job_type: type[BroadcasterJob] | None,
    session_type: type[BroadcasterSession] | None,
    expected: set[str],
) -> None:
    session = session_type or faults.session_with(job_type)  # type: ignore[arg-type]
    got = await serve_verdicts(session)
    assert serve_failed(got) == expected, got


# ------------------------------------------------------------ slow and chain cases


async def test_the_slow_case_sees_a_refresh_then_the_old_parameters_expire(
    tiny_model: LoadedModel,
) -> None:
    """K10 and check 8 of K2 (`--slow`): with half-second blocks the case takes seconds."""
    from settlement.chain import Settlement

    def clock() -> int:
        return int(time.monotonic() / 0.5)

    async with loopback_orchestrator(
        tiny_model,
        price=PRICE,
        capacity=1,
        payment_timeout=1.0,
        current_block=clock,
        ticket_validity_blocks=6,
        refresh_blocks=2,
    ) as lo:
        options = Options(
            url=lo.url, key=secrets.token_bytes(32), timeout=8.0, settlement=Settlement(clock)
        )
        report = await run_suite(options, REGISTRY.select(["K10"], slow=True))
    (case, cleanup) = report.results
    assert case.name == "K10-refreshed-then-old-params-expire"
    assert case.verdict is Verdict.PASS and cleanup.verdict is Verdict.PASS, report.summary()
    assert lo.orch.stats.params_refreshed >= 1


async def test_an_orchestrator_on_a_chain_refuses_an_unfunded_sender(
    tiny_model: LoadedModel,
) -> None:
    """With the chain given (--eth-url, here the embedded chain) K14 is checked, not skipped,
    and the round and its block hash come from the chain (K11)."""
    from settlement.chain import EmbeddedChain
    from tests.test_payments import funded_key, orchestrator_key

    chain = EmbeddedChain()
    o_key, b_key = orchestrator_key(chain), funded_key(chain)
    async with loopback_orchestrator(
        tiny_model, price=PRICE, capacity=1, private_key=o_key, settlement=chain.account(o_key)
    ) as lo:
        options = Options(
            url=lo.url,
            key=b_key,
            timeout=15.0,
            settlement=chain.account(b_key),
            on_chain=True,
        )
        report = await run_suite(options, REGISTRY.select(["K14", "K11", "C5"], slow=False))
    verdicts = {r.name: r.verdict for r in report.results}
    assert set(verdicts.values()) == {Verdict.PASS}, report.summary()
    assert "K14-insufficient-funds" in verdicts
