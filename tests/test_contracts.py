"""The project's contracts judge tickets as Livepeer's TicketBroker does.

One test for each case where Livepeer's broker refuses a ticket (issue 10's
first table) and for each case where it behaves otherwise than refusing
(the second table), on an in-process py-evm chain; then the redeem path
again on a real anvil node.
"""

from __future__ import annotations

import dataclasses
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
from settlement.contracts import BondingManager, Deployment, TicketBroker, ticket_tuple
from settlement.deploy import DeployParams, deploy_contracts
from settlement.eth import (
    ChainError,
    Signer,
    embedded_web3,
    fund_account,
    http_web3,
    mine_blocks,
    receipt_cost,
)
from settlement.rounds import RoundsManager
from stepstream.anvil import AnvilError, find_anvil, find_or_install_anvil, run_anvil

ETH = 10**18
ROUND = 50  # blocks per round here: each transaction mines a block
PARAMS = DeployParams(round_length=ROUND, unlock_period=2, ticket_validity_period=2)


@dataclass
class Parties:
    """A fresh deployment, a broadcaster (ticket sender), an orchestrator (recipient,
    an active transcoder) and a stranger; each binding signs as its party."""

    w3: Web3
    deployment: Deployment
    b_key: bytes = field(repr=False)
    o_key: bytes = field(repr=False)
    s_key: bytes = field(repr=False)
    deployer_key: bytes = field(repr=False)

    def broker(self, key: bytes) -> TicketBroker:
        return TicketBroker(Signer(self.w3, key), self.deployment.ticket_broker)

    def bonding(self, key: bytes) -> BondingManager:
        return BondingManager(Signer(self.w3, key), self.deployment.bonding_manager)

    @property
    def rounds(self) -> RoundsManager:
        return RoundsManager(Signer(self.w3, self.s_key), self.deployment.rounds_manager)

    @property
    def b(self) -> TicketBroker:
        return self.broker(self.b_key)

    @property
    def o(self) -> TicketBroker:
        return self.broker(self.o_key)

    @property
    def o_address(self) -> str:
        return address_of(self.o_key)

    def fees(self) -> int:
        return self.bonding(self.o_key).pending_fees(self.o_address, 0)

    def next_round(self) -> None:
        """Mine to the next round and initialize it."""
        mine_blocks(self.w3, ROUND)
        self.rounds.initialize_round()

    def ticket(
        self, *, rand: int, nonce: int = 1, face: int = ETH // 10, win_prob: int = MAX_UINT256
    ) -> Ticket:
        """A ticket in the last initialized round (so its auxData is what the broker wants)."""
        round_ = self.rounds.last_initialized_round()
        return Ticket(
            recipient=self.o_address,
            sender=address_of(self.b_key),
            face_value=face,
            win_prob=win_prob,
            sender_nonce=nonce,
            recipient_rand_hash=recipient_rand_hash(rand),
            creation_round=round_,
            creation_round_block_hash=self.rounds.block_hash_for_round(round_),
        )

    def sign(self, ticket: Ticket) -> bytes:
        return sign_ticket(ticket, self.b_key)


def _setup(w3: Web3, params: DeployParams = PARAMS) -> Parties:
    keys = [os.urandom(32) for _ in range(4)]
    for key in keys:
        fund_account(w3, address_of(key), 100 * ETH)
    deployer, b_key, o_key, s_key = keys
    deployment = deploy_contracts(w3, deployer, [(address_of(o_key), ETH)], params)
    return Parties(w3, deployment, b_key, o_key, s_key, deployer)


@pytest.fixture(scope="module")
def embedded() -> Web3:
    return embedded_web3()


@pytest.fixture
def parties(embedded: Web3) -> Parties:
    return _setup(embedded)


# -- basics ---------------------------------------------------------------------------


def test_contract_ticket_hash_matches_protocol_pm(parties: Parties) -> None:
    with_aux = parties.ticket(rand=7)
    assert len(with_aux.aux_data()) == 64
    plain = dataclasses.replace(with_aux, creation_round=0, creation_round_block_hash=bytes(32))
    assert plain.aux_data() == b""
    for ticket in (plain, with_aux):
        assert parties.b.ticket_hash(ticket) == ticket.hash()


