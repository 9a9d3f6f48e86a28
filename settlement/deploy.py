"""Deploying the project's contracts as one Livepeer-shaped set behind a Controller.

`stepstream deploy-broker`, the demo and the tests deploy with this: a
Controller, then a Minter, RoundsManager, BondingManager and TicketBroker
registered in it under keccak256 of their names, the first round
initialized, and the given orchestrators registered as active transcoders
(on Livepeer they bond LPT; here the Controller owner registers them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from web3 import Web3

from settlement.contracts import BondingManager, Deployment, compile_contract, contract_id
from settlement.eth import Signer
from settlement.rounds import RoundsManager

__all__ = ["DEFAULT_ROUND_LENGTH", "DeployParams", "deploy_contracts"]

DEFAULT_ROUND_LENGTH = 100
"""Blocks per round on a fresh deployment (Livepeer: 5760 L1 blocks)."""
DEFAULT_UNLOCK_PERIOD = 2
"""Rounds between unlock() and withdraw()."""
DEFAULT_TICKET_VALIDITY = 2
"""Rounds a ticket stays redeemable: Livepeer's default ticketValidityPeriod."""
DEFAULT_STAKE = 10**18


@dataclass(frozen=True)
class DeployParams:
    round_length: int = DEFAULT_ROUND_LENGTH
    unlock_period: int = DEFAULT_UNLOCK_PERIOD
    ticket_validity_period: int = DEFAULT_TICKET_VALIDITY


def deploy_contracts(
    w3: Web3,
    deployer_key: bytes,
    transcoders: Sequence[tuple[str, int]] = (),
    params: DeployParams = DeployParams(),
) -> Deployment:
    """Deploy and wire the set; `transcoders` are (address, stake) made active at once."""
    signer = Signer(w3, deployer_key)

    def deploy(name: str, *args: object) -> str:
        abi, bytecode = compile_contract(name)
        return signer.deploy(f"deploy {name}", abi, bytecode, *args)

    controller = deploy("Controller")
    deployment = Deployment(
        controller=controller,
        minter=deploy("Minter", controller),
        rounds_manager=deploy("RoundsManager", controller, params.round_length),
        bonding_manager=deploy("BondingManager", controller),
        ticket_broker=deploy(
            "TicketBroker", controller, params.unlock_period, params.ticket_validity_period
        ),
    )
    registry = w3.eth.contract(address=controller, abi=compile_contract("Controller")[0])
    for name, address in (
        ("Minter", deployment.minter),
        ("RoundsManager", deployment.rounds_manager),
        ("BondingManager", deployment.bonding_manager),
        ("TicketBroker", deployment.ticket_broker),
    ):
        fn = registry.functions.setContractInfo(contract_id(name), address, bytes(20))
        signer.transact(f"setContractInfo({name})", fn)
    RoundsManager(signer, deployment.rounds_manager).initialize_round()
    bonding = BondingManager(signer, deployment.bonding_manager)
    for address, stake in transcoders:
        bonding.register_transcoder(address, stake)
    return deployment
