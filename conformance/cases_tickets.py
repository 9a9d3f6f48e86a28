"""Tickets (spec 8): parameters sized to a window, every check of 8.4 in its order, replay,
malleable signatures, rounds, funds, refresh and expiry."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction

import anyio

from conformance.context import CaseContext, credits, job_ended, params_ev
from conformance.registry import Registry
from conformance.verdicts import CaseFailed, CaseSkipped, Info, check
from conformance.wire import Wire
from protocol.messages import (
    AwaitingPayment,
    Cancel,
    Credit,
    Error,
    JobAccepted,
    Message,
    Payment,
    Progress,
)
from protocol.pm import MAX_UINT256, SECP256K1_N
from protocol.sender import TicketSender

cases = Registry()
BLOCKS_PER_ROUND = 5760
"""Off chain, a round is this many 12-second blocks (spec 8.2)."""

MakeBad = Callable[[Payment, JobAccepted, Wire], Payment]


async def refused_payment(
    ctx: CaseContext,
    job_id: str,
    make_bad: MakeBad,
    code: str,
    sender: TicketSender | None = None,
) -> None:
    """Pay a fresh job with `make_bad(good payment)`: one credit granting nothing, then the
    job's error `code` (spec K2, C5)."""
    wire, _ = await ctx.ready(sender)
    accepted = await ctx.start(wire, ctx.request(job_id, steps=4, every=2))
    good = wire.sender.pay(job_id, accepted.ticket_params, 1)
    await wire.send(make_bad(good, accepted, wire))
    await expect_refusal(wire, code)


async def expect_refusal(wire: Wire, code: str) -> None:
    """One credit that adds nothing to what the job had (its carried credit, spec 7.5,
    and what earlier payments earned), then the job's error."""
    before = wire.credited
    seen = await wire.recv_until(lambda m: job_ended(m) or isinstance(m, Credit))
    got = credits(seen)
    check(bool(got), f"the payment was answered with {seen[-1].TYPE}, not credit")
    check(
        got[0].tickets_accepted == 0 and got[0].credit == before,
        f"the refused ticket was credited: {got[0].tickets_accepted} accepted,"
        f" credit {float(got[0].credit):.4g} wei after {float(before):.4g}",
    )
    seen = await wire.recv_until(job_ended)
    end = seen[-1]
    check(isinstance(end, Error), f"the job went on to {end.TYPE} after a refused payment")
    assert isinstance(end, Error)
    check(end.code == code, f"refused with {end.code} ({end.message[:120]}), not {code}")


def reparam(payment: Payment, **fields: object) -> Payment:
    return replace(payment, ticket_params=replace(payment.ticket_params, **fields))


def resign(payment: Payment, key: bytes | None = None) -> Payment:
    """The same tickets signed by another key (the payment still names our sender)."""
    other = TicketSender(key or secrets.token_bytes(32))
    return replace(payment, tickets=other.pay(payment.job_id, payment.ticket_params, 1).tickets)


def with_sig(payment: Payment, sig: bytes) -> Payment:
    return replace(payment, tickets=(replace(payment.tickets[0], sig=sig),))


@cases.case("K1-ticket-ev-is-one-window", "K1", title="a quote's ticket is worth one window")
async def ev_window(ctx: CaseContext) -> str:
    shown = []
    for job_id, steps, every in (("k1-a", 6, 2), ("k1-b", 3, 5)):
        wire, _ = await ctx.ready()
        request = ctx.request(job_id, steps=steps, every=every)
        accepted = await ctx.start(wire, request)
        window = ctx.step_fee(request) * min(every, accepted.steps)
        tp = accepted.ticket_params
        ev = params_ev(tp)
        if tp.win_prob == MAX_UINT256:
            check(tp.face_value == math.ceil(window), f"a sure ticket of {tp.face_value} wei")
        else:
            check(
                window <= ev < window + 1,
                f"EV {float(ev):.3f} for a window of {float(window):.3f} wei (N={every})",
            )
        shown.append(f"N={every}: EV - window = {float(ev - window):.3g} wei")
        await ctx.end(wire)
    return "; ".join(shown)


