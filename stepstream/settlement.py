"""Where tickets settle: a TicketBroker on a chain, or nowhere (off-chain mode).

Why one interface: the orchestrator needs the same four things whatever the
chain is (a block clock for expiry, a sender's funds, whether a ticket was
used, a way to redeem it) and the broadcaster needs one (funding). The three
ways to run are `OnChain` over any JSON-RPC URL, `OnChain` over an embedded
py-evm chain (`EmbeddedChain`, for tests and the Python API), and `OffChain`.

Every method blocks (web3 is synchronous); async callers run them in a
worker thread. The embedded chain is not thread-safe, so calls to it are
serialised by a lock shared by all its users.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from web3 import Web3

from protocol.pm import address_of
from protocol.recipient import WinningTicket
from stepstream.chain import (
    ChainError,
    SenderInfo,
    TicketBrokerClient,
    embedded_web3,
    fund_account,
    http_web3,
    mine_blocks,
)

REDEEM_GAS = 100_000
"""Gas budgeted for one redeemWinningTicket (measured ~73k, tests/test_chain.py bounds it)."""

SECONDS_PER_BLOCK = 12


def offchain_block() -> int:
    """With no chain configured, a 'block' is a 12 s period of wall-clock time."""
    return int(time.time()) // SECONDS_PER_BLOCK


@dataclass(frozen=True)
class Redemption:
    """A mined redeemWinningTicket transaction."""

    tx_hash: str
    gas_cost: int
    """Wei the recipient paid in gas for it."""


class Settlement:
    """Off-chain mode: a wall-clock block, no funds to check, nothing redeemed."""

    redeems = False
    """Whether winners can be redeemed (and funds checked) here."""

    def __init__(self, current_block: Callable[[], int] = offchain_block) -> None:
        self._current_block = current_block

    def describe(self) -> str:
        return (
            "no chain configured: tickets are signed, checked and counted and winners "
            "are queued, but nothing is redeemed and no deposit is checked"
        )

    def block_number(self) -> int:
        return self._current_block()

    def sender_info(self, sender: str) -> SenderInfo | None:
        """None: there is no deposit to check off chain."""
        return None

    def redeem_cost(self) -> int:
        return 0

    def is_redeemed(self, ticket_hash: bytes) -> bool:
        raise ChainError("no chain configured: nothing can be redeemed")

    def redeem(self, winner: WinningTicket) -> Redemption:
        raise ChainError("no chain configured: nothing can be redeemed")

    def fund_deposit_and_reserve(self, deposit: int, reserve: int) -> None:
        raise ChainError("no chain configured: there is no TicketBroker to fund")

    def balance(self, address: str) -> int:
        raise ChainError("no chain configured")


OffChain = Settlement


class OnChain(Settlement):
    """One account at a deployed TicketBroker, over any Web3 provider."""

    redeems = True

    def __init__(
        self,
        w3: Web3,
        broker_address: str,
        private_key: bytes,
        *,
        label: str = "",
        lock: threading.Lock | None = None,
        block_cache_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.client = TicketBrokerClient(w3, broker_address, private_key)
        self.label = label or "chain"
        self._lock = lock
        self._block_cache_s = block_cache_s
        self._block: tuple[float, int] | None = None

    def __repr__(self) -> str:
        return f"OnChain({self.label}, broker={self.client.address}, account={self.account})"

    @property
    def account(self) -> str:
        return self.client.account

    def _call(self, fn: Callable[[], object]) -> object:
        if self._lock is None:
            return fn()
        with self._lock:
            return fn()

    def describe(self) -> str:
        return (
            f"settling on {self.label}: TicketBroker {self.client.address}, account {self.account}"
        )

    def block_number(self) -> int:
        now = time.monotonic()
        if self._block is not None and now - self._block[0] < self._block_cache_s:
            return self._block[1]
        number = int(self._call(self.client.block_number))  # type: ignore[call-overload]
        self._block = (now, number)
        return number

    def sender_info(self, sender: str) -> SenderInfo:
        return self._call(lambda: self.client.get_sender_info(sender))  # type: ignore[return-value]

    def redeem_cost(self) -> int:
        """Wei one redemption costs now: REDEEM_GAS at the price stepstream.chain pays
        (base fee + priority fee where the chain has a base fee, else the gas price)."""

        def price() -> int:
            eth = self.client.w3.eth
            base_fee = eth.get_block("latest").get("baseFeePerGas")
            return int(eth.gas_price if base_fee is None else base_fee + eth.max_priority_fee)

        return REDEEM_GAS * int(self._call(price))  # type: ignore[call-overload]

    def is_redeemed(self, ticket_hash: bytes) -> bool:
        return bool(self._call(lambda: self.client.used_tickets(ticket_hash)))

    def redeem(self, winner: WinningTicket) -> Redemption:
        receipt = self._call(
            lambda: self.client.redeem_winning_ticket(
                winner.ticket, winner.sig, winner.recipient_rand
            )
        )
        gas = int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])  # type: ignore[index]
        return Redemption("0x" + bytes(receipt["transactionHash"]).hex(), gas)  # type: ignore[index]

    def fund_deposit_and_reserve(self, deposit: int, reserve: int) -> None:
        self._call(lambda: self.client.fund_deposit_and_reserve(deposit, reserve))

    def balance(self, address: str) -> int:
        return int(self._call(lambda: self.client.balance(address)))  # type: ignore[call-overload]


def connect_chain(eth_url: str, broker_address: str, private_key: bytes) -> OnChain:
    """An account at the broker behind a JSON-RPC URL (anvil, a testnet, Arbitrum)."""
    w3 = http_web3(eth_url)
    settlement = OnChain(w3, broker_address, private_key, label=eth_url, block_cache_s=1.0)
    try:
        code = w3.eth.get_code(settlement.client.contract.address)
    except Exception as exc:  # transport errors of any provider
        raise ChainError(f"cannot reach {eth_url}: {type(exc).__name__}") from None
    if not code:
        raise ChainError(f"no contract at {broker_address} on {eth_url}")
    return settlement


@dataclass
class EmbeddedChain:
    """An in-process py-evm chain with a freshly deployed TicketBroker.

    Orchestrator and broadcaster in one process (tests, the Python API) each
    take an `account(key)`; all of them share one lock around the chain.
    """

    w3: Web3 = field(default_factory=embedded_web3)
    lock: threading.Lock = field(default_factory=threading.Lock)
    broker_address: str = ""
    unlock_period: int = 40

    def __post_init__(self) -> None:
        if not self.broker_address:
            import secrets

            deployer = secrets.token_bytes(32)
            self.fund(address_of(deployer), 10**18)
            with self.lock:
                client = TicketBrokerClient.deploy(self.w3, deployer, self.unlock_period)
            self.broker_address = client.address

    def fund(self, address: str, wei: int) -> None:
        """Give `address` ether from the chain's prefunded account."""
        with self.lock:
            fund_account(self.w3, address, wei)

    def mine(self, blocks: int) -> None:
        with self.lock:
            mine_blocks(self.w3, blocks)

    def account(self, private_key: bytes) -> OnChain:
        return OnChain(
            self.w3, self.broker_address, private_key, label="the embedded chain", lock=self.lock
        )


def settlement_for(eth_url: str | None, broker: str | None, private_key: bytes) -> Settlement:
    """The settlement the command-line flags ask for: a JSON-RPC chain, or off-chain mode."""
    if eth_url is None:
        if broker is not None:
            raise ChainError("--ticket-broker needs --eth-url")
        return Settlement()
    if broker is None:
        raise ChainError("--eth-url needs --ticket-broker (deploy one with deploy-broker)")
    return connect_chain(eth_url, broker, private_key)
