"""Credit carried between a sender's jobs (spec 7.5): nothing paid is lost at a job's end."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from fractions import Fraction

import pytest

from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from protocol.balances import SenderBalances
from protocol.job_events import Accepted, JobResult
from protocol.messages import TextToImageParams
from stepstream.processes import ChildServer, model_entry, orchestrator_process

A, B = b"\x01" * 20, b"\x02" * 20


def test_a_balance_is_spent_up_to_a_job_fee_and_kept_per_sender() -> None:
    balances = SenderBalances(ttl=10.0)
    balances.put(A, Fraction(7), 0.0)
    balances.put(A, Fraction(3), 1.0)
    balances.put(B, Fraction(0), 1.0)  # nothing to keep
    assert (balances.get(A, 1.0), balances.get(B, 1.0), len(balances)) == (10, 0, 1)
    assert balances.take(A, Fraction(4), 2.0) == 4
    assert balances.take(B, Fraction(4), 2.0) == 0
    assert balances.take(A, Fraction(100), 2.0) == 6
    assert len(balances) == 0


def test_a_balance_is_forgotten_after_its_ttl() -> None:
    balances = SenderBalances(ttl=10.0)
    balances.put(A, Fraction(5), 0.0)
    balances.put(B, Fraction(5), 5.0)
    assert balances.get(A, 9.9) == 5
    assert balances.take(A, Fraction(1), 9.9) == 1  # a use keeps it alive
    assert balances.get(A, 19.8) == 4 and balances.get(B, 15.0) == 0


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildServer]:
    with orchestrator_process(
        tmp_path_factory.mktemp("balances"), [model_entry(TINY_SD)], extra_args=["--runners", "1"]
    ) as child:
        yield child


@pytest.mark.anyio
async def test_twenty_jobs_pay_their_fee_within_one_window(orchestrator: ChildServer) -> None:
    """20 jobs of 12 steps, window 5, from one sender over four connections: alone, each
    would cost 3 tickets (15 steps' worth, 1.25x its fee); with the balance carried, all
    of them cost their fee plus less than one window."""
    key = secrets.token_bytes(32)
    params = TextToImageParams(prompt="a cat", width=64, height=64, num_inference_steps=12)
    paid = fee = Fraction(0)
    carried: list[Fraction] = []
    for _connection in range(4):
        async with BroadcasterSession(orchestrator.url, key) as session:
            for _ in range(5):
                async for event in session.generate(params, model_id=TINY_SD, preview_every=5):
                    if isinstance(event, Accepted):
                        carried.append(event.credit)
                        window_fee = event.fee / event.steps * 5
                    elif isinstance(event, JobResult):
                        paid += event.ev_paid
                        fee += event.fee
    assert len(carried) == 20 and carried[0] == 0 and all(c > 0 for c in carried[1:])
    ratio = paid / fee
    print(f"\n20 jobs of 12 steps, window 5: EV paid / fee = {float(ratio):.4f}")
    assert ratio <= 1 + window_fee / fee
