# pragma version ~=0.4.3
# pragma evm-version cancun
# @title RoundsManager (stepstream)
# @notice Rounds of `roundLength` blocks, initialized by anyone with
#         initializeRound(), which records the hash of the block before it
#         as the round's block hash. Tickets name a round and that hash.
# @dev Same ABI as Livepeer's RoundsManager for currentRound,
#      currentRoundInitialized, blockHashForRound, lastInitializedRound,
#      roundLength, currentRoundStartBlock, blockNum and initializeRound.
#      Simplified: the round length is fixed at deployment, round 1 begins
#      at the deployment block (Livepeer counts from its genesis block), so
#      round 0 never exists and a ticket naming it is refused, and
#      initializing a round records its hash and nothing else (Livepeer's
#      also snapshots the active stake and sets the round's rewards).


event NewRound:
    round: indexed(uint256)
    blockHash: bytes32


controller: public(immutable(address))
roundLength: public(immutable(uint256))
firstBlock: immutable(uint256)

lastInitializedRound: public(uint256)
_blockHashForRound: HashMap[uint256, bytes32]


@deploy
def __init__(_controller: address, _roundLength: uint256):
    assert _roundLength > 0, "round length cannot be 0"
    controller = _controller
    roundLength = _roundLength
    firstBlock = block.number


@view
@internal
def _currentRound() -> uint256:
    return 1 + (block.number - firstBlock) // roundLength


@view
@external
def currentRound() -> uint256:
    return self._currentRound()


@view
@external
def currentRoundStartBlock() -> uint256:
    return firstBlock + (self._currentRound() - 1) * roundLength


@view
@external
def currentRoundInitialized() -> bool:
    return self.lastInitializedRound == self._currentRound()


@view
@external
def blockHashForRound(_round: uint256) -> bytes32:
    """The block hash recorded when `_round` was initialized; zero when it never was."""
    return self._blockHashForRound[_round]


@view
@external
def blockNum() -> uint256:
    return block.number


@external
def initializeRound():
    """Start the current round: record its block hash. Once per round."""
    round: uint256 = self._currentRound()
    assert self.lastInitializedRound < round, "round already initialized"
    self.lastInitializedRound = round
    roundBlockHash: bytes32 = blockhash(block.number - 1)
    self._blockHashForRound[round] = roundBlockHash
    log NewRound(round=round, blockHash=roundBlockHash)
