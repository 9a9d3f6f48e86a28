"""Which model a gateway request runs, from what the known orchestrators offer.

Livepeer clients may leave `model_id` empty: the gateway then runs the
first model that a reachable orchestrator offers for the pipeline (in the
configured order). A request nobody can serve is refused here, before any
job runs, with the codes an orchestrator would use: `unsupported_pipeline`
when no reachable orchestrator offers the pipeline, `unknown_model` when
none offers that model for it. Which orchestrator then runs the job is the
JobRunner's choice (broadcaster/selection.py), not this module's.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from broadcaster.discovery import Discovery, OrchestratorStatus
from broadcaster.gateway.errors import ApiError
from broadcaster.gateway.event_json import wei_rate
from broadcaster.hardware import GIB, HardwareFilter


def offered_model(statuses: list[OrchestratorStatus], pipeline: str, model_id: str) -> str | None:
    for status in statuses:
        if status.info is None:
            continue
        for cap in status.info.capabilities:
            if cap.pipeline == pipeline and model_id in ("", cap.model_id):
                return cap.model_id
    return None


def offered_model_ids(statuses: list[OrchestratorStatus]) -> set[str]:
    """Every model id a reachable orchestrator offers, for any pipeline."""
    return {cap.model_id for s in statuses if s.info is not None for cap in s.info.capabilities}


def offer_list(
    statuses: list[OrchestratorStatus],
    max_price: Fraction | None,
    hardware: HardwareFilter | None = None,
) -> list[dict[str, Any]]:
    """What the reachable orchestrators offer, one entry per pipeline and model.

    The cheapest price comes first per entry, with how many orchestrators
    offer it (warm ones apart) and whether the gateway's --max-price allows
    it; then the hardware they run it on (GPU names, the most VRAM, `cpu`)
    and the fastest speed claimed (spec 4.5). Only offers on `hardware` count.
    Orchestrators' URLs are not shown to apps.
    """
    found: dict[tuple[str, str], list[Any]] = {}
    for status in statuses:
        if status.info is None:
            continue
        for cap in status.info.capabilities:
            if hardware is not None and hardware.refusal(status.info, cap) is not None:
                continue
            devices = [d for d in status.info.devices if cap.model_id in d.models]
            found.setdefault((cap.pipeline, cap.model_id), []).append(
                (cap, devices or list(status.info.devices))
            )
    offers = []
    for (pipeline, model_id), entries in found.items():
        caps = [c for c, _ in entries]
        devices = [d for _, ds in entries for d in ds]
        vram = [d.vram_total for d in devices if d.vram_total]
        claims = [c.claimed_pixel_steps_per_second for c in caps]
        fastest = max((c for c in claims if c), default=None)
        price = min(c.price_per_pixel_step for c in caps)
        offers.append(
            {
                "pipeline": pipeline,
                "model_id": model_id,
                "price_per_pixel_step_wei": wei_rate(price),
                "orchestrators": len(caps),
                "warm": sum(1 for c in caps if c.warm),
                "within_max_price": max_price is None or price <= max_price,
                "gpus": sorted({d.gpu for d in devices}),
                "max_vram_gib": round(max(vram) / GIB, 2) if vram else None,
                "claimed_pixel_steps_per_second": None if fastest is None else round(fastest),
                "in_use": sum(c.in_use for c in caps),
                "capacity": sum(c.capacity for c in caps),
            }
        )
    return offers


async def resolve_model(discovery: Discovery, pipeline: str, model_id: str) -> str:
    """The model to run, or a 503 ApiError saying why no orchestrator can run the request.

    What discovery last heard is asked first; when it offers nothing that fits,
    the orchestrators are asked again (one may have come up or loaded the model).
    """
    found = offered_model(discovery.statuses, pipeline, model_id)
    if found is None:
        found = offered_model(await discovery.refresh(), pipeline, model_id)
    if found is not None:
        return found
    reasons: list[str] = []
    pipeline_seen = False
    for status in discovery.statuses:
        if status.info is None:
            reasons.append(f"{status.url}: unreachable ({status.error})")
            continue
        pipeline_seen |= any(c.pipeline == pipeline for c in status.info.capabilities)
        reasons.append(f"{status.url}: does not offer it")
    what = f"{pipeline} {model_id}" if model_id else pipeline
    code = "unknown_model" if pipeline_seen else "unsupported_pipeline"
    raise ApiError(503, code, f"no orchestrator offers {what} ({'; '.join(reasons)})")
