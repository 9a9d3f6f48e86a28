# pragma version ~=0.4.3
# pragma evm-version cancun
# @title Controller (stepstream)
# @notice The registry every other contract and every node resolves through:
#         getContract(keccak256(name)) for "TicketBroker", "RoundsManager",
#         "BondingManager" and "Minter", as on Livepeer (go-livepeer's
#         -ethController). Only the owner registers contracts.
# @dev Same ABI as Livepeer's Controller for getContract, getContractInfo,
#      setContractInfo, owner and paused. Never paused: there is no pause here.


event SetContractInfo:
    id: bytes32
    contractAddress: address
    gitCommitHash: bytes20

event OwnershipTransferred:
    previousOwner: indexed(address)
    newOwner: indexed(address)


struct ContractInfo:
    contractAddress: address
    gitCommitHash: bytes20


owner: public(address)
paused: public(bool)
registry: HashMap[bytes32, ContractInfo]


@deploy
def __init__():
    self.owner = msg.sender
    log OwnershipTransferred(previousOwner=empty(address), newOwner=msg.sender)


@external
def setContractInfo(_id: bytes32, _contractAddress: address, _gitCommitHash: bytes20):
    """Register `_contractAddress` under `_id` (keccak256 of the contract's name)."""
    assert msg.sender == self.owner, "caller is not the owner"
    self.registry[_id] = ContractInfo(contractAddress=_contractAddress, gitCommitHash=_gitCommitHash)
    log SetContractInfo(id=_id, contractAddress=_contractAddress, gitCommitHash=_gitCommitHash)


@external
def transferOwnership(_newOwner: address):
    assert msg.sender == self.owner, "caller is not the owner"
    assert _newOwner != empty(address), "new owner is the zero address"
    log OwnershipTransferred(previousOwner=self.owner, newOwner=_newOwner)
    self.owner = _newOwner


@view
@external
def getContractInfo(_id: bytes32) -> (address, bytes20):
    info: ContractInfo = self.registry[_id]
    return info.contractAddress, info.gitCommitHash


@view
@external
def getContract(_id: bytes32) -> address:
    """The address registered under `_id`; the zero address when none is."""
    return self.registry[_id].contractAddress
