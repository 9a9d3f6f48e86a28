# pragma version ~=0.4.3
# pragma evm-version cancun
# @title TicketBroker (stepstream)
# @notice A small ETH-settled probabilistic micropayment broker that speaks the
#         subset of go-livepeer's TicketBroker ABI a node uses: funding,
#         getSenderInfo, usedTickets, redeemWinningTicket,
#         batchRedeemWinningTickets, unlock, cancelUnlock, withdraw.
# @dev Compiled with vyper 0.4.3 for the cancun EVM (runs on py-evm, anvil, Arbitrum).
#
# Ticket hash (identical to go-livepeer pm.Ticket.Hash):
#     keccak256(recipient(20) | sender(20) | u256 faceValue | u256 winProb |
#               u256 senderNonce | recipientRandHash(32) | auxData)
#     auxData = u256 creationRound | creationRoundBlockHash(32), or empty.
# Signature: 65 bytes R|S|V over the personal_sign digest
#     keccak256("\x19Ethereum Signed Message:\n32" | ticketHash); V in {27, 28}
#     (0/1 are accepted and shifted by 27, like OpenZeppelin 2.x ECDSA); S must
#     be in the lower half of the secp256k1 order.
# Winning: uint256(keccak256(sig | u256 recipientRand)) < winProb.
#
# getSenderInfo(sender) returns (Sender, ReserveInfo) =
#     ((deposit, withdrawBlock), (fundsRemaining, claimedInCurrentRound)).
# All four members are static uint256, so the ABI encoding is the same four
# words as a flat (deposit, withdrawBlock, fundsRemaining,
# claimedInCurrentRound) tuple, and also the same shape as go-livepeer's
# (Sender{deposit, withdrawRound}, ReserveInfo{fundsRemaining,
# claimedInCurrentRound}).
#   - withdrawBlock: 0 when no unlock is in progress, else the block number from
#     which withdraw() is allowed (this chain has no rounds; blocks stand in).
#   - fundsRemaining: the sender's reserve still available.
#   - claimedInCurrentRound: total paid out of this reserve so far (there are no
#     rounds here, so the whole chain is a single round).
#
# Deliberate simplifications versus Livepeer's broker (document, not hide):
#   - No rounds manager: auxData is hashed (so signatures match) but the
#     creation round / block hash are not checked, so tickets never expire on
#     chain. Recipients must enforce expiry off chain (go-livepeer does too).
#   - The reserve is not split between active orchestrators; a winning ticket
#     that the deposit cannot cover is paid from the reserve, up to what is
#     left. If both are short the recipient gets what is available and the
#     ticket is still consumed.
#   - msg.sender must be the ticket recipient.
#   - batchRedeemWinningTickets is all-or-nothing: one bad ticket reverts the
#     whole batch.
#   - Payouts use a plain send (2300 gas stipend); funds are debited and the
#     ticket marked used before any value leaves the contract.


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
    withdrawBlock: uint256

struct ReserveInfo:
    fundsRemaining: uint256
    claimedInCurrentRound: uint256

event DepositFunded:
    sender: indexed(address)
    amount: uint256

event ReserveFunded:
    reserveHolder: indexed(address)
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

event ReserveClaimed:
    reserveHolder: indexed(address)
    claimant: address
    amount: uint256

event Unlock:
    sender: indexed(address)
    startBlock: uint256
    endBlock: uint256

event UnlockCancelled:
    sender: indexed(address)

event Withdrawal:
    sender: indexed(address)
    deposit: uint256
    reserve: uint256

# Half of the secp256k1 group order (0x7FFF...681B20A0): signatures with a
# larger S are malleable.
SECP256K1_HALF_N: constant(uint256) = (
    57896044618658097711785492504343953926418782139537452191302581570759080747168
)
MAX_BATCH: constant(uint256) = 32

unlockPeriod: public(immutable(uint256))
usedTickets: public(HashMap[bytes32, bool])
senders: HashMap[address, Sender]
reserves: HashMap[address, ReserveInfo]


@deploy
def __init__(_unlockPeriod: uint256):
    """
    @param _unlockPeriod Blocks between unlock() and the first allowed withdraw().
    """
    unlockPeriod = _unlockPeriod


@internal
def _fund_deposit(amount: uint256):
    self.senders[msg.sender].deposit += amount
    log DepositFunded(sender=msg.sender, amount=amount)


@internal
def _fund_reserve(amount: uint256):
    self.reserves[msg.sender].fundsRemaining += amount
    log ReserveFunded(reserveHolder=msg.sender, amount=amount)


@external
@payable
def fundDeposit():
    """Add msg.value to the caller's deposit."""
    self._fund_deposit(msg.value)


@external
@payable
def fundReserve():
    """Add msg.value to the caller's reserve."""
    self._fund_reserve(msg.value)


@external
@payable
def fundDepositAndReserve(depositAmount: uint256, reserveAmount: uint256):
    """Split msg.value between deposit and reserve; the split must be exact."""
    assert msg.value == depositAmount + reserveAmount, "msg.value does not equal sum of deposit amount and reserve amount"
    self._fund_deposit(depositAmount)
    self._fund_reserve(reserveAmount)


@view
@external
def getSenderInfo(sender: address) -> (Sender, ReserveInfo):
    """((deposit, withdrawBlock), (fundsRemaining, claimedInCurrentRound))."""
    return self.senders[sender], self.reserves[sender]


@pure
@internal
def _ticket_hash(ticket: Ticket) -> bytes32:
    return keccak256(
        concat(
            convert(ticket.recipient, bytes20),
            convert(ticket.sender, bytes20),
            convert(ticket.faceValue, bytes32),
            convert(ticket.winProb, bytes32),
            convert(ticket.senderNonce, bytes32),
            ticket.recipientRandHash,
            ticket.auxData,
        )
    )


