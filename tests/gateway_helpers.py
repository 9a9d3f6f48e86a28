"""A gateway on loopback in front of real orchestrators, for the gateway tests."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from broadcaster.gateway.app import Gateway
from broadcaster.gateway.selection import FirstAvailable
from broadcaster.gateway.server import serving
from broadcaster.gateway.storage import LocalFolderStorage
from broadcaster.session import BroadcasterSession
from stepstream.logs import install_job_id_records


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    key: bytes


@contextlib.asynccontextmanager
async def gateway_on_loopback(
    orchestrators: Sequence[str], outputs: Path, token: str | None = None
) -> AsyncIterator[RunningGateway]:
    install_job_id_records()
    key = secrets.token_bytes(32)
    choice = FirstAvailable(orchestrators, lambda url: BroadcasterSession(url, key))
    gateway = Gateway(choice, LocalFolderStorage(outputs), token=token)
    async with serving(gateway, "127.0.0.1", 0) as url:
        yield RunningGateway(gateway, url, key)


async def sse_events(client: httpx.AsyncClient, url: str) -> AsyncIterator[dict[str, Any]]:
    """Parse a Server-Sent Events stream into its JSON events (checking `event:` = type)."""
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name: str | None = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                yield event
