# pragma version ~=0.4.3
# pragma evm-version cancun
# @title TicketBroker (stepstream)
# @notice Probabilistic micropayment settlement that judges tickets as
#         Livepeer's TicketBroker does, so a ticket this contract accepts,
#         Livepeer's accepts. Reaches the RoundsManager, BondingManager and
#         Minter through the Controller.
# @dev Same ABI as Livepeer's TicketBroker for every call a node makes:
#      fundDeposit, fundReserve, fundDepositAndReserve(For), getSenderInfo,
#      getReserveInfo, claimableReserve, claimedReserve, usedTickets,
#      getTicketHash, redeemWinningTicket, batchRedeemWinningTickets, unlock,
#      cancelUnlock, withdraw, isUnlockInProgress, unlockPeriod,
#      ticketValidityPeriod. Revert reasons are Livepeer's (OpenZeppelin
#      ECDSA's for signatures; V outside {27, 28} is named as such, where
#      OpenZeppelin 4.9 says "invalid signature").
#
# A ticket redeems only when, in this order:
#   - the current round is initialized;
#   - recipient and sender are not the zero address;
#   - auxData is 64 bytes: u256 creationRound | creationRoundBlockHash, the
#     round has a block hash, it is that hash, and
#     creationRound + ticketValidityPeriod > currentRound;
#   - keccak256(u256 recipientRand) == recipientRandHash;
#   - the ticket hash is not used;
#   - the 65-byte signature, with S in the lower half and V in {27, 28},
#     recovers the sender over the personal_sign digest of the ticket hash;
#   - uint256(keccak256(sig | u256 recipientRand)) < winProb;
#   - the sender is locked (no unlock, or its withdraw round not reached);
#   - the sender's deposit or reserve is not zero.
# Anyone may submit it; the face value comes from the deposit, then from the
# reserve up to the recipient's share (reserve / active pool size per
# round), and is credited to the recipient's fee pool in the BondingManager.
#
# Limits that Livepeer's has not (the Vyper ABI decoder needs bounds): a
# batch holds at most MAX_BATCH tickets, far more than a block's gas can
# redeem, and a batch whose calldata holds an auxData over 64 bytes or a
# signature over 65 bytes is refused whole rather than skipped.


interface Controller:
    def getContract(_id: bytes32) -> address: view
    def owner() -> address: view

interface RoundsManager:
    def currentRound() -> uint256: view
    def currentRoundInitialized() -> bool: view
    def blockHashForRound(_round: uint256) -> bytes32: view

interface BondingManager:
    def isActiveTranscoder(_transcoder: address) -> bool: view
    def getTranscoderPoolSize() -> uint256: view
    def updateTranscoderWithFees(_transcoder: address, _fees: uint256, _round: uint256): nonpayable

interface Minter:
    def depositETH() -> bool: payable
    def trustedWithdrawETH(_to: address, _amount: uint256): nonpayable


struct Ticket:
    recipient: address
    sender: address
    faceValue: uint256
    winProb: uint256
    senderNonce: uint256
    recipientRandHash: bytes32
    auxData: Bytes[64]

struct Sender:
    deposit: uint256
    withdrawRound: uint256

struct ReserveInfo:
    fundsRemaining: uint256
    claimedInCurrentRound: uint256


event DepositFunded:
    sender: indexed(address)
    amount: uint256

event ReserveFunded:
    reserveHolder: indexed(address)
    amount: uint256

event ReserveClaimed:
    reserveHolder: indexed(address)
    claimant: address
    amount: uint256

event WinningTicketRedeemed:
    sender: indexed(address)
    recipient: indexed(address)
    faceValue: uint256
    winProb: uint256
    senderNonce: uint256
    recipientRand: uint256
    auxData: Bytes[64]

event WinningTicketTransfer:
    sender: indexed(address)
    recipient: indexed(address)
    amount: uint256

event Unlock:
    sender: indexed(address)
    startRound: uint256
    endRound: uint256

event UnlockCancelled:
    sender: indexed(address)

event Withdrawal:
    sender: indexed(address)
    deposit: uint256
    reserve: uint256

event ParameterUpdate:
    param: String[32]


ROUNDS_MANAGER: constant(bytes32) = keccak256("RoundsManager")
BONDING_MANAGER: constant(bytes32) = keccak256("BondingManager")
MINTER: constant(bytes32) = keccak256("Minter")
SECP256K1_HALF_N: constant(uint256) = (
    57896044618658097711785492504343953926418782139537452191302581570759080747168
)
MAX_BATCH: constant(uint256) = 256
REDEEM_SIGNATURE: constant(Bytes[4]) = method_id(
    "redeemWinningTicket((address,address,uint256,uint256,uint256,bytes32,bytes),bytes,uint256)"
)