@view
@external
def getTicketHash(ticket: Ticket) -> bytes32:
    """The go-livepeer ticket hash, exposed so clients can cross-check theirs."""
    return self._ticket_hash(ticket)


@pure
@internal
def _recover(digest: bytes32, sig: Bytes[65]) -> address:
    assert len(sig) == 65, "invalid signature length"
    r: uint256 = convert(extract32(sig, 0), uint256)
    s: uint256 = convert(extract32(sig, 32), uint256)
    v: uint256 = convert(slice(sig, 64, 1), uint256)
    if v < 27:
        v += 27
    assert v == 27 or v == 28, "invalid signature v"
    assert s <= SECP256K1_HALF_N, "invalid signature s"
    return ecrecover(digest, v, r, s)


@internal
def _redeem(ticket: Ticket, sig: Bytes[65], recipientRand: uint256):
    assert ticket.recipient != empty(address), "ticket recipient is null address"
    assert ticket.sender != empty(address), "ticket sender is null address"
    assert msg.sender == ticket.recipient, "msg.sender must be ticket recipient"
    assert keccak256(convert(recipientRand, bytes32)) == ticket.recipientRandHash, "recipientRand does not match recipientRandHash"

    ticketHash: bytes32 = self._ticket_hash(ticket)
    assert not self.usedTickets[ticketHash], "ticket is used"

    digest: bytes32 = keccak256(concat(b"\x19Ethereum Signed Message:\n32", ticketHash))
    signer: address = self._recover(digest, sig)
    assert signer != empty(address), "invalid signature over ticket hash"
    assert signer == ticket.sender, "invalid signature over ticket hash"

    rand: uint256 = convert(keccak256(concat(sig, convert(recipientRand, bytes32))), uint256)
    assert rand < ticket.winProb, "ticket did not win"

    # Effects before interactions: consume the ticket and debit the funds.
    self.usedTickets[ticketHash] = True

    amount: uint256 = ticket.faceValue
    fromDeposit: uint256 = min(amount, self.senders[ticket.sender].deposit)
    self.senders[ticket.sender].deposit -= fromDeposit
    fromReserve: uint256 = min(amount - fromDeposit, self.reserves[ticket.sender].fundsRemaining)
    if fromReserve > 0:
        self.reserves[ticket.sender].fundsRemaining -= fromReserve
        self.reserves[ticket.sender].claimedInCurrentRound += fromReserve
        log ReserveClaimed(reserveHolder=ticket.sender, claimant=ticket.recipient, amount=fromReserve)

    log WinningTicketRedeemed(
        sender=ticket.sender,
        recipient=ticket.recipient,
        faceValue=ticket.faceValue,
        winProb=ticket.winProb,
        senderNonce=ticket.senderNonce,
        recipientRand=recipientRand,
        auxData=ticket.auxData,
    )

    paid: uint256 = fromDeposit + fromReserve
    if paid > 0:
        log WinningTicketTransfer(sender=ticket.sender, recipient=ticket.recipient, amount=paid)
        send(ticket.recipient, paid)


@external
@nonreentrant
def redeemWinningTicket(ticket: Ticket, sig: Bytes[65], recipientRand: uint256):
    """Check a winning ticket and pay its face value to the recipient (msg.sender)."""
    self._redeem(ticket, sig, recipientRand)


@external
@nonreentrant
def batchRedeemWinningTickets(
    tickets: DynArray[Ticket, MAX_BATCH],
    sigs: DynArray[Bytes[65], MAX_BATCH],
    recipientRands: DynArray[uint256, MAX_BATCH],
):
    """Redeem several winning tickets in one transaction (all or nothing)."""
    assert len(tickets) == len(sigs) and len(tickets) == len(recipientRands), "array lengths differ"
    for i: uint256 in range(len(tickets), bound=MAX_BATCH):
        self._redeem(tickets[i], sigs[i], recipientRands[i])


@external
def unlock():
    """Start the unlock period; tickets stay redeemable until withdraw()."""
    info: Sender = self.senders[msg.sender]
    assert info.deposit > 0 or self.reserves[msg.sender].fundsRemaining > 0, "sender deposit and reserve are zero"
    assert info.withdrawBlock == 0, "unlock already initiated"
    endBlock: uint256 = block.number + unlockPeriod
    self.senders[msg.sender].withdrawBlock = endBlock
    log Unlock(sender=msg.sender, startBlock=block.number, endBlock=endBlock)


@external
def cancelUnlock():
    """Stop an unlock in progress, keeping the funds locked."""
    assert self.senders[msg.sender].withdrawBlock != 0, "no unlock request in progress"
    self.senders[msg.sender].withdrawBlock = 0
    log UnlockCancelled(sender=msg.sender)


@external
@nonreentrant
def withdraw():
    """After the unlock period, send the whole deposit and reserve back to the sender."""
    withdrawBlock: uint256 = self.senders[msg.sender].withdrawBlock
    assert withdrawBlock != 0, "no unlock request in progress"
    assert block.number >= withdrawBlock, "account is locked"
    deposit: uint256 = self.senders[msg.sender].deposit
    reserve: uint256 = self.reserves[msg.sender].fundsRemaining
    assert deposit > 0 or reserve > 0, "sender deposit and reserve are zero"
    self.senders[msg.sender] = empty(Sender)
    self.reserves[msg.sender] = empty(ReserveInfo)
    log Withdrawal(sender=msg.sender, deposit=deposit, reserve=reserve)
    send(msg.sender, deposit + reserve)
