"""The recipient's side of ticket payments: issuing parameters, checking tickets.

Stateless per ticket, as go-livepeer's recipient is: the seed it issues is a
salt plus a MAC over the parameters it stands for, so tampered parameters are
caught, and recipient_rand is re-derived from the seed on demand. The only
state is the `NonceLedger` (replays), shared by every connection.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

from protocol.errors import ErrorCode, ProtocolError
from protocol.keccak import keccak256
from protocol.messages import Payment, TicketParams
from protocol.pm import (
    InvalidSignature,
    Ticket,
    derive_recipient_rand,
    recipient_rand_hash,
    ticket_ev,
    to_checksum_address,
)
from protocol.ticket_batch import TicketBatch

ZERO_ADDRESS = bytes(20)
MAX_NONCES_PER_RAND = 600
"""go-livepeer's cap on sender nonces per recipient_rand."""


def address_str(address: bytes) -> str:
    """A 20-byte address as the checksummed hex string protocol.pm takes."""
    return to_checksum_address(address)


@dataclass(frozen=True)
class WinningTicket:
    """Everything TicketBroker.redeemWinningTicket needs."""

    ticket: Ticket
    sig: bytes
    recipient_rand: int


@dataclass(frozen=True)
class RoundView:
    """What the settlement layer knows of rounds, to judge a ticket's creation round by.

    The chain's TicketBroker refuses a ticket whose round was never
    initialized, whose block hash is not that round's, or that is
    `validity_rounds` or more rounds old; the recipient refuses it first.
    """

    current_round: int
    validity_rounds: int
    block_hash: bytes | None
    """The chain's block hash of the ticket's creation round (zero: never initialized);
    None off chain, where there is no hash to check."""


def round_refusal(params: TicketParams, rounds: RoundView) -> str | None:
    """Why the broker would refuse tickets of these parameters for their round, or None."""
    round_ = params.creation_round
    if rounds.block_hash is not None:
        if rounds.block_hash == bytes(32):
            return f"round {round_} was never initialized on chain"
        if params.creation_round_block_hash != rounds.block_hash:
            return f"creation_round_block_hash is not the block hash of round {round_}"
    if round_ + rounds.validity_rounds <= rounds.current_round:
        return (
            f"round {round_} expired: tickets are good for {rounds.validity_rounds} rounds,"
            f" now round {rounds.current_round}"
        )
    return None


@dataclass
class PaymentReceipt:
    """What one payment message was worth: credit, winners, and the first fault."""

    ev: Fraction = Fraction(0)
    accepted: int = 0
    winners: list[WinningTicket] = field(default_factory=list)
    error: ProtocolError | None = None


class LedgerFull(Exception):
    """Every slot holds unexpired parameters: forgetting one would allow replays."""


class NonceLedger:
    """Sender nonces seen per recipient_rand_hash, bounded in memory.

    Keeps at most `max_rands` rand hashes with at most `per_rand` nonces each
    (MAX_NONCES_PER_RAND, go-livepeer's cap). Rands past their expiration block are forgotten (their
    tickets are refused as expired anyway); when the ledger is full of live
    ones it refuses new parameters rather than forget nonces that could
    then be replayed.
    """

    def __init__(self, max_rands: int = 100_000, per_rand: int = MAX_NONCES_PER_RAND) -> None:
        self.max_rands = max_rands
        self.per_rand = per_rand
        self._seen: dict[bytes, tuple[int, set[int]]] = {}

    def check_and_record(
        self, rand_hash: bytes, nonce: int, expiration_block: int, current_block: int
    ) -> bool:
        """True, and remembered, when the nonce is new for this rand; False on a replay."""
        entry = self._seen.get(rand_hash)
        if entry is None:
            if len(self._seen) >= self.max_rands:
                self.prune(current_block)
                if len(self._seen) >= self.max_rands:
                    raise LedgerFull(f"{self.max_rands} ticket parameters are live")
            entry = (expiration_block, set())
            self._seen[rand_hash] = entry
        nonces = entry[1]
        if nonce in nonces or len(nonces) >= self.per_rand:
            return False
        nonces.add(nonce)
        return True

    def count(self, rand_hash: bytes) -> int:
        """Nonces recorded for this rand: how worn its parameters are (spec 8.9)."""
        entry = self._seen.get(rand_hash)
        return 0 if entry is None else len(entry[1])

    def prune(self, current_block: int) -> None:
        """Forget rands whose parameters expired: their tickets are refused anyway."""
        for rand_hash in [h for h, (exp, _) in self._seen.items() if exp < current_block]:
            del self._seen[rand_hash]


