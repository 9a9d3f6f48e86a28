"""Payments over real sockets: validation codes, funds, refresh, redemption, exposure.

The orchestrator runs on loopback with the tiny pipeline and, where funds
and redemption matter, on an embedded py-evm chain with a deployed broker.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from fractions import Fraction

import anyio
import pytest
from websockets.asyncio.client import connect

from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol.broadcaster_job import BroadcasterJob, SendCancel, SendPayment
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import (
    FEATURE_FIRST_PAYMENT,
    FEATURES,
    Credit,
    Error,
    JobAccepted,
    JobRequest,
    Message,
    Payment,
    TextToImageParams,
)
from protocol.pm import SECP256K1_N, address_of
from protocol.sender import TicketSender
from settlement.chain import EmbeddedChain
from settlement.deploy import DeployParams
from settlement.eth import ChainError
from tests.conftest import PRICE, orchestrator_on_loopback

pytestmark = pytest.mark.anyio
ETH = 10**18


def small(steps: int = 6, **kw: object) -> TextToImageParams:
    fields: dict = dict(prompt="a lighthouse at dusk", width=64, height=64, seed=7)
    return TextToImageParams(num_inference_steps=steps, **{**fields, **kw})


@pytest.fixture(scope="module")
def chain() -> EmbeddedChain:
    return EmbeddedChain()


def funded_key(chain: EmbeddedChain, deposit: int = ETH, reserve: int = ETH) -> bytes:
    """A fresh broadcaster key with ether and, unless zero, a deposit and reserve."""
    key = secrets.token_bytes(32)
    chain.fund(address_of(key), 10 * ETH)
    if deposit or reserve:
        chain.account(key).fund_deposit_and_reserve(deposit, reserve)
    return key


def orchestrator_key(chain: EmbeddedChain) -> bytes:
    """A fresh orchestrator key with ether, registered as an active transcoder."""
    key = funded_key(chain, 0, 0)
    chain.register(address_of(key))
    return key


class Client:
    """A hand-driven broadcaster over a raw socket (the protocol state machine only)."""

    def __init__(self, ws: object, key: bytes) -> None:
        from protocol.connection import Connection
        from protocol.messages import Role

        self.ws = ws
        self.conn = Connection(Role.BROADCASTER)
        self.sender = TicketSender(key)

    async def send(self, message: Message) -> None:
        await self.ws.send(self.conn.send(message))  # type: ignore[attr-defined]

    async def recv(self) -> Message:
        with anyio.fail_after(30):
            return self.conn.receive(await self.ws.recv())  # type: ignore[attr-defined]

    async def start_job(self, job_id: str, steps: int = 4) -> JobAccepted:
        from protocol.messages import Hello

        if self.conn.state.value == "await_hello":
            await self.send(Hello(sender=self.sender.address_bytes))
            await self.recv()
        await self.send(
            JobRequest(
                job_id=job_id,
                pipeline="text-to-image",
                model_id=TINY_SD,
                params=small(steps),
                preview_every=2,
            )
        )
        accepted = await self.recv()
        assert isinstance(accepted, JobAccepted)
        return accepted

    async def refused(self, payment: Payment) -> tuple[Credit, Error]:
        """Send a payment that must be refused: a credit granting nothing, then the error."""
        await self.send(payment)
        seen = [await self.recv()]
        while not isinstance(seen[-1], Error):
            seen.append(await self.recv())
        credits = [m for m in seen if isinstance(m, Credit)]
        assert len(credits) == 1, seen
        return credits[0], seen[-1]


def high_s(sig: bytes) -> bytes:
    """The same signature with S mirrored to the upper half (and V flipped): malleable."""
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


def retick(payment: Payment, **ticket_fields: object) -> Payment:
    tickets = tuple(dataclasses.replace(t, **ticket_fields) for t in payment.tickets)
    return dataclasses.replace(payment, tickets=tickets)


def reparam(payment: Payment, **fields: object) -> Payment:
    return dataclasses.replace(
        payment, ticket_params=dataclasses.replace(payment.ticket_params, **fields)
    )


async def test_each_refused_ticket_has_its_code_and_earns_nothing(
    tiny_model: LoadedModel, chain: EmbeddedChain
) -> None:
    """Every validation failure of spec 8.4, over the socket, against a chain-backed O."""
    o_key = orchestrator_key(chain)
    b_key = funded_key(chain)
    async with orchestrator_on_loopback(
        tiny_model,
        private_key=o_key,
        settlement=chain.account(o_key),
        ticket_validity_blocks=3,
    ) as running:
        orch = running.orch

        async def case(make_bad: object, code: str, key: bytes = b_key) -> None:
            async with connect(running.url) as ws:
                client = Client(ws, key)
                accepted = await client.start_job("j")
                good = client.sender.pay("j", accepted.ticket_params, 1)
                bad = make_bad(good, client)  # type: ignore[operator]
                credit, error = await client.refused(bad)
            assert (credit.credit, credit.tickets_accepted, credit.covered_steps) == (0, 0, 0)
            assert error.code == code and error.job_id == "j", error

        other = TicketSender(secrets.token_bytes(32))
        await case(
            lambda p, c: dataclasses.replace(p, tickets=other.pay("j", p.ticket_params, 1).tickets),
            "ticket_bad_signature",
        )
        await case(lambda p, c: retick(p, sig=high_s(p.tickets[0].sig)), "ticket_bad_signature")
        await case(
            lambda p, c: reparam(p, recipient=secrets.token_bytes(20)), "ticket_wrong_recipient"
        )
        await case(
            lambda p, c: reparam(p, recipient_rand_hash=secrets.token_bytes(32)),
            "ticket_rand_mismatch",
        )

        def expired(p: Payment, c: Client) -> Payment:
            chain.mine(4)  # past the 3-block validity
            return p

        await case(expired, "ticket_params_expired")
        await case(lambda p, c: p, "sender_insufficient_funds", key=funded_key(chain, 0, 0))

        # A nonce is accepted once: a replay on the same job is refused (check 6), and
        # on another connection the parameters are not that job's (check 3, spec 8.1).
        async with connect(running.url) as ws1, connect(running.url) as ws2:
            first, second = Client(ws1, b_key), Client(ws2, b_key)
            accepted = await first.start_job("a")
            await second.start_job("b")
            payment = first.sender.pay("a", accepted.ticket_params, 1)
            await first.send(payment)
            credit = await first.recv()
            while not isinstance(credit, Credit):
                credit = await first.recv()
            assert credit.tickets_accepted == 1
            replay = dataclasses.replace(payment, job_id="b")
            credit, error = await second.refused(replay)
            assert credit.credit == 0 and error.code == "invalid_ticket_params"
            credit, error = await first.refused(payment)
            assert credit.tickets_accepted == 0 and error.code == "ticket_nonce_replayed"
        assert orch.stats.ev_received == credit_of(accepted)


def credit_of(accepted: JobAccepted) -> Fraction:
    from protocol.pm import ticket_ev

    return ticket_ev(accepted.ticket_params.face_value, accepted.ticket_params.win_prob)


async def test_winning_tickets_redeem_on_the_embedded_chain(
    tiny_model: LoadedModel, chain: EmbeddedChain
) -> None:
    """Sure winners (face value below a window's fee) are queued, redeemed once, and their
    face value lands in O's fee pool."""
    o_key = orchestrator_key(chain)
    b_key = funded_key(chain)
    o_chain = chain.account(o_key)
    async with orchestrator_on_loopback(
        tiny_model,
        private_key=o_key,
        settlement=o_chain,
        face_value=1,
        redeem_cost_multiplier=0,
    ) as running:
        async with BroadcasterSession(running.url, b_key) as session:
            events = [
                e async for e in session.generate(small(6), model_id=TINY_SD, preview_every=2)
            ]
        result = events[-1]
        assert isinstance(result, JobResult) and result.winners == result.tickets_sent == 3
        with anyio.fail_after(60):
            await running.orch.cashier.redeemer.wait_settled()
        queued = running.orch.cashier.winners.all()
        assert [q.status for q in queued] == ["redeemed"] * 3
        face = sum(q.winner.ticket.face_value for q in queued)
        assert face == math.ceil(result.fee / 3) * 3
        assert o_chain.fee_pool() == face == running.orch.cashier.redeemer.fee_pool
        info = o_chain.sender_info(address_of(b_key))
        assert info.deposit == ETH - face

        # Redeeming the same ticket again is refused by the broker...
        first = queued[0].winner
        with pytest.raises(ChainError, match="ticket is used"):
            o_chain.redeem(first)
        # ...and the redeemer, asked again, checks usedTickets and sends nothing.
        running.orch.cashier.redeemer.settle(queued[0])
        assert running.orch.cashier.redeemer.redeemed == 3
        assert o_chain.fee_pool() == face


async def test_winner_of_an_expired_round_is_refused_before_credit(
    tiny_model: LoadedModel,
) -> None:
    """Two rounds after its creation round the broker would refuse the ticket, so the
    orchestrator does: no credit, and the winner is not queued (it could not be redeemed)."""
    chain = EmbeddedChain(params=DeployParams(round_length=20))
    o_key, b_key = orchestrator_key(chain), funded_key(chain)
    async with orchestrator_on_loopback(
        tiny_model,
        private_key=o_key,
        settlement=chain.account(o_key),
        face_value=1,  # sure winners
        redeem_cost_multiplier=0,
        ticket_validity_blocks=1000,  # the parameters outlive their round
    ) as running:
        async with connect(running.url) as ws:
            client = Client(ws, b_key)
            accepted = await client.start_job("j")
            params = accepted.ticket_params
            assert params.creation_round > 0 and params.creation_round_block_hash != bytes(32)
            payment = client.sender.pay("j", params, 1)
            chain.mine(40)  # two rounds: creation_round + 2 <= current round
            credit, error = await client.refused(payment)
        assert (credit.credit, credit.tickets_accepted, credit.winners) == (0, 0, 0)
        assert error.code == "ticket_round_invalid" and "expired" in error.message
        assert running.orch.stats.ev_received == 0
        assert running.orch.cashier.winners.counts()["pending"] == 0
        # Parameters issued now name the current round, and pay.
        async with BroadcasterSession(running.url, b_key) as session:
            events = [e async for e in session.generate(small(2), model_id=TINY_SD)]
        assert isinstance(events[-1], JobResult)


async def test_ticket_params_refresh_mid_job(tiny_model: LoadedModel) -> None:
    """With a 4-block validity and a block per window, the job outlives its first parameters."""
    block = [100]

    async def run(refresh_blocks: int) -> tuple[list, int]:
        async with orchestrator_on_loopback(
            tiny_model,
            current_block=lambda: block[0],
            ticket_validity_blocks=4,
            refresh_blocks=refresh_blocks,
        ) as running:
            async with BroadcasterSession(running.url, secrets.token_bytes(32)) as session:
                events = []
                async for event in session.generate(small(16), model_id=TINY_SD, preview_every=2):
                    events.append(event)
                    if isinstance(event, PreviewFrame):
                        block[0] += 1
            return events, running.orch.stats.params_refreshed

    events, refreshed = await run(refresh_blocks=2)
    assert isinstance(events[-1], JobResult) and events[-1].steps == 16
    assert refreshed >= 2
    # Control: without refresh the same job dies when its parameters expire.
    events, refreshed = await run(refresh_blocks=-1000)
    assert refreshed == 0
    assert isinstance(events[-1], JobError) and events[-1].code == "ticket_params_expired"


async def test_a_job_paying_more_tickets_than_one_rand_takes_gets_fresh_parameters(
    tiny_model: LoadedModel,
) -> None:
    """A rand takes a bounded number of nonces (600 in go-livepeer, 8 here); a job that
    pays more tickets than that runs to its end on parameters refreshed as they wear."""
    async with orchestrator_on_loopback(tiny_model, nonces_per_rand=8) as running:
        async with BroadcasterSession(running.url, secrets.token_bytes(32)) as session:
            events = [
                e async for e in session.generate(small(24), model_id=TINY_SD, preview_every=1)
            ]
        assert running.orch.stats.tickets_received > 8
        assert running.orch.stats.params_refreshed >= running.orch.stats.tickets_received // 8
    assert isinstance(events[-1], JobResult) and events[-1].steps == 24


class UnderpayingSession(BroadcasterSession):
    """Pays the first window and then stops paying."""

    paid = 0

    async def _perform(self, job: BroadcasterJob, out: SendPayment | SendCancel) -> None:
        if isinstance(out, SendPayment):
            self.paid += 1
            if self.paid > 1:
                return
        await super()._perform(job, out)


async def test_underpaying_broadcaster_stops_at_the_credit_boundary(
    tiny_model: LoadedModel,
) -> None:
    async with (
        orchestrator_on_loopback(tiny_model, payment_timeout=0.5) as running,
        # Without first_payment (8.11), whose tickets cover the first window and up to a
        # ticket more, the first payment covers exactly the window: 3 steps.
        UnderpayingSession(
            running.url, secrets.token_bytes(32), features=FEATURES - {FEATURE_FIRST_PAYMENT}
        ) as session,
    ):
        events = [e async for e in session.generate(small(8), model_id=TINY_SD, preview_every=3)]
    error = events[-1]
    assert isinstance(error, JobError) and error.code == "payment_timeout"
    assert "no credit for step 4" in error.message and "covers 3 steps" in error.message
    assert max(e.step for e in events if isinstance(e, ProgressUpdate)) == 3
    assert running.orch.stats.outcomes[-1].steps_executed == 3


async def test_many_jobs_pay_the_delivered_fee_within_one_window(
    tiny_model: LoadedModel,
) -> None:
    """Over many jobs (some cancelled), EV paid = fee of delivered steps plus what the
    orchestrator keeps for the sender's next job (spec 7.5), and the orchestrator never
    ran a step its credit did not cover."""
    jobs = [(5, 1, None), (7, 2, None), (9, 4, 3), (6, 3, None), (8, 2, 5), (4, 4, None)]
    fee_per_step = PRICE * 64 * 64
    total_paid = total_delivered = Fraction(0)
    key = secrets.token_bytes(32)
    async with orchestrator_on_loopback(tiny_model) as running:
        async with BroadcasterSession(running.url, key) as session:
            for i, (steps, every, cancel_at) in enumerate(jobs):
                paid, carried, delivered = Fraction(0), Fraction(0), 0
                async for event in session.generate(
                    small(steps), model_id=TINY_SD, preview_every=every, job_id=f"job{i}"
                ):
                    if isinstance(event, Accepted):
                        carried = event.credit
                    elif isinstance(event, PaymentSent):
                        paid = event.ev_paid
                    elif isinstance(event, ProgressUpdate):
                        delivered = event.step
                        if event.step == cancel_at:
                            await session.cancel(event.job_id)
                window = fee_per_step * every
                slack = (every + 1) * fee_per_step + window if cancel_at else window + 1
                # B attaches its first window before it learns the carried credit (spec 8.11),
                # so a job may end that much further ahead; the next job gets it back.
                slack += carried
                spent = paid + carried - delivered * fee_per_step
                assert 0 <= spent < slack, (i, paid, carried, delivered)
                total_paid += paid
                total_delivered += delivered * fee_per_step
        stats = running.orch.stats
        for outcome in stats.outcomes:
            assert outcome.steps_executed * fee_per_step <= stats.job_credit[outcome.job_id]
        assert stats.ev_received == total_paid
        assert sum(o.steps_executed for o in stats.outcomes) * fee_per_step == total_delivered
        # Nothing paid is lost: what was not spent on a step waits for the next job.
        sender = TicketSender(key).address_bytes
        left = running.orch.balances.get(sender, time.monotonic())
        assert total_paid - total_delivered == left
    # The last job leaves less than one of its tickets (a window, rounded up by < 1 wei)
    # beyond the credit it carried in (its first window went before it learned that, 8.11).
    assert left < carried + 4 * fee_per_step + 1
