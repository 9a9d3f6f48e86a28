"""Where tickets settle: a Livepeer-shaped deployment on a chain, or nowhere (off-chain mode).

Why one interface: the orchestrator needs the same things whatever the
chain is (a block clock, the round tickets are issued in and judged by, a
sender's funds, whether a ticket was used, a way to redeem it, the fee
pool it fills) and the broadcaster needs funding and stake. The ways to run
are `OnChain` over any JSON-RPC URL, `OnChain` over an embedded py-evm
chain (`EmbeddedChain`, for tests and the Python API), and `Settlement`
itself, off chain.

Every method blocks (web3 is synchronous); async callers run them in a
worker thread. The embedded chain is not thread-safe, so calls to it are
serialised by a lock shared by all its users.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from web3 import Web3

from protocol.pm import MAX_UINT256, Ticket, address_of, recipient_rand_hash, sign_ticket
from protocol.recipient import RoundView, WinningTicket
from settlement.contracts import (
    BondingManager,
    Deployment,
    SenderInfo,
    TicketBroker,
    controller_of,
    resolve,
)
from settlement.deploy import DEFAULT_STAKE, DeployParams, deploy_contracts
from settlement.eth import (
    ChainError,
    Signer,
    embedded_web3,
    fund_account,
    gas_price,
    guard,
    http_web3,
    mine_blocks,
    receipt_cost,
    tx_hash_hex,
)
from settlement.rounds import IssueRound, OffChainRounds, RoundClock, RoundsManager

log = logging.getLogger(__name__)

__all__ = [
    "SECONDS_PER_BLOCK",
    "ChainError",
    "EmbeddedChain",
    "OffChain",
    "OnChain",
    "Redemption",
    "Settlement",
    "connect_chain",
    "offchain_block",
    "settlement_for",
]

SECONDS_PER_BLOCK = 12

PROBE_DEPOSIT = 2
"""Wei of the orchestrator's own deposit that lets it estimate a redemption of a ticket to
itself (face value 1, so the deposit stays non-zero, as a paying sender's does)."""

BATCH_BASE_GAS = 60_000
"""Gas of a batch transaction besides its tickets: intrinsic cost, round check, decoding."""
BATCH_CALL_GAS = 15_000
"""Gas per ticket of a batch besides the redemption itself: re-encoding and the self-call."""

_T = TypeVar("_T")


def offchain_block() -> int:
    """With no chain configured, a 'block' is a 12 s period of wall-clock time."""
    return int(time.time()) // SECONDS_PER_BLOCK


@dataclass(frozen=True)
class Redemption:
    """A mined redemption transaction (one ticket, or a batch)."""

    tx_hash: str
    gas_cost: int
    """Wei the sender of the transaction paid in gas for it."""
    gas_used: int


def batch_gas(redeem_gas: int, tickets: int) -> int:
    """A gas limit giving every ticket of a batch what a lone redemption needs: each
    self-call passes on 63/64 of the gas left, and a ticket short of gas is skipped."""
    return BATCH_BASE_GAS + tickets * (redeem_gas * 64 // 63 + BATCH_CALL_GAS)


class Settlement:
    """Off-chain mode: a wall-clock block, rounds from it, no funds, nothing redeemed."""

    redeems = False
    """Whether winners can be redeemed (and funds checked) here."""

    def __init__(self, current_block: Callable[[], int] = offchain_block) -> None:
        self._current_block = current_block
        self._rounds = OffChainRounds()

    def describe(self) -> str:
        return (
            "no chain configured: tickets are signed, checked and counted and winners "
            "are queued, but nothing is redeemed and no deposit is checked"
        )

    def block_number(self) -> int:
        return self._current_block()

    def issue_round(self) -> IssueRound:
        """The round new ticket parameters name (settlement/rounds.py)."""
        return self._rounds.issue_round(self.block_number())

    def round_view(self, creation_round: int) -> RoundView:
        """What a ticket of `creation_round` is judged by now."""
        return self._rounds.view(self.block_number(), creation_round)

    def sender_info(self, sender: str) -> SenderInfo | None:
        """None: there is no deposit to check off chain."""
        return None

    def claimable_reserve(self, sender: str) -> int:
        return 0

    def redeem_cost(self) -> int:
        return 0

    def fee_pool(self) -> int | None:
        """Fees the chain credited to this account and not withdrawn; None off chain."""
        return None

    def transcoder_stake(self, address: str) -> int:
        return 0

    def is_redeemed(self, ticket_hash: bytes) -> bool:
        raise ChainError("no chain configured: nothing can be redeemed")

    def redeem(self, winner: WinningTicket) -> Redemption:
        raise ChainError("no chain configured: nothing can be redeemed")

    def redeem_batch(self, winners: Sequence[WinningTicket]) -> Redemption:
        raise ChainError("no chain configured: nothing can be redeemed")

    def fund_deposit_and_reserve(self, deposit: int, reserve: int) -> None:
        raise ChainError("no chain configured: there is no TicketBroker to fund")

    def balance(self, address: str) -> int:
        raise ChainError("no chain configured")


OffChain = Settlement


class OnChain(Settlement):
    """One account at a deployment (reached through its Controller), over any Web3 provider."""

    redeems = True

    def __init__(
        self,
        w3: Web3,
        deployment: Deployment,
        private_key: bytes,
        *,
        label: str = "",
        lock: threading.RLock | None = None,
        block_cache_s: float = 0.0,
        initialize_rounds: bool = False,
    ) -> None:
        super().__init__()
        self.w3 = w3
        self.deployment = deployment
        self.signer = Signer(w3, private_key)
        self._key = private_key
        self.broker = TicketBroker(self.signer, deployment.ticket_broker)
        self.bonding = BondingManager(self.signer, deployment.bonding_manager)
        self.rounds_manager = RoundsManager(self.signer, deployment.rounds_manager)
        self.label = label or "chain"
        self._lock = lock
        self._block_cache_s = block_cache_s
        self._block: tuple[float, int] | None = None
        self._initialize_rounds = initialize_rounds
        self._clock: RoundClock | None = None
        self._redeem_gas: int | None = None
        self._redeem_gas_seen = 0

    def __repr__(self) -> str:
        controller = self.deployment.controller
        return f"OnChain({self.label}, controller={controller}, account={self.account})"

    @property
    def account(self) -> str:
        return self.signer.address

    def _call(self, fn: Callable[[], _T]) -> _T:
        if self._lock is None:
            return fn()
        with self._lock:
            return fn()

    def describe(self) -> str:
        d = self.deployment
        return (
            f"settling on {self.label}: Controller {d.controller}, TicketBroker "
            f"{d.ticket_broker}, RoundsManager {d.rounds_manager}, BondingManager "
            f"{d.bonding_manager}, account {self.account}"
        )

    def block_number(self) -> int:
        now = time.monotonic()
        if self._block is not None and now - self._block[0] < self._block_cache_s:
            return self._block[1]
        number = self._call(lambda: int(guard("eth_blockNumber", lambda: self.w3.eth.block_number)))
        self._block = (now, number)
        return number

    def _round_clock(self) -> RoundClock:
        if self._clock is None:
            validity = self.broker.ticket_validity_period()
            self._clock = RoundClock(self.rounds_manager, validity, self._initialize_rounds)
        return self._clock

    def issue_round(self) -> IssueRound:
        block = self.block_number()
        return self._call(lambda: self._round_clock().issue_round(block))

    def round_view(self, creation_round: int) -> RoundView:
        block = self.block_number()
        return self._call(lambda: self._round_clock().view(block, creation_round))

    def sender_info(self, sender: str) -> SenderInfo:
        return self._call(lambda: self.broker.get_sender_info(sender))

    def claimable_reserve(self, sender: str) -> int:
        """This account's share of `sender`'s reserve still claimable this round."""
        return self._call(lambda: self.broker.claimable_reserve(sender, self.account))

    def redeem_gas(self) -> int:
        """Gas one redemption takes on this broker, measured, never assumed: an estimate
        of a probe redemption at first use, raised by every redemption mined since."""
        if self._redeem_gas is None:
            self._redeem_gas = self._call(self._measure_redeem_gas)
        return max(self._redeem_gas, self._redeem_gas_seen)

    def _measure_redeem_gas(self) -> int:
        try:
            gas = self._probe_redemption()
        except ChainError as exc:
            raise ChainError(
                f"cannot measure redemption gas on TicketBroker {self.broker.address}"
                f" (is {self.account} an active transcoder with ether for gas?): {exc}"
            ) from None
        log.info("one redemption takes %d gas on TicketBroker %s", gas, self.broker.address)
        return gas

    def _probe_redemption(self) -> int:
        """eth_estimateGas of redeeming a 1-wei ticket this account signs to itself."""
        me = self.account
        info = self.broker.get_sender_info(me)
        if info.deposit < PROBE_DEPOSIT:
            log.info("funding a %d-wei probe deposit to measure redemption gas", PROBE_DEPOSIT)
            self.broker.fund_deposit(PROBE_DEPOSIT - info.deposit)
        issue = self._round_clock().issue_round(self.block_number())
        rand = secrets.randbits(256)
        probe = Ticket(
            recipient=me,
            sender=me,
            face_value=1,
            win_prob=MAX_UINT256,
            sender_nonce=secrets.randbits(64),
            recipient_rand_hash=recipient_rand_hash(rand),
            creation_round=issue.round,
            creation_round_block_hash=issue.block_hash,
        )
        return self.broker.estimate_redeem(probe, sign_ticket(probe, self._key), rand)

    def _observe(self, gas_used: int) -> None:
        self._redeem_gas_seen = max(self._redeem_gas_seen, gas_used)

    def redeem_cost(self) -> int:
        """Wei one redemption costs now: the measured gas at the price a transaction pays."""
        gas = self.redeem_gas()
        return gas * self._call(lambda: guard("gas price", lambda: gas_price(self.w3)))

    def fee_pool(self) -> int:
        """Fees the BondingManager holds for this account (pendingFees), as the chain records."""
        block = self.block_number()

        def read() -> int:
            current = self._round_clock().current_round(block)
            return self.bonding.pending_fees(self.account, current)

        return self._call(read)

    def transcoder_stake(self, address: str) -> int:
        return self._call(lambda: self.bonding.transcoder_total_stake(address))

    def is_redeemed(self, ticket_hash: bytes) -> bool:
        return self._call(lambda: self.broker.used_tickets(ticket_hash))

    def redeem(self, winner: WinningTicket) -> Redemption:
        receipt = self._call(
            lambda: self.broker.redeem_winning_ticket(
                winner.ticket, winner.sig, winner.recipient_rand
            )
        )
        self._observe(int(receipt["gasUsed"]))
        return Redemption(tx_hash_hex(receipt), receipt_cost(receipt), int(receipt["gasUsed"]))

    def redeem_batch(self, winners: Sequence[WinningTicket]) -> Redemption:
        """One batchRedeemWinningTickets with gas for every ticket. The broker skips bad
        tickets: the caller asks is_redeemed of each afterwards."""
        gas = batch_gas(self.redeem_gas(), len(winners))
        receipt = self._call(
            lambda: self.broker.batch_redeem_winning_tickets(
                [w.ticket for w in winners],
                [w.sig for w in winners],
                [w.recipient_rand for w in winners],
                gas=gas,
            )
        )
        return Redemption(tx_hash_hex(receipt), receipt_cost(receipt), int(receipt["gasUsed"]))

    def fund_deposit_and_reserve(self, deposit: int, reserve: int) -> None:
        self._call(lambda: self.broker.fund_deposit_and_reserve(deposit, reserve))

    def balance(self, address: str) -> int:
        return self._call(
            lambda: int(guard("eth_getBalance", lambda: self.w3.eth.get_balance(address)))
        )  # type: ignore[arg-type]


def connect_chain(
    eth_url: str,
    private_key: bytes,
    *,
    controller: str | None = None,
    broker: str | None = None,
    initialize_rounds: bool = False,
) -> OnChain:
    """An account at the deployment behind a JSON-RPC URL, found through its Controller
    (or through the Controller a bare --ticket-broker names)."""
    w3 = http_web3(eth_url)
    try:
        w3.eth.chain_id  # noqa: B018  # the first request: is the node there at all?
    except Exception as exc:  # transport errors of any provider
        raise ChainError(f"cannot reach {eth_url}: {type(exc).__name__}") from None
    if controller is None:
        if broker is None:
            raise ChainError("give --eth-controller (or --ticket-broker)")
        controller = controller_of(w3, broker)
    deployment = resolve(w3, controller)
    if broker is not None and deployment.ticket_broker.lower() != broker.lower():
        raise ChainError(
            f"--ticket-broker {broker} is not the TicketBroker of Controller {controller}"
            f" ({deployment.ticket_broker})"
        )
    return OnChain(
        w3,
        deployment,
        private_key,
        label=eth_url,
        block_cache_s=1.0,
        initialize_rounds=initialize_rounds,
    )


def settlement_for(
    eth_url: str | None,
    private_key: bytes,
    *,
    controller: str | None = None,
    broker: str | None = None,
    initialize_rounds: bool = False,
) -> Settlement:
    """The settlement the command-line flags ask for: a JSON-RPC chain, or off-chain mode."""
    if eth_url is None:
        if controller is not None or broker is not None:
            raise ChainError("--eth-controller and --ticket-broker need --eth-url")
        return Settlement()
    if controller is None and broker is None:
        raise ChainError("--eth-url needs --eth-controller (deploy a set with deploy-broker)")
    return connect_chain(
        eth_url,
        private_key,
        controller=controller,
        broker=broker,
        initialize_rounds=initialize_rounds,
    )


@dataclass
class EmbeddedChain:
    """An in-process py-evm chain with a freshly deployed set of the project's contracts.

    Orchestrator and broadcaster in one process (tests, the Python API) each
    take an `account(key)`; all of them share one lock around the chain. An
    orchestrator must be `register`ed as a transcoder to be paid.
    """

    w3: Web3 = field(default_factory=embedded_web3)
    lock: threading.RLock = field(default_factory=threading.RLock)
    params: DeployParams = field(default_factory=DeployParams)
    deployment: Deployment | None = None

    def __post_init__(self) -> None:
        self.deployer = secrets.token_bytes(32)
        self.fund(address_of(self.deployer), 10**18)
        if self.deployment is None:
            with self.lock:
                self.deployment = deploy_contracts(self.w3, self.deployer, params=self.params)

    @property
    def controller(self) -> str:
        assert self.deployment is not None
        return self.deployment.controller

    def fund(self, address: str, wei: int) -> None:
        """Give `address` ether from the chain's prefunded account."""
        with self.lock:
            fund_account(self.w3, address, wei)

    def mine(self, blocks: int) -> None:
        with self.lock:
            mine_blocks(self.w3, blocks)

    def register(self, address: str, stake: int = DEFAULT_STAKE) -> None:
        """Make `address` an active transcoder (the deployer owns the Controller)."""
        assert self.deployment is not None
        with self.lock:
            bonding = BondingManager(
                Signer(self.w3, self.deployer), self.deployment.bonding_manager
            )
            bonding.register_transcoder(address, stake)

    def account(self, private_key: bytes, initialize_rounds: bool = True) -> OnChain:
        assert self.deployment is not None
        return OnChain(
            self.w3,
            self.deployment,
            private_key,
            label="the embedded chain",
            lock=self.lock,
            initialize_rounds=initialize_rounds,
        )