controller: public(immutable(address))
unlockPeriod: public(uint256)
ticketValidityPeriod: public(uint256)
usedTickets: public(HashMap[bytes32, bool])

senders: HashMap[address, Sender]
reserveFunds: HashMap[address, uint256]
claimedForRound: HashMap[address, HashMap[uint256, uint256]]
claimedByAddress: HashMap[address, HashMap[uint256, HashMap[address, uint256]]]


@deploy
def __init__(_controller: address, _unlockPeriod: uint256, _ticketValidityPeriod: uint256):
    """
    @param _unlockPeriod Rounds between unlock() and the first allowed withdraw().
    @param _ticketValidityPeriod Rounds a ticket stays redeemable after its creation round.
    """
    assert _ticketValidityPeriod > 0, "ticketValidityPeriod must be greater than 0"
    controller = _controller
    self.unlockPeriod = _unlockPeriod
    self.ticketValidityPeriod = _ticketValidityPeriod


# -- contracts reached through the Controller -----------------------------------------


@view
@internal
def _rounds() -> RoundsManager:
    return RoundsManager(staticcall Controller(controller).getContract(ROUNDS_MANAGER))


@view
@internal
def _bonding() -> BondingManager:
    return BondingManager(staticcall Controller(controller).getContract(BONDING_MANAGER))


@view
@internal
def _minter() -> Minter:
    return Minter(staticcall Controller(controller).getContract(MINTER))


@view
@internal
def _currentRound() -> uint256:
    return staticcall self._rounds().currentRound()


@view
@internal
def _requireCurrentRoundInitialized():
    assert staticcall self._rounds().currentRoundInitialized(), "current round is not initialized"


@internal
def _onlyControllerOwner():
    assert msg.sender == staticcall Controller(controller).owner(), "caller must be Controller owner"


@external
def setUnlockPeriod(_unlockPeriod: uint256):
    self._onlyControllerOwner()
    self.unlockPeriod = _unlockPeriod
    log ParameterUpdate(param="unlockPeriod")


@external
def setTicketValidityPeriod(_ticketValidityPeriod: uint256):
    self._onlyControllerOwner()
    assert _ticketValidityPeriod > 0, "ticketValidityPeriod must be greater than 0"
    self.ticketValidityPeriod = _ticketValidityPeriod
    log ParameterUpdate(param="ticketValidityPeriod")


# -- funding ------------------------------------------------------------------------


@view
@internal
def _isUnlockInProgress(_sender: address) -> bool:
    return self.senders[_sender].withdrawRound > 0


@internal
def _cancelUnlock(_sender: address):
    assert self._isUnlockInProgress(_sender), "no unlock request in progress"
    self.senders[_sender].withdrawRound = 0
    log UnlockCancelled(sender=_sender)


@internal
def _fund(_sender: address, _deposit: uint256, _reserve: uint256):
    """Credit deposit and reserve; a sender funding itself cancels its unlock."""
    self.senders[_sender].deposit += _deposit
    self.reserveFunds[_sender] += _reserve
    if msg.sender == _sender and self._isUnlockInProgress(_sender):
        self._cancelUnlock(_sender)
    extcall self._minter().depositETH(value=_deposit + _reserve)


@external
@payable
def fundDeposit():
    """Add msg.value to the caller's deposit."""
    self._fund(msg.sender, msg.value, 0)
    log DepositFunded(sender=msg.sender, amount=msg.value)


@external
@payable
def fundReserve():
    """Add msg.value to the caller's reserve."""
    self._fund(msg.sender, 0, msg.value)
    log ReserveFunded(reserveHolder=msg.sender, amount=msg.value)


@internal
def _fundDepositAndReserveFor(
    _addr: address, _depositAmount: uint256, _reserveAmount: uint256, _value: uint256
):
    assert _value == _depositAmount + _reserveAmount, "msg.value does not equal sum of deposit amount and reserve amount"
    self._fund(_addr, _depositAmount, _reserveAmount)
    log ReserveFunded(reserveHolder=_addr, amount=_reserveAmount)
    log DepositFunded(sender=_addr, amount=_depositAmount)


@external
@payable
def fundDepositAndReserve(_depositAmount: uint256, _reserveAmount: uint256):
    """Split msg.value between the caller's deposit and reserve; the split must be exact."""
    self._fundDepositAndReserveFor(msg.sender, _depositAmount, _reserveAmount, msg.value)


@external
@payable
def fundDepositAndReserveFor(_addr: address, _depositAmount: uint256, _reserveAmount: uint256):
    """Split msg.value between `_addr`'s deposit and reserve."""
    self._fundDepositAndReserveFor(_addr, _depositAmount, _reserveAmount, msg.value)