@cases.case("K2-1-wrong-recipient", "K2", title="tickets for another recipient")
async def wrong_recipient(ctx: CaseContext) -> None:
    await refused_payment(
        ctx, "k2-1", lambda p, a, w: reparam(p, recipient=secrets.token_bytes(20)),
        "ticket_wrong_recipient",
    )  # fmt: skip


@cases.case("K2-2-zero-sender", "K2", title="a payment from the zero address")
async def zero_sender(ctx: CaseContext) -> None:
    await refused_payment(
        ctx, "k2-2", lambda p, a, w: replace(p, sender=bytes(20)), "ticket_zero_sender"
    )


@cases.case("K2-3-tampered-params", "K2", title="parameters changed after issue fail the MAC")
async def tampered(ctx: CaseContext) -> None:
    await refused_payment(
        ctx,
        "k2-3",
        lambda p, a, w: w.sender.pay(
            p.job_id, replace(p.ticket_params, face_value=p.ticket_params.face_value + 1), 1
        ),
        "invalid_ticket_params",
    )


@cases.case("K2-3-params-from-info", "K2", title="info's general parameters pay for no job (8.1)")
async def info_params(ctx: CaseContext) -> None:
    wire, info = await ctx.ready()
    accepted = await ctx.start(wire, ctx.request("k2-3-info", steps=4, every=2))
    check(accepted.ticket_params.seed != info.ticket_params.seed, "the quote reuses info's seed")
    await wire.send(wire.sender.pay("k2-3-info", info.ticket_params, 1))
    await expect_refusal(wire, "invalid_ticket_params")


