# pragma version ~=0.4.3
# pragma evm-version cancun
# @title BondingManager (stepstream, minimal)
# @notice Which orchestrators ("transcoders") are active, with what stake, and
#         the fee pool the TicketBroker credits a winner's face value to.
#         Fees leave only through withdrawFees, paid by the Minter.
# @dev Same ABI as Livepeer's BondingManager for transcoderTotalStake,
#      getTranscoderPoolSize, isActiveTranscoder, isRegisteredTranscoder,
#      getTotalBonded, updateTranscoderWithFees, pendingFees and withdrawFees.
#      Simplified: there is no token and no delegation. The Controller owner
#      registers a transcoder with a stake (Livepeer: bond LPT, then
#      transcoder()); it is active from then on, and every fee it earns is
#      its own (Livepeer shares fees with delegators by feeShare).


interface Controller:
    def getContract(_id: bytes32) -> address: view
    def owner() -> address: view

interface RoundsManager:
    def currentRound() -> uint256: view
    def currentRoundInitialized() -> bool: view

interface Minter:
    def trustedWithdrawETH(_to: address, _amount: uint256): nonpayable


event TranscoderActivated:
    transcoder: indexed(address)
    activationRound: uint256

event WithdrawFees:
    delegator: indexed(address)
    recipient: address
    amount: uint256


TICKET_BROKER: constant(bytes32) = keccak256("TicketBroker")
ROUNDS_MANAGER: constant(bytes32) = keccak256("RoundsManager")
MINTER: constant(bytes32) = keccak256("Minter")

controller: public(immutable(address))

stake: HashMap[address, uint256]
fees: HashMap[address, uint256]
poolSize: uint256
totalBonded: uint256


@deploy
def __init__(_controller: address):
    controller = _controller


@view
@internal
def _rounds() -> RoundsManager:
    return RoundsManager(staticcall Controller(controller).getContract(ROUNDS_MANAGER))


@external
def registerTranscoder(_transcoder: address, _stake: uint256):
    """Make `_transcoder` active with `_stake` (Controller owner only; stands in for bonding)."""
    assert msg.sender == staticcall Controller(controller).owner(), "caller must be Controller owner"
    assert _transcoder != empty(address), "invalid transcoder"
    assert _stake > 0, "stake must be positive"
    if self.stake[_transcoder] == 0:
        self.poolSize += 1
    self.totalBonded = self.totalBonded - self.stake[_transcoder] + _stake
    self.stake[_transcoder] = _stake
    log TranscoderActivated(transcoder=_transcoder, activationRound=staticcall self._rounds().currentRound())


@view
@external
def transcoderTotalStake(_transcoder: address) -> uint256:
    return self.stake[_transcoder]


@view
@external
def getTranscoderPoolSize() -> uint256:
    return self.poolSize


@view
@external
def isActiveTranscoder(_transcoder: address) -> bool:
    return self.stake[_transcoder] > 0


@view
@external
def isRegisteredTranscoder(_transcoder: address) -> bool:
    return self.stake[_transcoder] > 0


@view
@external
def getTotalBonded() -> uint256:
    return self.totalBonded


@external
def updateTranscoderWithFees(_transcoder: address, _fees: uint256, _round: uint256):
    """Credit a redeemed ticket's `_fees` to `_transcoder`'s fee pool (TicketBroker only)."""
    assert msg.sender == staticcall Controller(controller).getContract(TICKET_BROKER), "caller must be TicketBroker"
    assert self.stake[_transcoder] > 0, "transcoder must be registered"
    self.fees[_transcoder] += _fees


@view
@external
def pendingFees(_delegator: address, _endRound: uint256) -> uint256:
    """Fees `_delegator` may withdraw now (`_endRound` is unused, as on Livepeer)."""
    return self.fees[_delegator]


@external
def withdrawFees(_recipient: address, _amount: uint256):
    """Send `_amount` of the caller's fees to `_recipient`, paid by the Minter."""
    assert staticcall self._rounds().currentRoundInitialized(), "current round is not initialized"
    assert _recipient != empty(address), "invalid recipient"
    fees: uint256 = self.fees[msg.sender]
    assert fees >= _amount, "insufficient fees to withdraw"
    self.fees[msg.sender] = fees - _amount
    extcall Minter(staticcall Controller(controller).getContract(MINTER)).trustedWithdrawETH(_recipient, _amount)
    log WithdrawFees(delegator=msg.sender, recipient=_recipient, amount=_amount)
