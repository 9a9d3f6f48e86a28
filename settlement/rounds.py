"""Rounds: which round tickets are issued in, and whether a ticket's round is still good.

Livepeer's broker redeems a ticket only when its auxData names an
initialized round, that round's block hash, and a round no older than
`ticketValidityPeriod` rounds. So an orchestrator issues parameters in the
last initialized round (as go-livepeer does) and refuses tickets whose
round the broker would refuse (protocol/recipient.py judges, from a
`RoundView` read here).

Off chain there is no RoundsManager: the round is a function of the block
clock, `block // OFFCHAIN_ROUND_BLOCKS`, with no block hash to check.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from protocol.recipient import RoundView
from settlement.contracts import bind
from settlement.eth import ChainError, Signer, guard

__all__ = [
    "OFFCHAIN_ROUND_BLOCKS",
    "OFFCHAIN_VALIDITY_ROUNDS",
    "IssueRound",
    "OffChainRounds",
    "RoundClock",
    "RoundsManager",
]

OFFCHAIN_ROUND_BLOCKS = 5760
"""Blocks per round with no chain: Livepeer's round length (5760 L1 blocks, ~19 h at 12 s)."""

OFFCHAIN_VALIDITY_ROUNDS = 2
"""Rounds a ticket stays good with no chain: Livepeer's default ticketValidityPeriod."""


@dataclass(frozen=True)
class IssueRound:
    """The round new ticket parameters name, and its block hash."""

    round: int
    block_hash: bytes


class RoundsManager:
    """The RoundsManager's calls (Livepeer's ABI)."""

    def __init__(self, signer: Signer, address: str) -> None:
        self.signer = signer
        self.contract = bind(signer.w3, "RoundsManager", address)

    @property
    def address(self) -> str:
        return str(self.contract.address)

    def current_round(self) -> int:
        return int(guard("currentRound", self.contract.functions.currentRound().call))

    def current_round_initialized(self) -> bool:
        fn = self.contract.functions.currentRoundInitialized()
        return bool(guard("currentRoundInitialized", fn.call))

    def last_initialized_round(self) -> int:
        fn = self.contract.functions.lastInitializedRound()
        return int(guard("lastInitializedRound", fn.call))

    def block_hash_for_round(self, round_: int) -> bytes:
        fn = self.contract.functions.blockHashForRound(round_)
        return bytes(guard("blockHashForRound", fn.call))

    def round_length(self) -> int:
        return int(guard("roundLength", self.contract.functions.roundLength().call))

    def initialize_round(self) -> None:
        fn = self.contract.functions.initializeRound()
        self.signer.transact("initializeRound", fn)


class OffChainRounds:
    """Rounds as a function of the block clock, when no chain is configured."""

    def issue_round(self, block: int) -> IssueRound:
        """The current off-chain round; there is no block hash to name."""
        return IssueRound(block // OFFCHAIN_ROUND_BLOCKS, bytes(32))

    def view(self, block: int, creation_round: int) -> RoundView:
        return RoundView(block // OFFCHAIN_ROUND_BLOCKS, OFFCHAIN_VALIDITY_ROUNDS, None)


class RoundClock:
    """A RoundsManager read through caches: the current round once per block, each
    round's block hash once (it never changes), the validity period once.

    With `initialize`, the clock starts a round that nobody has initialized
    when it needs one (go-livepeer's -initializeRound): one transaction per
    round, needed before any ticket of that round can be issued or redeemed.
    """

    def __init__(self, rounds: RoundsManager, validity_rounds: int, initialize: bool) -> None:
        self.rounds = rounds
        self.validity_rounds = validity_rounds
        self.initialize = initialize
        self._hashes: dict[int, bytes] = {}
        self._current: tuple[int, int] | None = None  # (block, round)
        self._lock = threading.Lock()

    def current_round(self, block: int) -> int:
        with self._lock:
            if self._current is None or self._current[0] != block:
                self._current = (block, self.rounds.current_round())
            return self._current[1]

    def block_hash(self, round_: int) -> bytes:
        """The round's block hash; zero while it is not initialized (not cached then)."""
        with self._lock:
            known = self._hashes.get(round_)
        if known is not None:
            return known
        found = self.rounds.block_hash_for_round(round_)
        if found != bytes(32):
            with self._lock:
                self._hashes[round_] = found
        return found

    def issue_round(self, block: int) -> IssueRound:
        """The last initialized round and its hash; with `initialize`, the current round
        is initialized first if nobody has done so."""
        current = self.current_round(block)
        if self.block_hash(current) == bytes(32) and self.initialize:
            try:
                self.rounds.initialize_round()
            except ChainError as exc:
                if "already initialized" not in str(exc):
                    raise
        latest = self.rounds.last_initialized_round()
        block_hash = self.block_hash(latest)
        if block_hash == bytes(32):
            raise ChainError(
                f"no round is initialized on RoundsManager {self.rounds.address}; "
                "start one with initializeRound() (orchestrator --initialize-round)"
            )
        return IssueRound(latest, block_hash)

    def view(self, block: int, creation_round: int) -> RoundView:
        """What the broker would judge a ticket of `creation_round` by, at `block`."""
        return RoundView(
            self.current_round(block), self.validity_rounds, self.block_hash(creation_round)
        )
