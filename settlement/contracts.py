"""The broker and the Controller lookups: which contracts a deployment has, and their calls.

A node is pointed at a deployment the way go-livepeer is (`-ethController`):
by the Controller's address, from which `getContract(keccak256(name))`
gives the TicketBroker, RoundsManager, BondingManager and Minter. The
bindings here speak Livepeer's ABI for every call our nodes make, so the
same code runs against Livepeer's contracts and against the project's own
Vyper ones (contracts/), which are compiled on demand so their ABI never
drifts from their source.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address
from web3 import Web3
from web3.contract.contract import Contract
from web3.types import TxReceipt

from protocol.pm import Ticket, keccak
from settlement.eth import ChainError, Signer, guard

__all__ = [
    "CONTRACTS_DIR",
    "BondingManager",
    "Deployment",
    "SenderInfo",
    "TicketBroker",
    "compile_contract",
    "contract_id",
    "resolve",
    "ticket_tuple",
]

CONTRACTS_DIR = Path(__file__).resolve().parents[1] / "contracts"
"""The project's Vyper sources: Controller, TicketBroker, RoundsManager, BondingManager, Minter."""

NAMES = ("TicketBroker", "RoundsManager", "BondingManager", "Minter")
"""What a node looks up in the Controller (go-livepeer looks up these and more)."""

ZERO_ADDRESS = "0x" + "00" * 20


@functools.cache
def compile_contract(name: str) -> tuple[list[dict[str, Any]], str]:
    """Compile contracts/<name>.vy once per process; return (abi, bytecode hex)."""
    import vyper  # imported lazily: the compiler is slow to import and only needed here

    path = CONTRACTS_DIR / f"{name}.vy"
    out = vyper.compile_code(
        path.read_text(encoding="utf-8"),
        contract_path=str(path),
        output_formats=["abi", "bytecode"],
    )
    return out["abi"], out["bytecode"]


def bind(w3: Web3, name: str, address: str) -> Contract:
    """A web3 contract object for `name`'s ABI at `address`."""
    abi, _ = compile_contract(name)
    return w3.eth.contract(address=to_checksum_address(address), abi=abi)


def contract_id(name: str) -> bytes:
    """The Controller's key for a contract: keccak256 of its name."""
    return keccak(name.encode())


@dataclass(frozen=True)
class Deployment:
    """Addresses of one deployment's contracts, as its Controller registers them."""

    controller: str
    ticket_broker: str
    rounds_manager: str
    bonding_manager: str
    minter: str


def resolve(w3: Web3, controller: str) -> Deployment:
    """Look every contract a node needs up in the Controller at `controller`."""
    if not guard("eth_getCode", lambda: w3.eth.get_code(to_checksum_address(controller))):
        raise ChainError(f"no contract at {controller}")
    registry = bind(w3, "Controller", controller)
    found: dict[str, str] = {}
    for name in NAMES:
        address = guard(
            f"getContract({name})",
            lambda n=name: registry.functions.getContract(contract_id(n)).call(),  # type: ignore[misc]
        )
        if address == ZERO_ADDRESS:
            raise ChainError(f"the Controller at {controller} has no {name} registered")
        found[name] = str(address)
    return Deployment(
        controller=str(registry.address),
        ticket_broker=found["TicketBroker"],
        rounds_manager=found["RoundsManager"],
        bonding_manager=found["BondingManager"],
        minter=found["Minter"],
    )


def controller_of(w3: Web3, broker: str) -> str:
    """The Controller a TicketBroker reports (`controller()`, public on Livepeer's too)."""
    if not guard("eth_getCode", lambda: w3.eth.get_code(to_checksum_address(broker))):
        raise ChainError(f"no contract at {broker}")
    contract = bind(w3, "TicketBroker", broker)
    return str(guard("controller", lambda: contract.functions.controller().call()))


def ticket_tuple(ticket: Ticket) -> tuple[str, str, int, int, int, bytes, bytes]:
    """The ABI tuple go-livepeer passes: (recipient, sender, faceValue, winProb, senderNonce,
    recipientRandHash, auxData)."""
    return (
        to_checksum_address(ticket.recipient),
        to_checksum_address(ticket.sender),
        ticket.face_value,
        ticket.win_prob,
        ticket.sender_nonce,
        ticket.recipient_rand_hash,
        ticket.aux_data(),
    )


@dataclass(frozen=True)
class SenderInfo:
    """A sender's funds at the broker, flattened from getSenderInfo's (Sender, ReserveInfo)."""

    deposit: int
    withdraw_round: int
    """0 when no unlock was started, else the first round in which withdraw() succeeds."""
    reserve: int
    """fundsRemaining: what the reserve holds now."""
    reserve_claimed: int
    """claimedInCurrentRound: paid out of the reserve, to every recipient, this round."""

    @property
    def unlocking(self) -> bool:
        """True once an unlock was started; recipients stop accepting tickets."""
        return self.withdraw_round != 0


