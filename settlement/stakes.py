"""Stake for selection, read from the BondingManager where a chain is configured.

Selection weighs orchestrators by stake (go-livepeer: 0.7 of the draw). An
orchestrator's stake is `transcoderTotalStake(address)`, its address being
the one its `info` names; `ChainStakes` maps each orchestrator URL to it,
refreshed from the chain after discovery, so selection (which runs on the
event loop) never waits for a node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import anyio

from protocol.pm import to_checksum_address
from settlement.chain import Settlement
from settlement.eth import ChainError


class ChainStakes(Mapping[str, int]):
    """Stake per orchestrator URL, as last read from the chain (0 when unknown)."""

    def __init__(self, chain: Settlement) -> None:
        self.chain = chain
        self._stakes: dict[str, int] = {}

    def refresh(self, addresses: Mapping[str, bytes]) -> None:
        """Read the stake of each orchestrator, given its URL and the address its info
        names (blocking: run in a thread). A failed read keeps the last value."""
        stakes = {}
        for url, address in addresses.items():
            try:
                stakes[url] = self.chain.transcoder_stake(to_checksum_address(address))
            except ChainError:
                stakes[url] = self._stakes.get(url, 0)
        self._stakes = stakes

    def __getitem__(self, url: str) -> int:
        return self._stakes[url]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stakes)

    def __len__(self) -> int:
        return len(self._stakes)


async def keep_fresh(
    stakes: ChainStakes, addresses: Callable[[], Mapping[str, bytes]], interval: float
) -> None:
    """Refresh `stakes` every `interval` seconds; every second until discovery (running
    alongside) has named an orchestrator."""
    while True:
        known = addresses()
        await anyio.to_thread.run_sync(stakes.refresh, known)
        await anyio.sleep(interval if known else min(interval, 1.0))