def test_funding_shows_in_sender_info_and_sits_in_the_minter(parties: Parties) -> None:
    b = parties.b
    b.fund_deposit_and_reserve(2 * ETH, ETH)
    b.fund_deposit(ETH)
    b.fund_reserve(ETH)
    info = b.get_sender_info(address_of(parties.b_key))
    assert (info.deposit, info.reserve, info.withdraw_round, info.reserve_claimed) == (
        3 * ETH,
        2 * ETH,
        0,
        0,
    )
    w3, d = parties.w3, parties.deployment
    assert w3.eth.get_balance(d.minter) == 5 * ETH and w3.eth.get_balance(d.ticket_broker) == 0
    mismatched = b.contract.functions.fundDepositAndReserve(ETH, ETH)
    with pytest.raises(ChainError, match="msg.value"):
        b.signer.transact("fundDepositAndReserve", mismatched, value=ETH)


def test_winner_redeems_once_into_the_fee_pool(parties: Parties) -> None:
    b, o = parties.b, parties.o
    b.fund_deposit_and_reserve(ETH, ETH)
    rand = int.from_bytes(os.urandom(32), "big")
    ticket = parties.ticket(rand=rand)
    sig = parties.sign(ticket)
    assert not o.used_tickets(ticket.hash())
    o.redeem_winning_ticket(ticket, sig, rand)
    assert parties.fees() == ticket.face_value
    info = b.get_sender_info(address_of(parties.b_key))
    assert (info.deposit, info.reserve) == (ETH - ticket.face_value, ETH)
    assert o.used_tickets(ticket.hash())
    with pytest.raises(ChainError, match="ticket is used"):
        o.redeem_winning_ticket(ticket, sig, rand)
    assert parties.fees() == ticket.face_value


def test_losing_forged_and_mismatched_tickets_revert(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    o = parties.o
    losing = parties.ticket(rand=5, win_prob=0)
    with pytest.raises(ChainError, match="did not win"):
        o.redeem_winning_ticket(losing, parties.sign(losing), 5)
    ticket = parties.ticket(rand=9)
    with pytest.raises(ChainError, match="invalid signature over ticket hash"):
        o.redeem_winning_ticket(ticket, sign_ticket(ticket, os.urandom(32)), 9)
    good = parties.sign(ticket)
    s = int.from_bytes(good[32:64], "big")
    high_s = good[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - good[64]])
    with pytest.raises(ChainError, match="invalid signature 's' value"):
        o.redeem_winning_ticket(ticket, high_s, 9)
    with pytest.raises(ChainError, match="INVALID_SIGNATURE_LENGTH"):
        o.redeem_winning_ticket(ticket, good[:64], 9)
    with pytest.raises(ChainError, match="recipientRand does not match"):
        o.redeem_winning_ticket(ticket, good, 10)
    assert not o.used_tickets(ticket.hash()) and parties.fees() == 0


# -- issue 10, first table: what Livepeer's broker refuses, so must ours ---------------------


