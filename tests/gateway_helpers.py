"""A gateway on loopback in front of real orchestrators, for the gateway tests."""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection

from broadcaster.discovery import Discovery
from broadcaster.failover import FailoverPolicy, JobRunner
from broadcaster.gateway.app import Gateway
from broadcaster.gateway.server import serving
from broadcaster.gateway.storage import LocalFolderStorage
from stepstream.logs import install_job_id_records
from tests.failover_helpers import TEST_POLICY, runner_trying_first


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    key: bytes


@contextlib.asynccontextmanager
async def gateway_on_loopback(
    orchestrators: Sequence[str],
    outputs: Path,
    token: str | None = None,
    *,
    first: str | None = None,
    policy: FailoverPolicy = TEST_POLICY,
    **options: Any,
) -> AsyncIterator[RunningGateway]:
    """A gateway whose runner selects among `orchestrators` (`first` first, when given);
    `options` go to Gateway (allow_origins, max_jobs_per_client, heartbeat_seconds)."""
    install_job_id_records()
    if first is not None:
        runner = await runner_trying_first(first, orchestrators, policy)
    else:
        runner = JobRunner(
            Discovery(list(orchestrators), secrets.token_bytes(32)),
            secrets.token_bytes(32),
            policy=policy,
        )
    gateway = Gateway(runner, LocalFolderStorage(outputs), token=token, **options)
    async with serving(gateway, "127.0.0.1", 0) as url:
        yield RunningGateway(gateway, url, runner.private_key)


async def sse_events(
    client: httpx.AsyncClient, url: str, last_event_id: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Parse a Server-Sent Events stream into its JSON events (checking `event:` = type),
    each with its `id:` as `_id`; comments (heartbeats) are skipped."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name: str | None = None
        event_id: int | None = None
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name and event_id is not None
                event["_id"] = event_id
                yield event


IMAGE_TYPES = {1: "jpeg", 2: "png", 3: "webp"}


async def ws_events(ws: ClientConnection) -> AsyncIterator[dict[str, Any]]:
    """A job's WebSocket events until the gateway closes; each preview's JSON is followed by
    its binary frame (event type 1, image type, bytes), which is checked and attached as
    `image_bytes`."""
    async for message in ws:
        assert isinstance(message, str), "a binary frame must follow a preview's JSON"
        event = json.loads(message)
        if event["type"] == "preview":
            assert "image" not in event  # the image travels as bytes, not base64
            frame = await ws.recv()
            assert isinstance(frame, bytes)
            kind, image_type = struct.unpack(">II", frame[:8])
            assert kind == 1 and IMAGE_TYPES[image_type] == event["format"]
            event["image_bytes"] = frame[8:]
            assert len(event["image_bytes"]) == event["bytes"]
        yield event
