# pragma version ~=0.4.3
# pragma evm-version cancun
# @title Minter (stepstream)
# @notice Holds the ether of ticket deposits, reserves and earned fees, as
#         Livepeer's Minter does: the TicketBroker deposits into it, and it
#         pays out only when the TicketBroker (a withdrawal) or the
#         BondingManager (withdrawFees) asks. Nothing is minted here: there
#         is no token.


interface Controller:
    def getContract(_id: bytes32) -> address: view


TICKET_BROKER: constant(bytes32) = keccak256("TicketBroker")
BONDING_MANAGER: constant(bytes32) = keccak256("BondingManager")

controller: public(immutable(address))


@deploy
def __init__(_controller: address):
    controller = _controller


@external
@payable
def depositETH() -> bool:
    """Take ether from the TicketBroker (ticket funding)."""
    assert msg.sender == staticcall Controller(controller).getContract(TICKET_BROKER), "caller must be TicketBroker"
    return True


@external
def trustedWithdrawETH(_to: address, _amount: uint256):
    """Send `_amount` wei to `_to` for the TicketBroker or the BondingManager."""
    broker: address = staticcall Controller(controller).getContract(TICKET_BROKER)
    bonding: address = staticcall Controller(controller).getContract(BONDING_MANAGER)
    assert msg.sender == broker or msg.sender == bonding, "caller must be TicketBroker or BondingManager"
    raw_call(_to, b"", value=_amount)
