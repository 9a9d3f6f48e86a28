"""One WebSocket plus its protocol state: the single writer for that socket."""

from __future__ import annotations

import anyio
from websockets.asyncio.connection import Connection as WebSocket
from websockets.exceptions import ConnectionClosed

from protocol.connection import Connection, State
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Message

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class Peer:
    """Serialises sends so that wire order always equals state-machine order."""

    def __init__(self, ws: WebSocket, conn: Connection) -> None:
        self.ws = ws
        self.conn = conn
        self.sender = bytes(20)
        """The broadcaster's payment address, from its hello."""
        self.first_seeds: frozenset[bytes] = frozenset()
        """Seeds of the first-window parameters this connection's `info` issued (spec 8.11)."""
        self._lock = anyio.Lock()

    def decode(self, frame: bytes | str) -> Message:
        """Turn a received frame into a message; raises ProtocolError (fatal)."""
        if isinstance(frame, str):
            self.conn.state = State.CLOSED
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME, "text frames are not used; send binary msgpack frames"
            )
        return self.conn.receive(frame)

    async def send(self, message: Message) -> None:
        async with self._lock:
            await self.ws.send(self.conn.send(message))

    async def send_if_allowed(self, message: Message) -> bool:
        """Send unless the state no longer allows it (the job ended meanwhile)."""
        async with self._lock:
            if type(message) not in self.conn.can_send():
                return False
            await self.ws.send(self.conn.send(message))
            return True

    async def fail(self, error: ProtocolError) -> None:
        """Report a fatal error to the peer and close the socket."""
        code = CLOSE_TOO_BIG if error.code is ErrorCode.FRAME_TOO_LARGE else CLOSE_PROTOCOL_ERROR
        async with self._lock:
            try:
                await self.ws.send(self.conn.error_frame(error))
                await self.ws.close(code, error.code.value)
            except ConnectionClosed:
                pass

    async def close_idle(self, why: str) -> None:
        """End a connection that waited too long for hello or a job (spec 3.5)."""
        await self._end(ErrorCode.IDLE_TIMEOUT, why, CLOSE_NORMAL)

    async def refuse(self, code: ErrorCode, why: str) -> None:
        """Turn a connection away before hello (too many from one client, spec 3.5)."""
        await self._end(code, why, CLOSE_POLICY)

    async def _end(self, code: ErrorCode, why: str, close_code: int) -> None:
        async with self._lock:
            try:
                await self.ws.send(self.conn.error_frame(ProtocolError(code, why)))
                await self.ws.close(close_code, code.value)
            except ConnectionClosed:
                pass
