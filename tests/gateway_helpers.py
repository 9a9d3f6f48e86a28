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
) -> AsyncIterator[RunningGateway]:
    """A gateway whose runner selects among `orchestrators` (`first` first, when given)."""
    install_job_id_records()
    if first is not None:
        runner = await runner_trying_first(first, orchestrators, policy)
    else:
        runner = JobRunner(
            Discovery(list(orchestrators), secrets.token_bytes(32)),
            secrets.token_bytes(32),
            policy=policy,
        )
    gateway = Gateway(runner, LocalFolderStorage(outputs), token=token)
    async with serving(gateway, "127.0.0.1", 0) as url:
        yield RunningGateway(gateway, url, runner.private_key)


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