class TicketBroker:
    """The TicketBroker's calls, read by anyone, written as `signer`."""

    def __init__(self, signer: Signer, address: str) -> None:
        self.signer = signer
        self.contract = bind(signer.w3, "TicketBroker", address)

    def __repr__(self) -> str:
        return f"TicketBroker({self.address}, account={self.signer.address})"

    @property
    def address(self) -> str:
        return str(self.contract.address)

    # -- writes -------------------------------------------------------------------------

    def fund_deposit_and_reserve(self, deposit: int, reserve: int) -> TxReceipt:
        """Lock `deposit` + `reserve` wei as this account's ticket funds."""
        fn = self.contract.functions.fundDepositAndReserve(deposit, reserve)
        return self.signer.transact("fundDepositAndReserve", fn, value=deposit + reserve)

    def fund_deposit(self, amount: int) -> TxReceipt:
        fn = self.contract.functions.fundDeposit()
        return self.signer.transact("fundDeposit", fn, value=amount)

    def fund_reserve(self, amount: int) -> TxReceipt:
        fn = self.contract.functions.fundReserve()
        return self.signer.transact("fundReserve", fn, value=amount)

    def _redeem_fn(self, ticket: Ticket, sig: bytes, recipient_rand: int) -> Any:
        return self.contract.functions.redeemWinningTicket(
            ticket_tuple(ticket), bytes(sig), recipient_rand
        )

    def redeem_winning_ticket(self, ticket: Ticket, sig: bytes, recipient_rand: int) -> TxReceipt:
        """Redeem one winner (anyone may send it; the fees go to the ticket's recipient)."""
        fn = self._redeem_fn(ticket, sig, recipient_rand)
        return self.signer.transact("redeemWinningTicket", fn)

    def estimate_redeem(self, ticket: Ticket, sig: bytes, recipient_rand: int) -> int:
        """Gas one redeemWinningTicket of this ticket would use now (reverts raise)."""
        fn = self._redeem_fn(ticket, sig, recipient_rand)
        return self.signer.estimate("redeemWinningTicket (estimate)", fn)

    def batch_redeem_winning_tickets(
        self,
        tickets: Sequence[Ticket],
        sigs: Sequence[bytes],
        recipient_rands: Sequence[int],
        gas: int | None = None,
    ) -> TxReceipt:
        """Redeem several winners in one transaction. The broker skips a ticket that fails
        or runs out of gas, so the caller checks usedTickets afterwards."""
        fn = self.contract.functions.batchRedeemWinningTickets(
            [ticket_tuple(t) for t in tickets], [bytes(s) for s in sigs], list(recipient_rands)
        )
        return self.signer.transact("batchRedeemWinningTickets", fn, gas=gas)

    def unlock(self) -> TxReceipt:
        return self.signer.transact("unlock", self.contract.functions.unlock())

    def cancel_unlock(self) -> TxReceipt:
        return self.signer.transact("cancelUnlock", self.contract.functions.cancelUnlock())

    def withdraw(self) -> TxReceipt:
        return self.signer.transact("withdraw", self.contract.functions.withdraw())

    # -- reads --------------------------------------------------------------------------

    def _read(self, what: str, fn: Any) -> Any:
        return guard(what, fn.call)

    def get_sender_info(self, sender: str) -> SenderInfo:
        """Deposit, unlock round and reserve of `sender`."""
        (deposit, withdraw_round), (remaining, claimed) = self._read(
            "getSenderInfo", self.contract.functions.getSenderInfo(to_checksum_address(sender))
        )
        return SenderInfo(deposit, withdraw_round, remaining, claimed)

    def claimable_reserve(self, sender: str, claimant: str) -> int:
        """What `claimant` may still take from `sender`'s reserve this round."""
        fn = self.contract.functions.claimableReserve(
            to_checksum_address(sender), to_checksum_address(claimant)
        )
        return int(self._read("claimableReserve", fn))

    def used_tickets(self, ticket_hash: bytes) -> bool:
        """Whether the ticket with this hash was already redeemed."""
        return bool(self._read("usedTickets", self.contract.functions.usedTickets(ticket_hash)))

    def ticket_hash(self, ticket: Ticket) -> bytes:
        """The hash as the contract computes it; lets callers cross-check protocol.pm."""
        fn = self.contract.functions.getTicketHash(ticket_tuple(ticket))
        return bytes(self._read("getTicketHash", fn))

    def unlock_period(self) -> int:
        """Rounds between unlock() and withdraw()."""
        return int(self._read("unlockPeriod", self.contract.functions.unlockPeriod()))

    def ticket_validity_period(self) -> int:
        """Rounds a ticket stays redeemable after its creation round."""
        fn = self.contract.functions.ticketValidityPeriod()
        return int(self._read("ticketValidityPeriod", fn))


class BondingManager:
    """Stake, the active pool, and the fee pool that redeemed tickets credit."""

    def __init__(self, signer: Signer, address: str) -> None:
        self.signer = signer
        self.contract = bind(signer.w3, "BondingManager", address)

    @property
    def address(self) -> str:
        return str(self.contract.address)

    def transcoder_total_stake(self, transcoder: str) -> int:
        fn = self.contract.functions.transcoderTotalStake(to_checksum_address(transcoder))
        return int(guard("transcoderTotalStake", fn.call))

    def pool_size(self) -> int:
        fn = self.contract.functions.getTranscoderPoolSize()
        return int(guard("getTranscoderPoolSize", fn.call))

    def is_active(self, transcoder: str) -> bool:
        fn = self.contract.functions.isActiveTranscoder(to_checksum_address(transcoder))
        return bool(guard("isActiveTranscoder", fn.call))

    def pending_fees(self, delegator: str, end_round: int) -> int:
        """The fee pool: fees `delegator` may withdraw now."""
        fn = self.contract.functions.pendingFees(to_checksum_address(delegator), end_round)
        return int(guard("pendingFees", fn.call))

    def withdraw_fees(self, recipient: str, amount: int) -> TxReceipt:
        fn = self.contract.functions.withdrawFees(to_checksum_address(recipient), amount)
        return self.signer.transact("withdrawFees", fn)

    def register_transcoder(self, transcoder: str, stake: int) -> TxReceipt:
        """The project's contracts only (Controller owner): make `transcoder` active."""
        fn = self.contract.functions.registerTranscoder(to_checksum_address(transcoder), stake)
        return self.signer.transact("registerTranscoder", fn)
