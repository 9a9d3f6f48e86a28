"""A job's events on the wire: Server-Sent Events and WebSocket (spec/GATEWAY.md section 3).

SSE: each event carries its `id:` (the job stream's number), the stream
opens with a `retry:` hint, and a comment line goes out whenever nothing
else did for `heartbeat` seconds, so proxies and browsers keep the
connection. A client that reconnects with `Last-Event-ID: N` gets what
came after event N.

WebSocket: JSON text messages, except the image of a preview. Each
`preview` goes out as its JSON (without the data URL) and then one binary
message laid out as ComfyUI's previews are: a 4-byte big-endian event type
(1, a preview image), a 4-byte big-endian image type (1 JPEG, 2 PNG,
3 WebP), then the image bytes.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
from starlette.websockets import WebSocket, WebSocketDisconnect

from broadcaster.gateway.event_json import preview_bytes, without_image
from broadcaster.gateway.hub import JobStream, JsonEvent

if TYPE_CHECKING:
    from broadcaster.gateway.jobs import GatewayJob

RETRY_MS = 3000
"""How long a browser's EventSource waits before it reconnects."""
PREVIEW_EVENT = 1
IMAGE_TYPES = {"jpeg": 1, "jpg": 1, "png": 2, "webp": 3}


def sse_message(event_id: int, event: JsonEvent) -> str:
    return f"id: {event_id}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def sse_stream(stream: JobStream, after: int, heartbeat: float) -> AsyncIterator[str]:
    """The SSE text of a job's events after event `after`, with heartbeats between."""
    yield f"retry: {RETRY_MS}\n\n"
    with stream.subscribe(after) as sub:
        while True:
            entry = None
            with anyio.move_on_after(heartbeat):
                entry = await sub.next_entry()
                if entry is None:
                    return
            if entry is None:
                yield ": heartbeat\n\n"
                continue
            yield sse_message(entry.id, entry.event)


def preview_frame(event: JsonEvent) -> bytes:
    """A preview's binary WebSocket message: event type, image type, image bytes."""
    image_type = IMAGE_TYPES.get(event["format"].lower(), 0)
    return struct.pack(">II", PREVIEW_EVENT, image_type) + preview_bytes(event)


async def websocket_stream(
    ws: WebSocket, job: GatewayJob, cancel: Callable[[GatewayJob], Awaitable[None]]
) -> None:
    """Send the job's events until the terminal one, reading cancel commands meanwhile."""
    async with anyio.create_task_group() as tg:

        async def read_commands() -> None:
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    try:
                        command = json.loads(await ws.receive_text())
                    except (ValueError, KeyError):
                        command = None
                    if isinstance(command, dict) and command.get("type") == "cancel":
                        await cancel(job)
                    else:
                        await ws.send_json(
                            {"type": "warning", "message": 'send {"type": "cancel"} to cancel'}
                        )
            tg.cancel_scope.cancel()  # the client left: stop sending

        tg.start_soon(read_commands)
        with job.stream.subscribe() as sub, contextlib.suppress(WebSocketDisconnect):
            while (event := await sub.next()) is not None:
                if event["type"] == "preview":
                    await ws.send_json(without_image(event))
                    await ws.send_bytes(preview_frame(event))
                else:
                    await ws.send_json(event)
            await ws.close(1000)
        tg.cancel_scope.cancel()
