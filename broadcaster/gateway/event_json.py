"""A job's events as the JSON the gateway's streams carry (spec/GATEWAY.md section 3).

Money is exact: JSON numbers are floats to most parsers, and a float loses
whole wei past 2^53 (about 0.009 ETH). Amounts of wei (fees, EV paid) are
decimal strings of whole wei; an EV is an expectation, so a fraction of a
wei is rounded to the nearest. Prices per pixel-step are often fractions of
a wei (go-livepeer's price_per_unit / pixels_per_unit, spread over steps),
so they are exact rationals: "95367" or "4768371/50", which Python's
`Fraction(text)` reads back.
"""

from __future__ import annotations

import base64
import math
from fractions import Fraction
from typing import Any

from broadcaster.gateway.hub import JsonEvent
from protocol.job_events import (
    Accepted,
    Event,
    JobStatus,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)


def wei(amount: Fraction) -> str:
    """Whole wei as a decimal string, rounded to the nearest (halves up)."""
    return str(math.floor(amount + Fraction(1, 2)))


def wei_rate(price: Fraction) -> str:
    """An exact price in wei: an integer ("95367") or a fraction ("4768371/50")."""
    return str(Fraction(price))


def data_url(fmt: str, data: bytes) -> str:
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"


def event_json(event: Event, earlier: tuple[Fraction, Fraction, int]) -> JsonEvent | None:
    """The stream event for a broadcaster event, or None for those told otherwise.

    `earlier` is what the orchestrators the job left were paid, what the
    steps they delivered cost, and their tickets: `payment` is the cost of
    the whole job so far.
    """
    if isinstance(event, Accepted):
        return {
            "type": "accepted",
            "job_id": event.job_id,
            "steps": event.steps,
            "pixels_per_step": event.pixels_per_step,
            "price_per_pixel_step_wei": wei_rate(event.price_per_pixel_step),
            "fee_wei": wei(event.fee),
            "window_steps": event.window_steps,
            "seed": event.seed,
        }
    if isinstance(event, JobStatus) and event.queue_position is not None:
        start = event.estimated_start_ms
        return {
            "type": "queued",
            "position": event.queue_position,
            "estimated_start_seconds": start / 1000 if start else None,
        }
    if isinstance(event, ProgressUpdate):
        rate = event.steps_per_second
        left = event.total_steps - event.step
        return {
            "type": "progress",
            "step": event.step,
            "total_steps": event.total_steps,
            "steps_per_second": rate,
            "eta_seconds": left / rate if rate > 0 else None,
        }
    if isinstance(event, PreviewFrame):
        return {
            "type": "preview",
            "step": event.step,
            "format": event.format,
            "width": event.width,
            "height": event.height,
            "bytes": len(event.image),
            "image": data_url(event.format, event.image),
        }
    if isinstance(event, PaymentSent):
        paid, fee, tickets = earlier
        return {
            "type": "payment",
            "tickets": event.tickets,
            "tickets_total": tickets + event.tickets_total,
            "ev_paid_wei": wei(paid + event.ev_paid),
            "fee_wei": wei(fee + event.fee),
        }
    return None


def preview_bytes(event: JsonEvent) -> bytes:
    """The image of a `preview` event, from its data URL."""
    return base64.b64decode(event["image"].split(",", 1)[1])


def without_image(event: JsonEvent) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "image"}