def test_refuses_empty_aux_data(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    t = parties.ticket(rand=1)
    bare = dataclasses.replace(t, creation_round=0, creation_round_block_hash=bytes(32))
    with pytest.raises(ChainError, match="invalid length for ticket auxData: must be 64 bytes"):
        parties.o.redeem_winning_ticket(bare, parties.sign(bare), 1)


def test_refuses_a_round_never_initialized_or_expired(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    o = parties.o
    t = parties.ticket(rand=2)
    ahead = dataclasses.replace(t, creation_round=t.creation_round + 1)
    with pytest.raises(ChainError, match="ticket creationRound does not have a block hash"):
        o.redeem_winning_ticket(ahead, parties.sign(ahead), 2)
    old = parties.ticket(rand=3)
    parties.next_round()  # one round later: still inside the validity period of 2
    kept = parties.ticket(rand=4, nonce=2)
    parties.next_round()  # two rounds later: `old` has expired, `kept` has not
    with pytest.raises(ChainError, match="ticket is expired"):
        o.redeem_winning_ticket(old, parties.sign(old), 3)
    o.redeem_winning_ticket(kept, parties.sign(kept), 4)
    assert parties.fees() == kept.face_value


def test_refuses_a_block_hash_not_the_rounds(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    t = parties.ticket(rand=5)
    wrong = dataclasses.replace(t, creation_round_block_hash=b"\x01" * 32)
    with pytest.raises(ChainError, match="creationRoundBlockHash invalid for creationRound"):
        parties.o.redeem_winning_ticket(wrong, parties.sign(wrong), 5)


def test_refuses_v_0_or_1(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    ticket = parties.ticket(rand=6)
    sig = parties.sign(ticket)
    for unshifted in (sig[:64] + bytes([sig[64] - 27]), sig[:64] + bytes([1 - (sig[64] - 27)])):
        with pytest.raises(ChainError, match="invalid signature 'v' value"):
            parties.o.redeem_winning_ticket(ticket, unshifted, 6)
    assert not parties.o.used_tickets(ticket.hash())


def test_refuses_a_sender_with_no_deposit_and_no_reserve(parties: Parties) -> None:
    ticket = parties.ticket(rand=7)
    with pytest.raises(ChainError, match="sender deposit and reserve are zero"):
        parties.o.redeem_winning_ticket(ticket, parties.sign(ticket), 7)
    assert not parties.o.used_tickets(ticket.hash())


def test_refuses_redeem_after_the_unlock_period(parties: Parties) -> None:
    b, o = parties.b, parties.o
    b.fund_deposit_and_reserve(ETH, ETH)
    b.unlock()
    during = parties.ticket(rand=8)
    o.redeem_winning_ticket(during, parties.sign(during), 8)  # unlocking: still redeemable
    with pytest.raises(ChainError, match="account is locked"):
        b.withdraw()
    parties.next_round()
    parties.next_round()  # the 2-round unlock period has passed
    after = parties.ticket(rand=9, nonce=2)
    with pytest.raises(ChainError, match="sender is unlocked"):
        o.redeem_winning_ticket(after, parties.sign(after), 9)
    before = parties.w3.eth.get_balance(address_of(parties.b_key))
    receipt = b.withdraw()
    refund = 2 * ETH - during.face_value
    assert parties.w3.eth.get_balance(address_of(parties.b_key)) == (
        before + refund - receipt_cost(receipt)
    )


# -- issue 10, second table: where Livepeer's broker does not refuse ------------------------


def test_anyone_may_redeem_and_the_recipient_is_credited(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    ticket = parties.ticket(rand=11)
    stranger = parties.broker(parties.s_key)
    stranger.redeem_winning_ticket(ticket, parties.sign(ticket), 11)
    assert parties.fees() == ticket.face_value
    assert parties.bonding(parties.s_key).pending_fees(address_of(parties.s_key), 0) == 0


def test_batch_skips_a_bad_ticket_and_redeems_the_rest(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    tickets = [parties.ticket(rand=100 + i, nonce=i, face=ETH // 100) for i in range(3)]
    sigs = [parties.sign(t) for t in tickets]
    rands = [100 + i for i in range(3)]
    rands[1] += 1  # the middle ticket's rand does not match: Livepeer's batch skips it
    parties.o.batch_redeem_winning_tickets(tickets, sigs, rands, gas=2_000_000)
    used = [parties.o.used_tickets(t.hash()) for t in tickets]
    assert used == [True, False, True]
    assert parties.fees() == 2 * ETH // 100


def test_batch_of_more_than_32_tickets(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    tickets = [parties.ticket(rand=1000 + i, nonce=i, face=1000) for i in range(33)]
    sigs = [parties.sign(t) for t in tickets]
    receipt = parties.o.batch_redeem_winning_tickets(
        tickets, sigs, [1000 + i for i in range(33)], gas=8_000_000
    )
    assert all(parties.o.used_tickets(t.hash()) for t in tickets)
    assert parties.fees() == 33 * 1000
    assert receipt["gasUsed"] < 8_000_000


def test_batch_short_of_gas_skips_tickets_silently(parties: Parties) -> None:
    """What the redeemer guards against: the transaction succeeds, some tickets are not used."""
    parties.b.fund_deposit(ETH)
    tickets = [parties.ticket(rand=200 + i, nonce=i, face=1000) for i in range(2)]
    sigs = [parties.sign(t) for t in tickets]
    receipt = parties.o.batch_redeem_winning_tickets(tickets, sigs, [200, 201], gas=190_000)
    assert receipt["status"] == 1
    assert [parties.o.used_tickets(t.hash()) for t in tickets] == [True, False]


def test_reserve_pays_each_recipient_its_share_per_round(parties: Parties) -> None:
    b, o = parties.b, parties.o
    b_address = address_of(parties.b_key)
    for _ in range(3):  # four active transcoders in all
        parties.bonding(parties.deployer_key).register_transcoder(address_of(os.urandom(32)), 1)
    b.fund_deposit_and_reserve(0, 4 * ETH)
    assert o.claimable_reserve(b_address, parties.o_address) == ETH
    big = parties.ticket(rand=20, face=3 * ETH)
    o.redeem_winning_ticket(big, parties.sign(big), 20)
    assert parties.fees() == ETH  # a quarter of the reserve, not the face value
    info = b.get_sender_info(b_address)
    assert (info.reserve, info.reserve_claimed) == (3 * ETH, ETH)
    assert o.claimable_reserve(b_address, parties.o_address) == 0
    again = parties.ticket(rand=21, nonce=2, face=ETH)
    o.redeem_winning_ticket(again, parties.sign(again), 21)  # nothing left to claim this round
    assert parties.fees() == ETH and o.used_tickets(again.hash())
    # Not an active transcoder: no share at all.
    assert o.claimable_reserve(b_address, address_of(parties.s_key)) == 0
    parties.next_round()  # a new round: a quarter of what remains
    assert o.claimable_reserve(b_address, parties.o_address) == 3 * ETH // 4


def test_fees_go_to_the_fee_pool_and_out_with_withdraw_fees(parties: Parties) -> None:
    parties.b.fund_deposit(ETH)
    o_address = parties.o_address
    before = parties.w3.eth.get_balance(o_address)
    ticket = parties.ticket(rand=30)
    receipt = parties.o.redeem_winning_ticket(ticket, parties.sign(ticket), 30)
    # No ether moved to the recipient: it paid gas, and the fee pool holds the face value.
    assert parties.w3.eth.get_balance(o_address) == before - receipt_cost(receipt)
    assert parties.fees() == ticket.face_value
    bonding = parties.bonding(parties.o_key)
    with pytest.raises(ChainError, match="insufficient fees to withdraw"):
        bonding.withdraw_fees(o_address, ticket.face_value + 1)
    before = parties.w3.eth.get_balance(o_address)
    receipt = bonding.withdraw_fees(o_address, ticket.face_value)
    assert parties.w3.eth.get_balance(o_address) == (
        before + ticket.face_value - receipt_cost(receipt)
    )
    assert parties.fees() == 0


def test_only_the_broker_credits_fees_and_only_the_owner_registers(parties: Parties) -> None:
    bonding = parties.bonding(parties.s_key)
    with pytest.raises(ChainError, match="caller must be TicketBroker"):
        bonding.signer.transact(
            "updateTranscoderWithFees",
            bonding.contract.functions.updateTranscoderWithFees(parties.o_address, 1, 1),
        )
    with pytest.raises(ChainError, match="caller must be Controller owner"):
        bonding.register_transcoder(address_of(parties.s_key), 1)


# -- errors ---------------------------------------------------------------------------


def test_revert_after_mining_is_reported_with_reason(parties: Parties) -> None:
    """A tx that skips estimation (explicit gas) and reverts in a block still raises ChainError."""
    parties.b.fund_deposit(ETH)
    o = parties.o
    ticket = parties.ticket(rand=21)
    sig = parties.sign(ticket)
    o.redeem_winning_ticket(ticket, sig, 21)
    data = o.contract.encode_abi("redeemWinningTicket", args=[ticket_tuple(ticket), sig, 21])
    tx = {"to": o.address, "data": data, "gas": 300_000}
    with pytest.raises(ChainError, match=r"reverted on chain .*ticket is used"):
        o.signer.send_raw("redeemWinningTicket", tx)


def test_chain_error_never_contains_private_key(parties: Parties) -> None:
    ticket = parties.ticket(rand=1)
    with pytest.raises(ChainError) as caught:
        parties.o.redeem_winning_ticket(ticket, parties.sign(ticket), 2)
    text = str(caught.value) + repr(parties.o) + repr(parties.o.signer)
    assert parties.o_key.hex() not in text and parties.b_key.hex() not in text


# -- anvil ----------------------------------------------------------------------------


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
    parties = _setup(anvil_w3, DeployParams(round_length=1000))
    b, o = parties.b, parties.o
    b.fund_deposit_and_reserve(ETH, ETH)
    ticket = parties.ticket(rand=42)
    sig = parties.sign(ticket)
    assert b.ticket_hash(ticket) == ticket.hash()
    o.redeem_winning_ticket(ticket, sig, 42)
    assert parties.fees() == ticket.face_value
    assert o.used_tickets(ticket.hash())
    assert b.get_sender_info(address_of(parties.b_key)).deposit == ETH - ticket.face_value
    with pytest.raises(ChainError, match="ticket is used"):
        o.redeem_winning_ticket(ticket, sig, 42)