class Recipient:
    """Issues ticket parameters and validates payments for one recipient address."""

    def __init__(
        self,
        address: str,
        secret: bytes,
        nonces: NonceLedger,
        validity_blocks: int = 40,
        has_funds: Callable[[str, Fraction], bool] | None = None,
    ) -> None:
        self.address = to_checksum_address(address)
        self._address_bytes = bytes.fromhex(self.address[2:])
        self._secret = secret
        self.nonces = nonces
        self.validity_blocks = validity_blocks
        self._has_funds = has_funds

    def _params_mac(self, salt: bytes, sender: bytes, params: TicketParams) -> bytes:
        msg = b"|".join(
            [
                b"stepstream-ticket-params-v1",
                salt,
                params.recipient,
                sender,
                params.face_value.to_bytes(32, "big"),
                params.win_prob.to_bytes(32, "big"),
                params.expiration_block.to_bytes(8, "big"),
                params.creation_round.to_bytes(8, "big"),
                params.creation_round_block_hash,
            ]
        )
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:16]

    def issue_params(
        self,
        sender: bytes,
        face_value: int,
        win_prob: int,
        current_block: int,
        salt: bytes,
        creation_round: int = 0,
        creation_round_block_hash: bytes = bytes(32),
    ) -> TicketParams:
        """Fresh parameters for `sender` in the given round; `salt` is 16 random bytes
        from the caller."""
        if len(salt) != 16:
            raise ValueError("salt must be 16 bytes")
        draft = TicketParams(
            recipient=self._address_bytes,
            face_value=face_value,
            win_prob=win_prob,
            recipient_rand_hash=bytes(32),
            seed=bytes(32),
            expiration_block=current_block + self.validity_blocks,
            creation_round=creation_round,
            creation_round_block_hash=creation_round_block_hash,
        )
        seed = salt + self._params_mac(salt, sender, draft)
        rand = derive_recipient_rand(self._secret, seed, address_str(sender))
        return TicketParams(
            recipient=draft.recipient,
            face_value=face_value,
            win_prob=win_prob,
            recipient_rand_hash=recipient_rand_hash(rand),
            seed=seed,
            expiration_block=draft.expiration_block,
            creation_round=creation_round,
            creation_round_block_hash=creation_round_block_hash,
        )

    def receive(
        self,
        payment: Payment,
        current_block: int,
        max_float: int | None = None,
        rounds: RoundView | None = None,
        job_seeds: Collection[bytes] | None = None,
    ) -> PaymentReceipt:
        """Check each ticket in spec order; credit those before the first fault.

        A winning ticket whose parameters expired is still kept for redemption
        (as go-livepeer does) though it earns no credit; one whose round the
        broker would refuse (`rounds`, None: not checked) is neither credited
        nor kept. `max_float` is what the sender's deposit and reserve can
        still pay out to this recipient (None: no chain, no check); each
        ticket's face value must fit in it, less the winners already found in
        this payment. `job_seeds` are the seeds of the parameters issued for the
        job the payment names (spec 8.1): others fail check 3 (None: not checked).
        """
        receipt = PaymentReceipt()
        params = payment.ticket_params
        try:
            rand = self._check_params(payment.sender, params, job_seeds)
        except ProtocolError as err:
            receipt.error = err
            return receipt
        sender = address_str(payment.sender)
        ev = ticket_ev(params.face_value, params.win_prob)
        batch = TicketBatch(
            recipient=self._address_bytes,
            sender=payment.sender,
            face_value=params.face_value,
            win_prob=params.win_prob,
            recipient_rand_hash=params.recipient_rand_hash,
            creation_round=params.creation_round,
            creation_round_block_hash=params.creation_round_block_hash,
        )
        signers = batch.signers((t.sender_nonce, t.sig) for t in payment.tickets)
        refusal = None if rounds is None else round_refusal(params, rounds)
        draw_suffix = rand.to_bytes(32, "big")
        for signed in payment.tickets:
            receipt.error = self._check_ticket(signers, payment, signed.sender_nonce, current_block)
            if receipt.error is None and refusal is not None:
                receipt.error = ProtocolError(ErrorCode.TICKET_ROUND_INVALID, refusal)
            if receipt.error is not None:
                break
            # is_winning, with the rand encoded once per payment.
            draw = int.from_bytes(keccak256(bytes(signed.sig) + draw_suffix), "big")
            wins = draw < params.win_prob
            if wins:
                ticket = Ticket(
                    recipient=self.address,
                    sender=sender,
                    face_value=params.face_value,
                    win_prob=params.win_prob,
                    sender_nonce=signed.sender_nonce,
                    recipient_rand_hash=params.recipient_rand_hash,
                    creation_round=params.creation_round,
                    creation_round_block_hash=params.creation_round_block_hash,
                )
                receipt.winners.append(WinningTicket(ticket, bytes(signed.sig), rand))
            receipt.error = self._check_funds(
                receipt, params, sender, ev, wins, current_block, max_float
            )
            if receipt.error is not None:
                break
            receipt.accepted += 1
        receipt.ev = ev * receipt.accepted
        return receipt

    def _check_ticket(
        self, signers: Iterator[bytes], payment: Payment, nonce: int, current_block: int
    ) -> ProtocolError | None:
        """Signature (the next of `signers`), then the nonce: why the ticket fails, or None."""
        try:
            signer = next(signers)
        except InvalidSignature as exc:
            return ProtocolError(ErrorCode.TICKET_BAD_SIGNATURE, str(exc))
        if signer != payment.sender:
            return ProtocolError(
                ErrorCode.TICKET_BAD_SIGNATURE, "ticket was not signed by its sender"
            )
        params = payment.ticket_params
        try:
            fresh = self.nonces.check_and_record(
                params.recipient_rand_hash, nonce, params.expiration_block, current_block
            )
        except LedgerFull as exc:
            return ProtocolError(
                ErrorCode.INTERNAL_ERROR, f"cannot take tickets now ({exc}); retry later"
            )
        if not fresh:
            used = self.nonces.count(params.recipient_rand_hash)
            why = (
                f"these parameters already carried {used} nonces, the most one rand takes"
                if used >= self.nonces.per_rand
                else f"sender_nonce {nonce} already used for these parameters"
            )
            return ProtocolError(ErrorCode.TICKET_NONCE_REPLAYED, why)
        return None

    def _check_funds(
        self,
        receipt: PaymentReceipt,
        params: TicketParams,
        sender: str,
        ev: Fraction,
        wins: bool,
        current_block: int,
        max_float: int | None,
    ) -> ProtocolError | None:
        """Expiry, then the sender's funds, for a ticket already checked and drawn."""
        if params.expiration_block < current_block:
            return ProtocolError(
                ErrorCode.TICKET_PARAMS_EXPIRED,
                f"parameters expired at block {params.expiration_block}, now {current_block}",
            )
        if self._has_funds is not None and not self._has_funds(sender, ev):
            return ProtocolError(
                ErrorCode.SENDER_INSUFFICIENT_FUNDS, f"{sender} lacks deposit and reserve"
            )
        if max_float is not None:
            earlier = receipt.winners[:-1] if wins else receipt.winners
            owed = sum(w.ticket.face_value for w in earlier)
            if params.face_value > max_float - owed:
                return ProtocolError(
                    ErrorCode.SENDER_INSUFFICIENT_FUNDS,
                    f"{sender}'s deposit and reserve can pay out {max(0, max_float - owed)}"
                    f" wei, less than the face value {params.face_value}",
                )
        return None

    def _check_params(
        self, sender: bytes, params: TicketParams, job_seeds: Collection[bytes] | None = None
    ) -> int:
        """Recipient, sender, parameter MAC (and the job's), rand, in that order;
        returns recipient_rand."""
        if params.recipient != self._address_bytes:
            raise ProtocolError(
                ErrorCode.TICKET_WRONG_RECIPIENT, "tickets are not made out to this orchestrator"
            )
        if sender == ZERO_ADDRESS:
            raise ProtocolError(ErrorCode.TICKET_ZERO_SENDER, "sender is the zero address")
        salt, mac = params.seed[:16], params.seed[16:]
        if not hmac.compare_digest(mac, self._params_mac(salt, sender, params)):
            raise ProtocolError(
                ErrorCode.INVALID_TICKET_PARAMS,
                "ticket parameters were not issued by this orchestrator for this sender",
            )
        if job_seeds is not None and params.seed not in job_seeds:
            raise ProtocolError(
                ErrorCode.INVALID_TICKET_PARAMS,
                "ticket parameters were not issued for this job (spec 8.1)",
            )
        rand = derive_recipient_rand(self._secret, params.seed, address_str(sender))
        if recipient_rand_hash(rand) != params.recipient_rand_hash:
            raise ProtocolError(
                ErrorCode.TICKET_RAND_MISMATCH, "recipient_rand_hash does not match the seed"
            )
        return rand
