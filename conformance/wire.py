"""One connection to the orchestrator under test, as a broadcaster sees it.

Every frame the orchestrator sends goes through the broadcaster's own
connection state machine (protocol/connection.py), so a frame a broadcaster
must refuse fails the case (spec S6) wherever it turns up. Frames the suite
breaks on purpose bypass the state machine (`send_raw`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from fractions import Fraction
from typing import TypeVar

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conformance.verdicts import CaseFailed, check
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.connection import Connection, State
from protocol.errors import ProtocolError
from protocol.messages import Credit, Error, Hello, Info, JobAccepted, Message, Role
from protocol.sender import TicketSender

M = TypeVar("M", bound=Message)


class Closed(Exception):
    """The orchestrator closed the connection; `code` is its close code (None: none sent)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed with {code} {reason!r}".strip())
        self.code = code
        self.reason = reason


class Wire:
    def __init__(self, ws: ClientConnection, sender: TicketSender, timeout: float) -> None:
        self.ws = ws
        self.conn = Connection(Role.BROADCASTER)
        self.sender = sender
        self.timeout = timeout
        self.frames: list[bytes] = []
        """Every binary frame the orchestrator sent, in order."""
        self.credited = Fraction(0)
        """The current job's credit as the orchestrator last stated it: `accepted.credit`
        (carried from the sender's balance, spec 7.5), then each `credit.credit`."""

    @classmethod
    async def open(cls, url: str, sender: TicketSender, timeout: float) -> Wire:
        with anyio.fail_after(timeout):
            ws = await connect(
                url, max_size=2 * DEFAULT_MAX_FRAME_BYTES, compression=None, open_timeout=timeout
            )
        return cls(ws, sender, timeout)

    # ---------------------------------------------------------------- sending

    async def send(self, message: Message) -> None:
        """A valid frame, allowed in the current state (the suite never sends a bad one here)."""
        await self.ws.send(self.conn.send(message))

    async def send_raw(self, frame: bytes | str, counts_as: Message | None = None) -> None:
        """Bytes the suite wrote by hand. The state machine is not consulted, unless the
        frame is a valid (if unusual) encoding of `counts_as`, whose transition it takes."""
        if counts_as is not None:
            self.conn.send(counts_as)
        await self.ws.send(frame)

    # -------------------------------------------------------------- receiving

    async def recv_raw(self, timeout: float | None = None) -> bytes | str:
        """The next frame as it came, or Closed."""
        wait = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(wait):
                frame = await self.ws.recv()
        except TimeoutError:
            raise CaseFailed(f"no frame from the orchestrator within {wait:g} s") from None
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from None
        if isinstance(frame, bytes):
            self.frames.append(frame)
        return frame

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message, checked as a broadcaster checks it (spec S6)."""
        frame = await self.recv_raw(timeout)
        if isinstance(frame, str):
            raise CaseFailed("S6: the orchestrator sent a text frame")
        try:
            message = self.conn.receive(frame)
        except ProtocolError as err:
            raise CaseFailed(
                f"S6: the orchestrator sent a frame a broadcaster refuses: {err}"
            ) from None
        if isinstance(message, JobAccepted | Credit):
            self.credited = message.credit
        return message

    async def recv_until(
        self, wanted: Callable[[Message], bool], timeout: float | None = None
    ) -> list[Message]:
        """Messages up to and including the first one `wanted` accepts."""
        seen: list[Message] = []
        wait = self.timeout if timeout is None else timeout
        with anyio.move_on_after(wait):
            while True:
                try:
                    message = await self.recv()
                except Closed as closed:
                    got = ", ".join(m.TYPE for m in seen[-5:]) or "nothing"
                    raise CaseFailed(f"the connection closed ({closed.code}) after {got}") from None
                seen.append(message)
                if wanted(message):
                    return seen
        got = ", ".join(_show(m) for m in seen[-5:]) or "nothing"
        raise CaseFailed(f"waited {wait:g} s in vain; the last messages: {got}")

    async def expect(self, kind: type[M], timeout: float | None = None) -> M:
        """The next message, which must be a `kind`."""
        message = await self.recv(timeout)
        check(isinstance(message, kind), f"expected {kind.TYPE}, got {_show(message)}")
        return message  # type: ignore[return-value]

    async def hello(self, features: tuple[str, ...] = ()) -> Info:
        hello = Hello(
            sender=self.sender.address_bytes, agent="stepstream-conformance", features=features
        )
        await self.send(hello)
        return await self.expect(Info)

    async def expect_fatal(self, code: str, timeout: float | None = None) -> Error:
        """The fatal error the last frame must cause: `error` with `code` and no job_id
        (spec F1). Frames of a job in flight may come first."""
        while True:
            try:
                frame = await self.recv_raw(timeout)
            except Closed as closed:
                raise CaseFailed(
                    f"expected error {code}, the connection closed ({closed.code}) instead"
                ) from None
            if isinstance(frame, str):
                raise CaseFailed("S6: the orchestrator sent a text frame")
            message = _decode_any(frame)
            if isinstance(message, Error) and message.job_id is None:
                check(message.code == code, f"expected error {code}, got {message.code}")
                self.conn.state = State.CLOSED
                return message
            if isinstance(message, Info):
                continue  # the answer to a hello that came before the bad frame
            if message is None or isinstance(message, Error) or self.conn.job_id is None:
                raise CaseFailed(f"expected error {code}, got {_show(message)}")

    async def expect_close(self, timeout: float | None = None) -> int | None:
        """The close code once the orchestrator closes; FAIL if it keeps the socket open."""
        wait = self.timeout if timeout is None else timeout
        with anyio.move_on_after(wait):
            while True:
                try:
                    await self.ws.recv()
                except ConnectionClosed as exc:
                    return exc.rcvd.code if exc.rcvd else None
        raise CaseFailed(f"the orchestrator kept the connection open for {wait:g} s")

    async def close(self) -> None:
        with contextlib.suppress(Exception), anyio.move_on_after(2):
            await self.ws.close()

    @property
    def is_open(self) -> bool:
        from websockets.protocol import State as WsState

        return self.ws.state is WsState.OPEN


def _decode_any(frame: bytes) -> Message | None:
    from protocol import codec

    try:
        return codec.decode(frame)
    except ProtocolError:
        return None


def _show(message: Message | None) -> str:
    if message is None:
        return "a frame that does not decode"
    if isinstance(message, Error):
        return f"error {message.code} ({message.message[:120]})"
    return message.TYPE
