"""Which orchestrator runs a job: the seam where real selection will go.

Today: the first orchestrator in the configured order that answers and
offers the pipeline and model. Issue 5 brings scored selection and
failover; it replaces `FirstAvailable` behind the same `OrchestratorChoice`
interface, and the job runner already reports `orchestrator_changed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from broadcaster.gateway.errors import ApiError
from broadcaster.session import BroadcasterSession, SessionError
from protocol.messages import Capability

log = logging.getLogger(__name__)

SessionFactory = Callable[[str], BroadcasterSession]


@dataclass
class Chosen:
    """An open session (inside `async with`) and what it offers for the job."""

    url: str
    session: BroadcasterSession
    capability: Capability


class OrchestratorChoice(Protocol):
    async def choose(self, pipeline: str, model_id: str) -> Chosen:
        """An entered session that offers pipeline and model ("" = any model), or ApiError."""
        ...


def offered(session: BroadcasterSession, pipeline: str, model_id: str) -> Capability | None:
    assert session.info is not None
    for cap in session.info.capabilities:
        if cap.pipeline == pipeline and (model_id in ("", cap.model_id)):
            return cap
    return None


class FirstAvailable:
    def __init__(self, urls: Sequence[str], open_session: SessionFactory) -> None:
        if not urls:
            raise ValueError("at least one orchestrator URL is needed")
        self.urls = list(urls)
        self.open_session = open_session

    async def choose(self, pipeline: str, model_id: str) -> Chosen:
        reasons: list[str] = []
        pipeline_seen = False
        for url in self.urls:
            session = self.open_session(url)
            try:
                await session.__aenter__()
            except SessionError as exc:
                log.info("orchestrator %s unavailable: %s", url, exc)
                reasons.append(f"{url}: unreachable")
                continue
            cap = offered(session, pipeline, model_id)
            if cap is not None:
                return Chosen(url, session, cap)
            assert session.info is not None
            pipeline_seen |= any(c.pipeline == pipeline for c in session.info.capabilities)
            await session.aclose()
            reasons.append(f"{url}: does not offer it")
        what = f"{pipeline} {model_id}" if model_id else pipeline
        code = "unknown_model" if pipeline_seen else "unsupported_pipeline"
        raise ApiError(503, code, f"no orchestrator offers {what} ({'; '.join(reasons)})")
