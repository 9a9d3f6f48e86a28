"""The sender's side of ticket payments: numbering and signing tickets."""

from __future__ import annotations

from coincurve import PrivateKey

from protocol.messages import Payment, SignedTicket, TicketParams
from protocol.pm import Ticket, address_of
from protocol.recipient import address_str
from protocol.ticket_batch import TicketBatch


class TicketSender:
    """Signs tickets against issued parameters, never reusing a nonce for one rand."""

    def __init__(self, private_key: bytes) -> None:
        self._key = PrivateKey(private_key)
        self.address = address_of(private_key)
        self.address_bytes = bytes.fromhex(self.address[2:])
        self._next_nonce: dict[bytes, int] = {}

    def ticket(self, params: TicketParams, nonce: int) -> Ticket:
        """The ticket with this nonce, whole (tests, redemption); `pay` signs without it."""
        return Ticket(
            recipient=address_str(params.recipient),
            sender=self.address,
            face_value=params.face_value,
            win_prob=params.win_prob,
            sender_nonce=nonce,
            recipient_rand_hash=params.recipient_rand_hash,
            creation_round=params.creation_round,
            creation_round_block_hash=params.creation_round_block_hash,
        )

    def pay(self, job_id: str, params: TicketParams, count: int) -> Payment:
        """A payment of `count` fresh tickets for `job_id`."""
        if count < 1:
            raise ValueError("a payment holds at least one ticket")
        first = self._next_nonce.get(params.recipient_rand_hash, 1)
        self._next_nonce[params.recipient_rand_hash] = first + count
        batch = TicketBatch(
            recipient=params.recipient,
            sender=self.address_bytes,
            face_value=params.face_value,
            win_prob=params.win_prob,
            recipient_rand_hash=params.recipient_rand_hash,
            creation_round=params.creation_round,
            creation_round_block_hash=params.creation_round_block_hash,
        )
        nonces = range(first, first + count)
        sigs = batch.sign(self._key, nonces)
        tickets = tuple(
            SignedTicket(sender_nonce=n, sig=sig) for n, sig in zip(nonces, sigs, strict=True)
        )
        return Payment(
            job_id=job_id, sender=self.address_bytes, ticket_params=params, tickets=tickets
        )