# -- reads --------------------------------------------------------------------------


@view
@internal
def _reserveInfo(_holder: address) -> ReserveInfo:
    return ReserveInfo(
        fundsRemaining=self.reserveFunds[_holder],
        claimedInCurrentRound=self.claimedForRound[_holder][self._currentRound()],
    )


@view
@external
def getSenderInfo(_sender: address) -> (Sender, ReserveInfo):
    """((deposit, withdrawRound), (fundsRemaining, claimedInCurrentRound))."""
    return self.senders[_sender], self._reserveInfo(_sender)


@view
@external
def getReserveInfo(_reserveHolder: address) -> ReserveInfo:
    return self._reserveInfo(_reserveHolder)


@view
@internal
def _claimableReserve(_holder: address, _claimant: address) -> uint256:
    if not staticcall self._bonding().isActiveTranscoder(_claimant):
        return 0
    poolSize: uint256 = staticcall self._bonding().getTranscoderPoolSize()
    if poolSize == 0:
        return 0
    round: uint256 = self._currentRound()
    total: uint256 = self.reserveFunds[_holder] + self.claimedForRound[_holder][round]
    return total // poolSize - self.claimedByAddress[_holder][round][_claimant]


@view
@external
def claimableReserve(_reserveHolder: address, _claimant: address) -> uint256:
    """What `_claimant` may still take from the reserve this round: its share, less its claims."""
    return self._claimableReserve(_reserveHolder, _claimant)


@view
@external
def claimedReserve(_reserveHolder: address, _claimant: address) -> uint256:
    return self.claimedByAddress[_reserveHolder][self._currentRound()][_claimant]


@view
@external
def isUnlockInProgress(_sender: address) -> bool:
    return self._isUnlockInProgress(_sender)


@pure
@internal
def _ticketHash(_ticket: Ticket) -> bytes32:
    return keccak256(
        concat(
            convert(_ticket.recipient, bytes20),
            convert(_ticket.sender, bytes20),
            convert(_ticket.faceValue, bytes32),
            convert(_ticket.winProb, bytes32),
            convert(_ticket.senderNonce, bytes32),
            _ticket.recipientRandHash,
            _ticket.auxData,
        )
    )


@pure
@external
def getTicketHash(_ticket: Ticket) -> bytes32:
    """keccak256 of the packed ticket, as go-livepeer's pm.Ticket.Hash."""
    return self._ticketHash(_ticket)


# -- redemption -----------------------------------------------------------------------


@view
@internal
def _requireValidAuxData(_auxData: Bytes[64]) -> uint256:
    """Check the ticket's creation round as Livepeer's does; return the round."""
    assert len(_auxData) == 64, "invalid length for ticket auxData: must be 64 bytes"
    creationRound: uint256 = convert(slice(_auxData, 0, 32), uint256)
    creationRoundBlockHash: bytes32 = extract32(_auxData, 32)
    blockHash: bytes32 = staticcall self._rounds().blockHashForRound(creationRound)
    assert blockHash != empty(bytes32), "ticket creationRound does not have a block hash"
    assert creationRoundBlockHash == blockHash, "ticket creationRoundBlockHash invalid for creationRound"
    assert creationRound + self.ticketValidityPeriod > self._currentRound(), "ticket is expired"
    return creationRound


@pure
@internal
def _requireSigner(_signer: address, _sig: Bytes[65], _ticketHash: bytes32):
    assert len(_sig) == 65, "INVALID_SIGNATURE_LENGTH"
    r: uint256 = convert(extract32(_sig, 0), uint256)
    s: uint256 = convert(extract32(_sig, 32), uint256)
    v: uint256 = convert(slice(_sig, 64, 1), uint256)
    assert s <= SECP256K1_HALF_N, "ECDSA: invalid signature 's' value"
    assert v == 27 or v == 28, "ECDSA: invalid signature 'v' value"
    digest: bytes32 = keccak256(concat(b"\x19Ethereum Signed Message:\n32", _ticketHash))
    recovered: address = ecrecover(digest, v, r, s)
    assert recovered != empty(address), "ECDSA: invalid signature"
    assert recovered == _signer, "invalid signature over ticket hash"


@internal
def _claimFromReserve(_holder: address, _claimant: address, _amount: uint256) -> uint256:
    claim: uint256 = min(_amount, self._claimableReserve(_holder, _claimant))
    if claim > 0:
        round: uint256 = self._currentRound()
        self.claimedForRound[_holder][round] += claim
        self.claimedByAddress[_holder][round][_claimant] += claim
        self.reserveFunds[_holder] -= claim
        log ReserveClaimed(reserveHolder=_holder, claimant=_claimant, amount=claim)
    return claim


