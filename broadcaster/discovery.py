"""Which orchestrators exist and what they offer now: a list of URLs, asked for their info.

Each orchestrator is asked (hello, info) with a short timeout; one that does
not answer, or answers without a WebSocket handshake, is marked unreachable
with the reason, never fatal to the others.
`run` refreshes the whole list periodically.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
from websockets.exceptions import WebSocketException

from broadcaster.session import BroadcasterSession, SessionError
from protocol.messages import FEATURE_FIRST_PAYMENT, FEATURES, Capability, Info

DEFAULT_INFO_TIMEOUT = 2.0
DEFAULT_REFRESH_SECONDS = 60.0


class OrchestratorListError(ValueError):
    """The orchestrator list cannot be used; the message says why."""


def parse_orchestrator_urls(values: Iterable[str], file: Path | None = None) -> list[str]:
    """URLs from repeated or comma-separated options and a file (one per line, # comments).

    Order is kept and duplicates dropped; every URL must be ws:// or wss://.
    """
    raw: list[str] = []
    for value in values:
        raw.extend(value.split(","))
    if file is not None:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise OrchestratorListError(f"{file}: {exc.strerror or exc}") from None
        raw.extend(line.split("#", 1)[0] for line in lines)
    urls: list[str] = []
    for item in (r.strip() for r in raw):
        if not item:
            continue
        if not item.startswith(("ws://", "wss://")):
            raise OrchestratorListError(f"{item!r} is not a ws:// or wss:// URL")
        if item not in urls:
            urls.append(item)
    if not urls:
        raise OrchestratorListError("no orchestrator given")
    return urls


@dataclass(frozen=True)
class OrchestratorStatus:
    """What one orchestrator said when last asked, or why it could not be asked."""

    url: str
    info: Info | None
    error: str | None
    checked_at: float

    @property
    def reachable(self) -> bool:
        return self.info is not None

    def capability(self, pipeline: str, model_id: str) -> Capability | None:
        if self.info is None:
            return None
        for cap in self.info.capabilities:
            if cap.pipeline == pipeline and cap.model_id == model_id:
                return cap
        return None


class Discovery:
    """The broadcaster's view of its orchestrators, refreshed on demand or periodically."""

    def __init__(
        self,
        urls: Sequence[str],
        private_key: bytes,
        *,
        info_timeout: float = DEFAULT_INFO_TIMEOUT,
    ) -> None:
        self.urls = list(urls)
        self.private_key = private_key
        self.info_timeout = info_timeout
        self._status: dict[str, OrchestratorStatus] = {}

    @property
    def statuses(self) -> list[OrchestratorStatus]:
        """The last answer of each orchestrator, in list order (unasked ones are absent)."""
        return [self._status[u] for u in self.urls if u in self._status]

    def status(self, url: str) -> OrchestratorStatus | None:
        return self._status.get(url)

    async def refresh(self) -> list[OrchestratorStatus]:
        """Ask every orchestrator for its info at once, each bounded by `info_timeout`."""
        async with anyio.create_task_group() as tg:
            for url in self.urls:
                tg.start_soon(self._ask, url)
        return self.statuses

    async def _ask(self, url: str) -> None:
        info: Info | None = None
        error: str | None = None
        try:
            with anyio.fail_after(self.info_timeout + 1):
                session = BroadcasterSession(
                    url,
                    self.private_key,
                    open_timeout=self.info_timeout,
                    # Discovery runs no job: no first-window parameters to issue (8.11).
                    features=FEATURES - {FEATURE_FIRST_PAYMENT},
                )
                async with session:
                    info = session.info
        except SessionError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"no info within {self.info_timeout:g} s"
        except WebSocketException as exc:
            # Something listens there but does not speak WebSocket (it closed, or answered
            # another protocol): as unreachable as a closed port.
            error = f"cannot reach {url}: no WebSocket handshake ({exc})"
        self._status[url] = OrchestratorStatus(url, info, error, time.time())

    async def run(
        self,
        interval: float = DEFAULT_REFRESH_SECONDS,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Refresh now, report started, then refresh every `interval` seconds until cancelled."""
        await self.refresh()
        task_status.started()
        while True:
            await anyio.sleep(interval)
            await self.refresh()
