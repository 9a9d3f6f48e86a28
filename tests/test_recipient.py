"""Tests of protocol.recipient with protocol.sender: issuing parameters, checking payments."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from eth_hash.auto import keccak

from protocol.errors import ErrorCode
from protocol.messages import Payment, SignedTicket, TicketParams
from protocol.pm import (
    MAX_UINT256,
    SECP256K1_N,
    address_of,
    derive_recipient_rand,
    is_winning,
    recipient_rand_hash,
    recover_signer,
    ticket_ev,
)
from protocol.recipient import (
    MAX_NONCES_PER_RAND,
    ZERO_ADDRESS,
    LedgerFull,
    NonceLedger,
    PaymentReceipt,
    Recipient,
    RoundView,
    address_str,
    round_refusal,
)
from protocol.sender import TicketSender

SENDER_KEY = keccak(b"stepstream test sender")
OTHER_KEY = keccak(b"stepstream test other sender")
ORCH_ADDRESS = address_of(keccak(b"stepstream test orchestrator"))
OTHER_ORCH = address_of(keccak(b"stepstream test other orchestrator"))
SECRET = b"recipient secret" * 2
SALT = bytes(range(16))
BLOCK = 1000
FACE = 10**15
WIN_PROB = 2**250


def _recipient(
    nonces: NonceLedger | None = None, address: str = ORCH_ADDRESS, **kwargs: object
) -> Recipient:
    return Recipient(address, SECRET, nonces or NonceLedger(), **kwargs)  # type: ignore[arg-type]


def _issue(
    recipient: Recipient, sender: TicketSender, win_prob: int = WIN_PROB, salt: bytes = SALT
) -> TicketParams:
    return recipient.issue_params(sender.address_bytes, FACE, win_prob, BLOCK, salt)


def _refused(receipt: PaymentReceipt, code: ErrorCode, accepted: int = 0) -> None:
    assert receipt.error is not None
    assert receipt.error.code is code, receipt.error
    assert receipt.accepted == accepted
    assert receipt.ev == accepted * ticket_ev(FACE, WIN_PROB)


# --------------------------------------------------------------------- valid payments


def test_issue_params() -> None:
    recipient = _recipient(validity_blocks=40)
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender)
    assert params.recipient == bytes.fromhex(ORCH_ADDRESS[2:])
    assert (params.face_value, params.win_prob) == (FACE, WIN_PROB)
    assert params.expiration_block == BLOCK + 40
    assert params.seed[:16] == SALT
    rand = derive_recipient_rand(SECRET, params.seed, sender.address)
    assert params.recipient_rand_hash == recipient_rand_hash(rand)
    # Another salt, another rand.
    assert _issue(recipient, sender, salt=bytes(16)).recipient_rand_hash != (
        params.recipient_rand_hash
    )
    with pytest.raises(ValueError):
        _issue(recipient, sender, salt=bytes(15))


def test_valid_payment_credited_with_exact_ev() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender)
    receipt = recipient.receive(sender.pay("job-1", params, 3), BLOCK)
    assert receipt.error is None
    assert receipt.accepted == 3
    assert receipt.ev == 3 * Fraction(FACE * WIN_PROB, MAX_UINT256)
    # A second payment continues the nonces and is credited too.
    payment = sender.pay("job-1", params, 2)
    assert [t.sender_nonce for t in payment.tickets] == [4, 5]
    receipt = recipient.receive(payment, BLOCK + 40)  # still valid at the expiration block
    assert receipt.error is None and receipt.accepted == 2


def test_winning_tickets_kept_for_redemption() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender, win_prob=MAX_UINT256)
    payment = sender.pay("job-1", params, 2)
    receipt = recipient.receive(payment, BLOCK)
    assert receipt.error is None and receipt.accepted == 2
    assert receipt.ev == 2 * FACE
    assert len(receipt.winners) == 2
    rand = derive_recipient_rand(SECRET, params.seed, sender.address)
    for winner, signed in zip(receipt.winners, payment.tickets, strict=True):
        assert winner.sig == signed.sig
        assert winner.recipient_rand == rand
        assert winner.ticket.sender_nonce == signed.sender_nonce
        assert winner.ticket.recipient == ORCH_ADDRESS
        assert recover_signer(winner.ticket, winner.sig) == sender.address
        assert is_winning(winner.sig, rand, MAX_UINT256)


def test_losing_tickets_not_kept() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender, win_prob=1)
    receipt = recipient.receive(sender.pay("job-1", params, 5), BLOCK)
    assert receipt.error is None and receipt.accepted == 5
    assert receipt.winners == []
    assert receipt.ev == 5 * Fraction(FACE, MAX_UINT256)


# --------------------------------------------------------------------- validation failures


def test_wrong_recipient() -> None:
    sender = TicketSender(SENDER_KEY)
    other = _recipient(address=OTHER_ORCH)
    params = _issue(other, sender)
    receipt = _recipient().receive(sender.pay("job-1", params, 1), BLOCK)
    _refused(receipt, ErrorCode.TICKET_WRONG_RECIPIENT)


def test_zero_sender() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    # Parameters genuinely issued for the zero address: only the sender check can fail.
    params = recipient.issue_params(ZERO_ADDRESS, FACE, WIN_PROB, BLOCK, SALT)
    payment = dataclasses.replace(sender.pay("job-1", params, 1), sender=ZERO_ADDRESS)
    _refused(recipient.receive(payment, BLOCK), ErrorCode.TICKET_ZERO_SENDER)


@pytest.mark.parametrize(
    "change",
    [
        {"face_value": FACE + 1},
        {"win_prob": WIN_PROB * 2},
        {"expiration_block": BLOCK + 1000},
        {"creation_round": 1},
        {"creation_round_block_hash": b"\x01" * 32},
        {"seed": bytes(16) + bytes(range(16, 32))},
    ],
    ids=lambda c: next(iter(c)),
)
def test_tampered_params(change: dict[str, object]) -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = dataclasses.replace(_issue(recipient, sender), **change)  # type: ignore[arg-type]
    _refused(
        recipient.receive(sender.pay("job-1", params, 1), BLOCK), ErrorCode.INVALID_TICKET_PARAMS
    )


def test_params_issued_for_another_sender() -> None:
    recipient = _recipient()
    sender, other = TicketSender(SENDER_KEY), TicketSender(OTHER_KEY)
    params = _issue(recipient, other)
    _refused(
        recipient.receive(sender.pay("job-1", params, 1), BLOCK), ErrorCode.INVALID_TICKET_PARAMS
    )


def test_tampered_recipient_rand_hash() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender)
    params = dataclasses.replace(params, recipient_rand_hash=recipient_rand_hash(42))
    _refused(
        recipient.receive(sender.pay("job-1", params, 1), BLOCK), ErrorCode.TICKET_RAND_MISMATCH
    )


def test_signed_by_another_key() -> None:
    recipient = _recipient()
    sender, forger = TicketSender(SENDER_KEY), TicketSender(OTHER_KEY)
    params = _issue(recipient, sender)
    forged = forger.pay("job-1", params, 1)
    payment = dataclasses.replace(forged, sender=sender.address_bytes)
    receipt = recipient.receive(payment, BLOCK)
    _refused(receipt, ErrorCode.TICKET_BAD_SIGNATURE)
    assert receipt.error is not None and "not signed by its sender" in receipt.error.message


def _with_sig(payment: Payment, index: int, sig: bytes) -> Payment:
    tickets = list(payment.tickets)
    tickets[index] = SignedTicket(sender_nonce=tickets[index].sender_nonce, sig=sig)
    return dataclasses.replace(payment, tickets=tuple(tickets))


def test_high_s_signature() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender)
    payment = sender.pay("job-1", params, 2)
    sig = payment.tickets[1].sig
    s = int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    receipt = recipient.receive(_with_sig(payment, 1, high), BLOCK)
    # The first ticket is credited; the malleated one is refused.
    _refused(receipt, ErrorCode.TICKET_BAD_SIGNATURE, accepted=1)


@pytest.mark.parametrize(
    "sig",
    [bytes(65), b"\x01" * 64 + b"\x1b", b"\x01" * 64 + b"\x00"],
    ids=["zero", "junk", "bad-v"],
)
def test_garbage_signature(sig: bytes) -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    payment = _with_sig(sender.pay("job-1", _issue(recipient, sender), 1), 0, sig)
    _refused(recipient.receive(payment, BLOCK), ErrorCode.TICKET_BAD_SIGNATURE)


def test_replay_on_the_same_connection() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    payment = sender.pay("job-1", _issue(recipient, sender), 2)
    assert recipient.receive(payment, BLOCK).accepted == 2
    _refused(recipient.receive(payment, BLOCK), ErrorCode.TICKET_NONCE_REPLAYED)


def test_replay_on_a_second_connection_sharing_the_ledger() -> None:
    ledger = NonceLedger()
    first, second = _recipient(ledger), _recipient(ledger)
    sender = TicketSender(SENDER_KEY)
    payment = sender.pay("job-1", _issue(first, sender), 3)
    assert first.receive(payment, BLOCK).accepted == 3
    receipt = second.receive(payment, BLOCK)
    _refused(receipt, ErrorCode.TICKET_NONCE_REPLAYED)
    assert receipt.error is not None and "sender_nonce 1" in receipt.error.message
    # A recipient with its own ledger would not know (why the ledger is shared).
    assert _recipient().receive(payment, BLOCK).accepted == 3


def test_credit_stops_at_first_fault() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender)
    first = sender.pay("job-1", params, 1)  # nonce 1
    assert recipient.receive(first, BLOCK).accepted == 1
    fresh = sender.pay("job-1", params, 3)  # nonces 2, 3, 4
    mixed = dataclasses.replace(
        fresh, tickets=(fresh.tickets[0], first.tickets[0], fresh.tickets[1], fresh.tickets[2])
    )
    receipt = recipient.receive(mixed, BLOCK)
    _refused(receipt, ErrorCode.TICKET_NONCE_REPLAYED, accepted=1)
    # Tickets after the fault were not checked, so their nonces are still unused.
    rest = dataclasses.replace(fresh, tickets=fresh.tickets[1:])
    assert recipient.receive(rest, BLOCK).accepted == 2


def test_expired_params_keep_winners() -> None:
    recipient = _recipient(validity_blocks=40)
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender, win_prob=MAX_UINT256)
    payment = sender.pay("job-1", params, 2)
    receipt = recipient.receive(payment, BLOCK + 41)
    assert receipt.error is not None
    assert receipt.error.code is ErrorCode.TICKET_PARAMS_EXPIRED
    assert receipt.accepted == 0 and receipt.ev == 0
    # The first ticket wins: it is kept for redemption though it earns no credit.
    assert len(receipt.winners) == 1
    assert receipt.winners[0].sig == payment.tickets[0].sig


ROUND, ROUND_HASH = 7, b"\x07" * 32


def _in_round(recipient: Recipient, sender: TicketSender, win_prob: int = WIN_PROB) -> TicketParams:
    return recipient.issue_params(
        sender.address_bytes, FACE, win_prob, BLOCK, SALT, ROUND, ROUND_HASH
    )


def test_params_name_their_round_and_bind_it() -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _in_round(recipient, sender)
    assert (params.creation_round, params.creation_round_block_hash) == (ROUND, ROUND_HASH)
    ticket = sender.ticket(params, 1)
    assert ticket.aux_data() == ROUND.to_bytes(32, "big") + ROUND_HASH  # 64 bytes, as Livepeer's
    good = RoundView(current_round=ROUND + 1, validity_rounds=2, block_hash=ROUND_HASH)
    assert recipient.receive(sender.pay("j", params, 1), BLOCK, rounds=good).error is None


@pytest.mark.parametrize(
    ("view", "why"),
    [
        (RoundView(ROUND + 2, 2, ROUND_HASH), "expired"),
        (RoundView(ROUND + 9, 2, None), "expired"),  # off chain: the round clock alone
        (RoundView(ROUND, 2, bytes(32)), "never initialized"),
        (RoundView(ROUND, 2, b"\x08" * 32), "not the block hash"),
    ],
    ids=["expired", "expired-off-chain", "not-initialized", "other-hash"],
)
def test_a_round_the_broker_would_refuse_is_refused_first(view: RoundView, why: str) -> None:
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _in_round(recipient, sender, win_prob=MAX_UINT256)
    refusal = round_refusal(params, view)
    assert refusal is not None and why in refusal
    receipt = recipient.receive(sender.pay("j", params, 2), BLOCK, rounds=view)
    _refused(receipt, ErrorCode.TICKET_ROUND_INVALID)
    assert receipt.winners == []  # a sure winner, but the broker would not pay it: not kept


def test_round_check_comes_after_the_nonce_and_before_expiry() -> None:
    recipient = _recipient(validity_blocks=40)
    sender = TicketSender(SENDER_KEY)
    expired_round = RoundView(ROUND + 5, 2, ROUND_HASH)
    payment = sender.pay("j", _in_round(recipient, sender), 1)
    _refused(
        recipient.receive(payment, BLOCK + 41, rounds=expired_round), ErrorCode.TICKET_ROUND_INVALID
    )
    _refused(
        recipient.receive(payment, BLOCK, rounds=expired_round), ErrorCode.TICKET_NONCE_REPLAYED
    )


def test_insufficient_funds() -> None:
    calls: list[tuple[str, Fraction]] = []

    def has_funds(sender: str, ev: Fraction) -> bool:
        calls.append((sender, ev))
        return len(calls) <= 2

    recipient = _recipient(has_funds=has_funds)
    sender = TicketSender(SENDER_KEY)
    receipt = recipient.receive(sender.pay("job-1", _issue(recipient, sender), 4), BLOCK)
    _refused(receipt, ErrorCode.SENDER_INSUFFICIENT_FUNDS, accepted=2)
    assert calls == [(sender.address, ticket_ev(FACE, WIN_PROB))] * 3
    assert address_str(sender.address_bytes) == sender.address


def test_checks_run_in_spec_order() -> None:
    """A payment that breaks several rules gets the earliest rule's code."""
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender)
    both = dataclasses.replace(params, recipient=bytes(20), face_value=1)
    _refused(recipient.receive(sender.pay("j", both, 1), BLOCK), ErrorCode.TICKET_WRONG_RECIPIENT)
    mac_and_rand = dataclasses.replace(params, face_value=1, recipient_rand_hash=bytes(32))
    _refused(
        recipient.receive(sender.pay("j", mac_and_rand, 1), BLOCK), ErrorCode.INVALID_TICKET_PARAMS
    )
    # A replayed ticket with expired parameters: replay comes first.
    payment = sender.pay("j", params, 1)
    recipient.receive(payment, BLOCK)
    _refused(recipient.receive(payment, BLOCK + 1000), ErrorCode.TICKET_NONCE_REPLAYED)


