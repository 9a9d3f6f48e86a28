"""`stepstream deploy-broker`: the project's contracts on a chain, behind one Controller.

Prints the Controller's address: the value of --eth-controller for the
orchestrator, generate and the gateway. With --eth-controller it deploys
nothing and registers the given transcoders on that set instead.
"""

from __future__ import annotations

import argparse
import sys

from settlement.contracts import BondingManager, resolve
from settlement.deploy import DEFAULT_STAKE, DeployParams, deploy_contracts
from settlement.eth import ChainError, Signer, http_web3
from stepstream.keys import KeyFileError, load_private_key


def parse_transcoder(text: str) -> tuple[str, int]:
    """`ADDRESS` or `ADDRESS=STAKE` (wei)."""
    address, _, stake = text.partition("=")
    if not (address.startswith("0x") and len(address) == 42):
        raise ValueError(f"--transcoder {text!r}: not a 0x address")
    try:
        value = int(stake) if stake else DEFAULT_STAKE
    except ValueError:
        raise ValueError(f"--transcoder {text!r}: the stake is not a whole number of wei") from None
    if value <= 0:
        raise ValueError(f"--transcoder {text!r}: the stake must be positive")
    return address, value


def run_deploy_broker(args: argparse.Namespace) -> int:
    """Deploy the set (or reuse --eth-controller's), register transcoders, print the Controller."""
    try:
        transcoders = [parse_transcoder(t) for t in args.transcoder]
        key = load_private_key(args.key, args.key_password_file)
        w3 = http_web3(args.eth_url)
        if args.eth_controller is None:
            params = DeployParams(args.round_length, args.unlock_period, args.ticket_validity)
            deployment = deploy_contracts(w3, key, transcoders, params)
        else:
            deployment = resolve(w3, args.eth_controller)
            bonding = BondingManager(Signer(w3, key), deployment.bonding_manager)
            for address, stake in transcoders:
                bonding.register_transcoder(address, stake)
    except (ValueError, KeyFileError, ChainError) as exc:
        print(f"stepstream deploy-broker: {exc}", file=sys.stderr)
        return 2
    print(
        f"TicketBroker {deployment.ticket_broker}, RoundsManager {deployment.rounds_manager}, "
        f"BondingManager {deployment.bonding_manager}, Minter {deployment.minter}",
        file=sys.stderr,
    )
    print(deployment.controller)
    return 0
