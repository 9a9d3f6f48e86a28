"""On-chain settlement: the Vyper TicketBroker driven through stepstream.chain.

Runs against an in-process py-evm chain, and the redeem path again against a
real anvil process (installed with npm into .tools/ on first use).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from web3 import Web3

from protocol.pm import (
    MAX_UINT256,
    SECP256K1_N,
    Ticket,
    address_of,
    recipient_rand_hash,
    sign_ticket,
)
from stepstream.anvil import AnvilError, find_anvil, find_or_install_anvil, run_anvil
from stepstream.chain import (
    ChainError,
    TicketBrokerClient,
    _send,
    _ticket_tuple,
    embedded_web3,
    fund_account,
    http_web3,
    mine_blocks,
)

ETH = 10**18
UNLOCK_PERIOD = 10
REDEEM_GAS_LIMIT = 100_000  # regression bound; measured ~73k with empty auxData


@dataclass
class Parties:
    """A fresh broker plus a broadcaster (ticket sender) and an orchestrator (recipient)."""

    w3: Web3
    b_key: bytes = field(repr=False)
    o_key: bytes = field(repr=False)
    broadcaster: TicketBrokerClient
    orchestrator: TicketBrokerClient
    stranger: TicketBrokerClient


def _setup(w3: Web3) -> Parties:
    keys = [os.urandom(32) for _ in range(4)]
    for key in keys:
        fund_account(w3, address_of(key), 100 * ETH)
    deployer = TicketBrokerClient.deploy(w3, keys[0], unlock_period=UNLOCK_PERIOD)
    return Parties(
        w3=w3,
        b_key=keys[1],
        o_key=keys[2],
        broadcaster=deployer.with_key(keys[1]),
        orchestrator=deployer.with_key(keys[2]),
        stranger=deployer.with_key(keys[3]),
    )


def _ticket(
    p: Parties,
    *,
    rand: int,
    nonce: int = 1,
    face: int = ETH // 10,
    win_prob: int = MAX_UINT256,
    **extra: int | bytes,
) -> Ticket:
    return Ticket(
        recipient=p.orchestrator.account,
        sender=p.broadcaster.account,
        face_value=face,
        win_prob=win_prob,
        sender_nonce=nonce,
        recipient_rand_hash=recipient_rand_hash(rand),
        **extra,  # type: ignore[arg-type]
    )


def _gas_cost(receipt: dict) -> int:
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


@pytest.fixture(scope="module")
def embedded() -> Web3:
    return embedded_web3()


@pytest.fixture
def parties(embedded: Web3) -> Parties:
    return _setup(embedded)


# -- embedded chain ---------------------------------------------------------------------


def test_contract_ticket_hash_matches_protocol_pm(parties: Parties) -> None:
    plain = _ticket(parties, rand=7)
    with_aux = _ticket(parties, rand=7, creation_round=4321, creation_round_block_hash=b"\xab" * 32)
    assert with_aux.aux_data() != b""
    for ticket in (plain, with_aux):
        assert parties.broadcaster.ticket_hash(ticket) == ticket.hash()


def test_fund_deposit_and_reserve_shows_in_sender_info(parties: Parties) -> None:
    b = parties.broadcaster
    b.fund_deposit_and_reserve(2 * ETH, ETH)
    b.fund_deposit(ETH)
    b.fund_reserve(ETH)
    info = b.get_sender_info(b.account)
    assert (info.deposit, info.reserve, info.withdraw_block, info.reserve_claimed) == (
        3 * ETH,
        2 * ETH,
        0,
        0,
    )
    assert b.balance(b.address) == 5 * ETH
    # The contract itself refuses a value that is not deposit + reserve.
    mismatched = b.contract.functions.fundDepositAndReserve(ETH, ETH)
    with pytest.raises(ChainError, match="msg.value"):
        b._transact("fundDepositAndReserve", mismatched, value=ETH)


def test_winning_ticket_pays_recipient_once(parties: Parties) -> None:
    b, o = parties.broadcaster, parties.orchestrator
    b.fund_deposit_and_reserve(ETH, ETH)
    rand = int.from_bytes(os.urandom(32), "big")
    ticket = _ticket(parties, rand=rand)
    sig = sign_ticket(ticket, parties.b_key)
    assert not o.used_tickets(ticket.hash())

    before = o.balance(o.account)
    receipt = o.redeem_winning_ticket(ticket, sig, rand)
    assert o.balance(o.account) == before + ticket.face_value - _gas_cost(receipt)
    assert receipt["gasUsed"] < REDEEM_GAS_LIMIT
    info = b.get_sender_info(b.account)
    assert (info.deposit, info.reserve) == (ETH - ticket.face_value, ETH)
    assert o.used_tickets(ticket.hash())

    with pytest.raises(ChainError, match="ticket is used"):
        o.redeem_winning_ticket(ticket, sig, rand)
    assert b.get_sender_info(b.account).deposit == ETH - ticket.face_value


def test_reserve_covers_short_deposit_then_pays_what_is_left(parties: Parties) -> None:
    b, o = parties.broadcaster, parties.orchestrator
    b.fund_deposit_and_reserve(ETH // 20, ETH // 10)  # 0.05 deposit, 0.1 reserve
    first = _ticket(parties, rand=1, face=ETH // 10)
    receipt = o.redeem_winning_ticket(first, sign_ticket(first, parties.b_key), 1)
    info = b.get_sender_info(b.account)
    assert (info.deposit, info.reserve, info.reserve_claimed) == (0, ETH // 20, ETH // 20)

    before = o.balance(o.account)
    second = _ticket(parties, rand=2, face=ETH)  # only 0.05 left in total
    receipt = o.redeem_winning_ticket(second, sign_ticket(second, parties.b_key), 2)
    assert o.balance(o.account) == before + ETH // 20 - _gas_cost(receipt)
    info = b.get_sender_info(b.account)
    assert (info.deposit, info.reserve, info.reserve_claimed) == (0, 0, ETH // 10)
    assert o.used_tickets(second.hash())


def test_losing_ticket_reverts(parties: Parties) -> None:
    parties.broadcaster.fund_deposit(ETH)
    ticket = _ticket(parties, rand=5, win_prob=0)
    with pytest.raises(ChainError, match="did not win"):
        parties.orchestrator.redeem_winning_ticket(ticket, sign_ticket(ticket, parties.b_key), 5)
    assert not parties.orchestrator.used_tickets(ticket.hash())


def test_forged_and_malleable_signatures_revert(parties: Parties) -> None:
    parties.broadcaster.fund_deposit(ETH)
    o = parties.orchestrator
    ticket = _ticket(parties, rand=9)
    forged = sign_ticket(ticket, os.urandom(32))  # valid signature, wrong signer
    with pytest.raises(ChainError, match="invalid signature"):
        o.redeem_winning_ticket(ticket, forged, 9)

    good = sign_ticket(ticket, parties.b_key)
    s = int.from_bytes(good[32:64], "big")
    high_s = good[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - good[64]])  # 27 <-> 28
    with pytest.raises(ChainError, match="invalid signature s"):
        o.redeem_winning_ticket(ticket, high_s, 9)
    with pytest.raises(ChainError, match="invalid signature"):
        o.redeem_winning_ticket(ticket, good[:64], 9)  # truncated
    assert not o.used_tickets(ticket.hash())


def test_only_recipient_may_redeem_and_rand_must_match(parties: Parties) -> None:
    parties.broadcaster.fund_deposit(ETH)
    ticket = _ticket(parties, rand=11)
    sig = sign_ticket(ticket, parties.b_key)
    with pytest.raises(ChainError, match="msg.sender must be ticket recipient"):
        parties.stranger.redeem_winning_ticket(ticket, sig, 11)
    with pytest.raises(ChainError, match="recipientRand does not match"):
        parties.orchestrator.redeem_winning_ticket(ticket, sig, 12)
    assert not parties.orchestrator.used_tickets(ticket.hash())


def test_batch_redeem(parties: Parties) -> None:
    b, o = parties.broadcaster, parties.orchestrator
    b.fund_deposit(ETH)
    tickets = [_ticket(parties, rand=100 + i, nonce=i, face=ETH // 100) for i in range(3)]
    sigs = [sign_ticket(t, parties.b_key) for t in tickets]
    rands = [100 + i for i in range(3)]
    before = o.balance(o.account)
    receipt = o.batch_redeem_winning_tickets(tickets, sigs, rands)
    assert o.balance(o.account) == before + 3 * ETH // 100 - _gas_cost(receipt)
    assert all(o.used_tickets(t.hash()) for t in tickets)
    with pytest.raises(ChainError, match="ticket is used"):  # all or nothing
        o.batch_redeem_winning_tickets(tickets[:1], sigs[:1], rands[:1])


def test_unlock_then_withdraw_after_period(parties: Parties) -> None:
    b = parties.broadcaster
    w3 = parties.w3
    b.fund_deposit_and_reserve(2 * ETH, ETH)
    with pytest.raises(ChainError, match="no unlock request"):
        b.withdraw()

    b.unlock()
    info = b.get_sender_info(b.account)
    assert info.unlocking and info.withdraw_block == b.block_number() + UNLOCK_PERIOD
    b.cancel_unlock()
    assert not b.get_sender_info(b.account).unlocking

    b.unlock()
    with pytest.raises(ChainError, match="locked"):
        b.withdraw()
    # Tickets stay redeemable while unlocking.
    ticket = _ticket(parties, rand=3)
    parties.orchestrator.redeem_winning_ticket(ticket, sign_ticket(ticket, parties.b_key), 3)

    mine_blocks(w3, UNLOCK_PERIOD)
    before = b.balance(b.account)
    receipt = b.withdraw()
    refund = 3 * ETH - ticket.face_value
    assert b.balance(b.account) == before + refund - _gas_cost(receipt)
    info = b.get_sender_info(b.account)
    assert (info.deposit, info.reserve, info.withdraw_block) == (0, 0, 0)


def test_revert_after_mining_is_reported_with_reason(parties: Parties) -> None:
    """A tx that skips estimation (explicit gas) and reverts in a block still raises ChainError."""
    parties.broadcaster.fund_deposit(ETH)
    o = parties.orchestrator
    ticket = _ticket(parties, rand=21)
    sig = sign_ticket(ticket, parties.b_key)
    o.redeem_winning_ticket(ticket, sig, 21)
    data = o.contract.encode_abi("redeemWinningTicket", args=[_ticket_tuple(ticket), sig, 21])
    tx = {"to": o.address, "data": data, "gas": 200_000}
    with pytest.raises(ChainError, match=r"reverted on chain .*ticket is used"):
        _send(parties.w3, o._account, "redeemWinningTicket", tx)


def test_chain_error_never_contains_private_key(parties: Parties) -> None:
    ticket = _ticket(parties, rand=1)
    with pytest.raises(ChainError) as caught:
        parties.orchestrator.redeem_winning_ticket(ticket, sign_ticket(ticket, parties.b_key), 2)
    text = str(caught.value) + repr(parties.orchestrator)
    assert parties.o_key.hex() not in text and parties.b_key.hex() not in text


# -- anvil --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anvil_w3() -> Iterator[Web3]:
    """A real anvil node; skipped only where neither anvil nor npm exists."""
    if find_anvil() is None and shutil.which("npm") is None:
        pytest.skip("anvil is not installed and npm is not available to install it")
    try:
        binary = find_or_install_anvil()
    except AnvilError as exc:  # npm exists, so this is a real failure, not a skip
        pytest.fail(f"could not install anvil with npm: {exc}")
    with run_anvil(binary=binary) as url:
        yield http_web3(url)


def test_anvil_redeem_and_double_redeem_refusal(anvil_w3: Web3) -> None:
    assert anvil_w3.eth.chain_id == 31337
    parties = _setup(anvil_w3)
    b, o = parties.broadcaster, parties.orchestrator
    b.fund_deposit_and_reserve(ETH, ETH)
    ticket = _ticket(parties, rand=42, creation_round=1, creation_round_block_hash=b"\x01" * 32)
    sig = sign_ticket(ticket, parties.b_key)
    assert b.ticket_hash(ticket) == ticket.hash()

    before = o.balance(o.account)
    receipt = o.redeem_winning_ticket(ticket, sig, 42)
    assert o.balance(o.account) == before + ticket.face_value - _gas_cost(receipt)
    assert o.used_tickets(ticket.hash())
    assert b.get_sender_info(b.account).deposit == ETH - ticket.face_value
    with pytest.raises(ChainError, match="ticket is used"):
        o.redeem_winning_ticket(ticket, sig, 42)

    b.unlock()
    mine_blocks(anvil_w3, UNLOCK_PERIOD)
    b.withdraw()
    assert b.get_sender_info(b.account).deposit == 0