@external
def redeemWinningTicket(_ticket: Ticket, _sig: Bytes[65], _recipientRand: uint256):
    """Check a winning ticket and credit its face value to the recipient's fee pool.

    Anyone may send it: the fees go to the ticket's recipient whoever pays the gas.
    """
    self._requireCurrentRoundInitialized()
    ticketHash: bytes32 = self._ticketHash(_ticket)

    assert _ticket.recipient != empty(address), "ticket recipient is null address"
    assert _ticket.sender != empty(address), "ticket sender is null address"
    creationRound: uint256 = self._requireValidAuxData(_ticket.auxData)
    assert keccak256(convert(_recipientRand, bytes32)) == _ticket.recipientRandHash, "recipientRand does not match recipientRandHash"
    assert not self.usedTickets[ticketHash], "ticket is used"
    self._requireSigner(_ticket.sender, _sig, ticketHash)
    rand: uint256 = convert(keccak256(concat(_sig, convert(_recipientRand, bytes32))), uint256)
    assert rand < _ticket.winProb, "ticket did not win"

    sender: Sender = self.senders[_ticket.sender]
    locked: bool = sender.withdrawRound == 0 or self._currentRound() < sender.withdrawRound
    assert locked, "sender is unlocked"
    assert sender.deposit > 0 or self.reserveFunds[_ticket.sender] > 0, "sender deposit and reserve are zero"

    self.usedTickets[ticketHash] = True

    amount: uint256 = _ticket.faceValue
    if _ticket.faceValue > sender.deposit:
        amount = sender.deposit + self._claimFromReserve(
            _ticket.sender, _ticket.recipient, _ticket.faceValue - sender.deposit
        )
        self.senders[_ticket.sender].deposit = 0
    else:
        self.senders[_ticket.sender].deposit = sender.deposit - _ticket.faceValue

    if amount > 0:
        extcall self._bonding().updateTranscoderWithFees(_ticket.recipient, amount, creationRound)
        log WinningTicketTransfer(sender=_ticket.sender, recipient=_ticket.recipient, amount=amount)

    log WinningTicketRedeemed(
        sender=_ticket.sender,
        recipient=_ticket.recipient,
        faceValue=_ticket.faceValue,
        winProb=_ticket.winProb,
        senderNonce=_ticket.senderNonce,
        recipientRand=_recipientRand,
        auxData=_ticket.auxData,
    )


@external
def batchRedeemWinningTickets(
    _tickets: DynArray[Ticket, MAX_BATCH],
    _sigs: DynArray[Bytes[65], MAX_BATCH],
    _recipientRands: DynArray[uint256, MAX_BATCH],
):
    """Redeem each ticket as redeemWinningTicket would; a ticket that fails (or runs
    out of gas) is skipped, never reverting the others."""
    self._requireCurrentRoundInitialized()
    assert len(_sigs) == len(_tickets) and len(_recipientRands) == len(_tickets), "array lengths differ"
    for i: uint256 in range(len(_tickets), bound=MAX_BATCH):
        redeemed: bool = raw_call(
            self,
            abi_encode(_tickets[i], _sigs[i], _recipientRands[i], method_id=REDEEM_SIGNATURE),
            max_outsize=0,
            revert_on_failure=False,
        )


# -- unlock and withdrawal ------------------------------------------------------------


@external
def unlock():
    """Start the unlock period; the funds can be withdrawn unlockPeriod rounds later."""
    assert self.senders[msg.sender].deposit > 0 or self.reserveFunds[msg.sender] > 0, "sender deposit and reserve are zero"
    assert not self._isUnlockInProgress(msg.sender), "unlock already initiated"
    round: uint256 = self._currentRound()
    self.senders[msg.sender].withdrawRound = round + self.unlockPeriod
    log Unlock(sender=msg.sender, startRound=round, endRound=round + self.unlockPeriod)


@external
def cancelUnlock():
    """Stop an unlock in progress, keeping the funds locked."""
    self._cancelUnlock(msg.sender)


@external
def withdraw():
    """After the unlock period, send the whole deposit and reserve back to the sender."""
    deposit: uint256 = self.senders[msg.sender].deposit
    reserve: uint256 = self.reserveFunds[msg.sender]
    assert deposit > 0 or reserve > 0, "sender deposit and reserve are zero"
    assert self._isUnlockInProgress(msg.sender), "no unlock request in progress"
    assert self._currentRound() >= self.senders[msg.sender].withdrawRound, "account is locked"
    self.senders[msg.sender].deposit = 0
    self.reserveFunds[msg.sender] = 0
    extcall self._minter().trustedWithdrawETH(msg.sender, deposit + reserve)
    log Withdrawal(sender=msg.sender, deposit=deposit, reserve=reserve)