# --------------------------------------------------------------------- NonceLedger


def test_ledger_nonces_per_rand_capped() -> None:
    ledger = NonceLedger()
    rand = b"\x01" * 32
    for nonce in range(MAX_NONCES_PER_RAND):
        assert ledger.check_and_record(rand, nonce, 100, 50)
    assert MAX_NONCES_PER_RAND == 600
    assert not ledger.check_and_record(rand, MAX_NONCES_PER_RAND, 100, 50)  # full
    assert not ledger.check_and_record(rand, 5, 100, 50)  # replay
    assert ledger.check_and_record(b"\x02" * 32, 5, 100, 50)  # another rand is independent


def test_full_ledger_forgets_only_expired_rands_and_never_allows_a_replay() -> None:
    ledger = NonceLedger(max_rands=3)
    rands = [bytes([i]) * 32 for i in range(4)]
    for rand, expiry in zip(rands[:3], (10, 100, 100), strict=True):
        assert ledger.check_and_record(rand, 1, expiry, 5)
    # Full of live parameters: a new rand is refused, nothing is forgotten.
    with pytest.raises(LedgerFull):
        ledger.check_and_record(rands[3], 1, 100, 5)
    assert not ledger.check_and_record(rands[0], 1, 10, 5)
    # Once rands[0] expired it may go, and only it.
    assert ledger.check_and_record(rands[3], 1, 100, 11)
    assert not ledger.check_and_record(rands[1], 1, 100, 11)
    assert not ledger.check_and_record(rands[3], 1, 100, 11)


