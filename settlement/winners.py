"""The durable queue of winning tickets: nothing won is ever lost.

A winner is written here, and the write is fsync'd (SQLite with
synchronous=FULL), before the payment that carried it is acknowledged; it
leaves the `pending` state only once the chain says the ticket is used. The
queue is the orchestrator's only per-ticket state, and it survives a crash:
a restarted orchestrator redeems what is still pending.

Methods block (disk I/O); the orchestrator calls them from a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from protocol.pm import Ticket
from protocol.recipient import WinningTicket

PENDING, REDEEMED, FAILED = "pending", "redeemed", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS winners (
    ticket_hash BLOB PRIMARY KEY,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    face_value TEXT NOT NULL,
    win_prob TEXT NOT NULL,
    sender_nonce INTEGER NOT NULL,
    recipient_rand_hash BLOB NOT NULL,
    creation_round INTEGER NOT NULL,
    creation_round_block_hash BLOB NOT NULL,
    sig BLOB NOT NULL,
    recipient_rand TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    tx_hash TEXT,
    gas_cost TEXT
)
"""


@dataclass(frozen=True)
class QueuedWinner:
    winner: WinningTicket
    ticket_hash: bytes
    status: str
    attempts: int
    next_attempt: float
    last_error: str | None
    tx_hash: str | None


class WinnerQueue:
    """Winning tickets in SQLite; `path` None keeps them in memory (tests only)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(self.path) if self.path else ":memory:",
            check_same_thread=False,
            isolation_level=None,  # explicit transactions below
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'd at every commit, so a committed winner
            # survives a crash or power loss.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)

    @property
    def durable(self) -> bool:
        return self.path is not None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, winners: list[WinningTicket]) -> None:
        """Store winners durably (a ticket already queued is left as it is)."""
        rows = [
            (
                w.ticket.hash(),
                w.ticket.recipient,
                w.ticket.sender,
                str(w.ticket.face_value),
                str(w.ticket.win_prob),
                w.ticket.sender_nonce,
                w.ticket.recipient_rand_hash,
                w.ticket.creation_round,
                w.ticket.creation_round_block_hash,
                w.sig,
                str(w.recipient_rand),
            )
            for w in winners
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO winners (ticket_hash, recipient, sender, face_value,"
                    " win_prob, sender_nonce, recipient_rand_hash, creation_round,"
                    " creation_round_block_hash, sig, recipient_rand)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, where: str, args: tuple[object, ...]) -> list[QueuedWinner]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT recipient, sender, face_value, win_prob, sender_nonce,"
                " recipient_rand_hash, creation_round, creation_round_block_hash, sig,"
                " recipient_rand, ticket_hash, status, attempts, next_attempt, last_error,"
                " tx_hash FROM winners WHERE " + where + " ORDER BY rowid",
                args,
            )
            rows = cursor.fetchall()
        return [
            QueuedWinner(
                WinningTicket(
                    Ticket(
                        recipient=r[0],
                        sender=r[1],
                        face_value=int(r[2]),
                        win_prob=int(r[3]),
                        sender_nonce=r[4],
                        recipient_rand_hash=r[5],
                        creation_round=r[6],
                        creation_round_block_hash=r[7],
                    ),
                    r[8],
                    int(r[9]),
                ),
                r[10],
                r[11],
                r[12],
                r[13],
                r[14],
                r[15],
            )
            for r in rows
        ]

    def all(self) -> list[QueuedWinner]:
        return self._rows("1", ())

    def pending(self) -> list[QueuedWinner]:
        return self._rows("status = ?", (PENDING,))

    def due(self, now: float) -> list[QueuedWinner]:
        """Pending winners whose next attempt is due at `now`."""
        return self._rows("status = ? AND next_attempt <= ?", (PENDING, now))

    def next_due(self) -> float | None:
        """When the earliest pending winner is due, or None when none is pending."""
        with self._lock:
            (when,) = self._db.execute(
                "SELECT MIN(next_attempt) FROM winners WHERE status = ?", (PENDING,)
            ).fetchone()
        return when

    def pending_face_value(self, sender: str) -> int:
        """Face value of the sender's winners not yet redeemed: already owed from its funds."""
        with self._lock:
            rows = self._db.execute(
                "SELECT face_value FROM winners WHERE status = ? AND sender = ?",
                (PENDING, sender),
            ).fetchall()
        return sum(int(r[0]) for r in rows)

    def _update(self, ticket_hash: bytes, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE winners SET " + sql + " WHERE ticket_hash = ?", (*args, ticket_hash)
            )

    def mark_redeemed(self, ticket_hash: bytes, tx_hash: str | None, gas_cost: int) -> None:
        self._update(
            ticket_hash,
            "status = ?, tx_hash = ?, gas_cost = ?, attempts = attempts + 1",
            (REDEEMED, tx_hash, str(gas_cost)),
        )

    def mark_retry(self, ticket_hash: bytes, error: str, next_attempt: float) -> None:
        self._update(
            ticket_hash,
            "attempts = attempts + 1, last_error = ?, next_attempt = ?",
            (error[:1000], next_attempt),
        )

    def mark_failed(self, ticket_hash: bytes, error: str) -> None:
        """Given up after every retry; the row stays, for an operator to look at."""
        self._update(
            ticket_hash,
            "status = ?, attempts = attempts + 1, last_error = ?",
            (FAILED, error[:1000]),
        )

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM winners GROUP BY status")
            found = dict(rows.fetchall())
        return {s: found.get(s, 0) for s in (PENDING, REDEEMED, FAILED)}