@cases.case(
    "K2-3-params-of-another-job",
    "K2",
    title="parameters of the previous job on the connection do not pay for this one",
)
async def other_job_params(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    first, _ = await ctx.run_job(wire, ctx.request("k2-3-first", steps=2, every=2))
    await ctx.start(wire, ctx.request("k2-3-second", steps=4, every=2))
    await wire.send(wire.sender.pay("k2-3-second", first.ticket_params, 1))
    await expect_refusal(wire, "invalid_ticket_params")


@cases.case("K2-4-rand-mismatch", "K2", title="a recipient_rand_hash that is not the seed's")
async def rand_mismatch(ctx: CaseContext) -> None:
    await refused_payment(
        ctx,
        "k2-4",
        lambda p, a, w: w.sender.pay(
            p.job_id, replace(p.ticket_params, recipient_rand_hash=secrets.token_bytes(32)), 1
        ),
        "ticket_rand_mismatch",
    )


@cases.case("K2-5-bad-signature", "K2", title="tickets signed by another key than the sender")
async def bad_signature(ctx: CaseContext) -> None:
    await refused_payment(ctx, "k2-5", lambda p, a, w: resign(p), "ticket_bad_signature")


@cases.case("K2-6-nonce-replayed", "K2", title="a ticket sent twice earns once")
async def replayed(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    accepted = await ctx.start(wire, ctx.request("k2-6", steps=6, every=2))
    payment = wire.sender.pay("k2-6", accepted.ticket_params, 1)
    await wire.send(payment)
    seen = await wire.recv_until(lambda m: isinstance(m, Credit) or job_ended(m))
    check(isinstance(seen[-1], Credit), f"a good payment got {seen[-1].TYPE}")
    await wire.send(payment)
    await expect_refusal(wire, "ticket_nonce_replayed")


@cases.case(
    "K2-6-replay-on-another-connection",
    "K2",
    title="a ticket replayed for a job on another connection earns nothing",
)
async def replayed_elsewhere(ctx: CaseContext) -> str:
    first, _ = await ctx.ready()
    accepted = await ctx.start(first, ctx.request("k2-6-a", steps=6, every=2))
    payment = first.sender.pay("k2-6-a", accepted.ticket_params, 1)
    await first.send(payment)
    seen = await first.recv_until(lambda m: isinstance(m, Credit) or job_ended(m))
    check(isinstance(seen[-1], Credit), f"a good payment got {seen[-1].TYPE}")
    await first.send(Cancel(job_id="k2-6-a"))  # frees the slot: one is enough for this case
    await first.recv_until(job_ended)
    second, _ = await ctx.ready()
    await ctx.start(second, ctx.request("k2-6-b", steps=6, every=2))
    await second.send(replace(payment, job_id="k2-6-b"))
    # v0.2: the parameters are the first job's, so check 3 refuses before check 6 (8.1).
    await expect_refusal(second, "invalid_ticket_params")
    return "refused as another job's parameters (check 3)"


ORDER: list[tuple[str, MakeBad, str]] = [
    (
        "1 before 2",
        lambda p, a, w: replace(reparam(p, recipient=secrets.token_bytes(20)), sender=bytes(20)),
        "ticket_wrong_recipient",
    ),
    (
        "2 before 3",
        lambda p, a, w: replace(
            reparam(p, face_value=p.ticket_params.face_value + 1), sender=bytes(20)
        ),
        "ticket_zero_sender",
    ),
    (
        "3 before 4",
        lambda p, a, w: reparam(
            p, face_value=p.ticket_params.face_value + 1, recipient_rand_hash=bytes(32)
        ),
        "invalid_ticket_params",
    ),
    (
        "4 before 5",
        lambda p, a, w: resign(reparam(p, recipient_rand_hash=bytes(32))),
        "ticket_rand_mismatch",
    ),
]


@cases.case("K2-check-order", "K2", title="with two faults, the earlier check's code wins")
async def check_order(ctx: CaseContext) -> str:
    for i, (what, make_bad, code) in enumerate(ORDER):
        try:
            await refused_payment(ctx, f"k2-order-{i}", make_bad, code)
        except CaseFailed as failed:
            raise CaseFailed(f"check {what}: {failed}") from None
    # 5 before 6: a replayed nonce with a bad signature is a bad signature.
    wire, _ = await ctx.ready()
    accepted = await ctx.start(wire, ctx.request("k2-order-5", steps=6, every=2))
    payment = wire.sender.pay("k2-order-5", accepted.ticket_params, 1)
    await wire.send(payment)
    await wire.recv_until(lambda m: isinstance(m, Credit) or job_ended(m))
    await wire.send(resign(payment))
    try:
        await expect_refusal(wire, "ticket_bad_signature")
    except CaseFailed as failed:
        raise CaseFailed(f"check 5 before 6: {failed}") from None
    return "1 < 2 < 3 < 4 < 5 < 6"


def high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


MALLEABLE: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("S above n/2", high_s),
    ("V = 29", lambda sig: sig[:64] + bytes([29])),
    ("V = 0", lambda sig: sig[:64] + bytes([0])),
    ("R = 0", lambda sig: bytes(32) + sig[32:]),
    ("S = 0", lambda sig: sig[:32] + bytes(32) + sig[64:]),
    ("R = n", lambda sig: SECP256K1_N.to_bytes(32, "big") + sig[32:]),
]


@cases.case(
    "K6-malleable-signatures-refused",
    "K6",
    "K2",
    title="high S, V outside 27/28, R or S zero, R = n: ticket_bad_signature, never normalised",
)
async def malleable(ctx: CaseContext) -> str:
    for i, (what, change) in enumerate(MALLEABLE):
        try:
            await refused_payment(
                ctx,
                f"k6-{i}",
                lambda p, a, w, change=change: with_sig(p, change(p.tickets[0].sig)),
                "ticket_bad_signature",
            )
        except CaseFailed as failed:
            raise CaseFailed(f"{what}: {failed}") from None
    return ", ".join(w for w, _ in MALLEABLE)


@cases.case(
    "K11-params-name-their-round",
    "K11",
    title="parameters name the round they are issued in (8.2)",
)
async def round_named(ctx: CaseContext) -> str:
    before = await anyio.to_thread.run_sync(ctx.options.settlement.issue_round)
    wire, info = await ctx.ready()
    accepted = await ctx.start(wire, ctx.request("k11", steps=4))
    after = await anyio.to_thread.run_sync(ctx.options.settlement.issue_round)
    for name, tp in (("info", info.ticket_params), ("accepted", accepted.ticket_params)):
        if not ctx.options.on_chain and tp.creation_round_block_hash != bytes(32):
            raise CaseSkipped(
                "the parameters carry a block hash: the node is on a chain; give --eth-url"
            )
        rounds = {before.round, after.round}
        check(tp.creation_round in rounds, f"{name} names round {tp.creation_round}, not {rounds}")
        want_hash = before.block_hash if tp.creation_round == before.round else after.block_hash
        check(
            tp.creation_round_block_hash == want_hash,
            f"{name}'s creation_round_block_hash is not round {tp.creation_round}'s",
        )
    return f"round {accepted.ticket_params.creation_round}"


@cases.case(
    "K14-insufficient-funds",
    "K14",
    "K2",
    title="a sender with no deposit or reserve is sender_insufficient_funds (on a chain)",
)
async def no_funds(ctx: CaseContext) -> str | Info:
    pauper = TicketSender(secrets.token_bytes(32))
    wire, _ = await ctx.ready(pauper)
    accepted = await ctx.start(wire, ctx.request("k14", steps=4, every=2))
    await wire.send(pauper.pay("k14", accepted.ticket_params, 1))
    seen = await wire.recv_until(lambda m: isinstance(m, Credit) or job_ended(m))
    credit = seen[-1]
    if isinstance(credit, Credit) and credit.tickets_accepted:
        if ctx.options.on_chain:
            raise CaseFailed("a ticket from an unfunded sender was credited")
        raise CaseSkipped("the orchestrator takes tickets from an unfunded sender: off-chain mode")
    await expect_refusal_after_credit(wire, seen, "sender_insufficient_funds")
    return "refused"


async def expect_refusal_after_credit(wire: Wire, seen: list[Message], code: str) -> None:
    if not job_ended(seen[-1]):
        seen = await wire.recv_until(job_ended)
    end = seen[-1]
    check(
        isinstance(end, Error) and end.code == code,
        f"ended with {end.TYPE}" + (f" {end.code}" if isinstance(end, Error) else ""),
    )


@cases.case(
    "K10-refreshed-then-old-params-expire",
    "K10",
    "K2",
    title="a long job gets fresh parameters before its own expire; then the old ones are"
    " ticket_params_expired",
    slow=True,
)
async def refresh_and_expiry(ctx: CaseContext) -> str:
    settlement = ctx.options.settlement
    wire, _ = await ctx.ready()
    request = ctx.request("k10", steps=1000, every=1)
    accepted = await ctx.start(wire, request)
    old = accepted.ticket_params
    f = ctx.step_fee(request)
    paid, fresh_at = Fraction(0), None
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        block = await anyio.to_thread.run_sync(settlement.block_number)
        if block > old.expiration_block + 1:  # one block of slack for clocks apart
            break
        seen = await wire.recv_until(lambda m: isinstance(m, AwaitingPayment) or job_ended(m))
        fresh = [m for m in seen if isinstance(m, Progress) and m.ticket_params is not None]
        if fresh and fresh_at is None:
            fresh_at = await anyio.to_thread.run_sync(settlement.block_number)
            check(fresh_at <= old.expiration_block, "fresh parameters came after the old expired")
        end = seen[-1]
        if job_ended(end):
            raise CaseFailed(f"the job ended with {_what(end)} while the old parameters were valid")
        assert isinstance(end, AwaitingPayment)
        # Keep the job alive as slowly as the timeout allows, paying with the old parameters.
        await anyio.sleep(0.4 * end.timeout_ms / 1000)
        count = max(1, math.ceil((end.next_step * f - paid) / params_ev(old)))
        paid += count * params_ev(old)
        await wire.send(wire.sender.pay("k10", old, count))
        got = await wire.recv_until(lambda m: isinstance(m, Credit) or job_ended(m))
        if not isinstance(got[-1], Credit) or got[-1].tickets_accepted != count:
            block = await anyio.to_thread.run_sync(settlement.block_number)
            if block <= old.expiration_block:
                raise CaseFailed(
                    f"the old parameters were refused at block {block}: {_what(got[-1])}"
                )
            await expect_refusal_after_credit(wire, got, "ticket_params_expired")
            break
    else:
        raise CaseFailed("the old parameters never expired within an hour")
    check(fresh_at is not None, "no fresh parameters before the old ones expired (K10)")
    assert fresh_at is not None
    if wire.conn.state.value == "job_running":
        await wire.send(wire.sender.pay("k10", old, 1))
        await expect_refusal(wire, "ticket_params_expired")
    return f"fresh parameters {old.expiration_block - fresh_at} blocks before expiry"


def _what(message: Message) -> str:
    return f"error {message.code}" if isinstance(message, Error) else message.TYPE