def test_ledger_prune_by_expiration() -> None:
    ledger = NonceLedger()
    old, edge, new = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    ledger.check_and_record(old, 1, 99, 100)
    ledger.check_and_record(edge, 1, 100, 100)
    ledger.check_and_record(new, 1, 200, 100)
    ledger.prune(100)
    assert ledger.check_and_record(old, 1, 99, 100)  # forgotten: expired before block 100
    assert not ledger.check_and_record(edge, 1, 100, 100)  # still valid at its expiration block
    assert not ledger.check_and_record(new, 1, 200, 100)


def test_recipient_through_small_ledger() -> None:
    """With a full rand, further tickets for those parameters are refused as replays."""
    ledger = NonceLedger()
    recipient = _recipient(ledger)
    sender = TicketSender(SENDER_KEY)
    params = _issue(recipient, sender, win_prob=1)
    assert recipient.receive(sender.pay("j", params, 600), BLOCK).accepted == 600
    _refused(recipient.receive(sender.pay("j", params, 1), BLOCK), ErrorCode.TICKET_NONCE_REPLAYED)


def test_parameters_pay_only_for_the_job_they_were_issued_for() -> None:
    """Spec 8.1 and check 3 of 8.4: another job's (or info's) parameters earn nothing,
    and the MAC covers every field but the rand hash, which check 4 catches."""
    recipient = _recipient()
    sender = TicketSender(SENDER_KEY)
    mine, other = _issue(recipient, sender), _issue(recipient, sender, salt=bytes(16))
    job = {mine.seed}
    assert recipient.receive(sender.pay("j", mine, 1), BLOCK, job_seeds=job).accepted == 1
    receipt = recipient.receive(sender.pay("j", other, 1), BLOCK, job_seeds=job)
    _refused(receipt, ErrorCode.INVALID_TICKET_PARAMS)
    assert "this job" in receipt.error.message  # type: ignore[union-attr]
    changed = {
        "face_value": FACE + 1,
        "win_prob": WIN_PROB + 1,
        "expiration_block": BLOCK + 41,
        "creation_round": 1,
        "creation_round_block_hash": b"\x01" * 32,
    }
    for name, value in changed.items():
        tampered = dataclasses.replace(mine, **{name: value})
        receipt = recipient.receive(sender.pay("j", tampered, 1), BLOCK, job_seeds=job)
        _refused(receipt, ErrorCode.INVALID_TICKET_PARAMS)
    tampered = dataclasses.replace(mine, recipient_rand_hash=bytes(32))
    receipt = recipient.receive(sender.pay("j", tampered, 1), BLOCK, job_seeds=job)
    _refused(receipt, ErrorCode.TICKET_RAND_MISMATCH)
