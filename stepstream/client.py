"""A Python client for a stepstream gateway: submit a job, follow it event by event.

In the spirit of `fal_client.stream` and `replicate.stream`:

    from stepstream.client import GatewayClient, Preview, Progress, Result

    async with GatewayClient("http://127.0.0.1:8937") as client:
        async for event in client.stream("text-to-image", {"prompt": "a lighthouse"}):
            if isinstance(event, Progress):
                print(f"step {event.step}/{event.total_steps}")
            elif isinstance(event, Preview):
                open(f"preview-{event.step}.{event.format}", "wb").write(event.image)
            elif isinstance(event, Result):
                png = await client.download(event.images[0])

Events are typed (frozen dataclasses): Submitted, OrchestratorChanged,
Accepted, Progress, Preview, Payment, then Result or Error (the last one).
Money is in whole wei as `int` and prices as exact `Fraction`s. The stream
is the gateway's Server-Sent Events; a dropped connection is resumed with
Last-Event-ID, so no event that matters is lost. A request the gateway
refuses before any job exists (a bad field, a missing token) raises
GatewayError; a job that fails ends its stream with an Error event.

Imports only httpx and anyio: no torch, quick to load in any app.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio
import httpx

__all__ = [
    "Accepted",
    "Error",
    "Event",
    "GatewayClient",
    "GatewayError",
    "Media",
    "OrchestratorChanged",
    "Payment",
    "Preview",
    "Progress",
    "Result",
    "Submitted",
]

RECONNECTS = 5
"""Times a dropped stream is resumed before giving up on it."""


class GatewayError(Exception):
    """The gateway refused a request: HTTP status, its error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Submitted:
    """The gateway took the job; `job_id` is what `cancel` takes."""

    job_id: str


@dataclass(frozen=True)
class OrchestratorChanged:
    """Where the job runs now: `reason` "selected" first, then the reason of each move."""

    url: str
    address: str | None
    reason: str
    previous: str | None = None
    detail: str | None = None
    resumed: bool = False
    from_step: int = 0


@dataclass(frozen=True)
class Accepted:
    """An orchestrator's quote: the steps it will run, its price and its fee."""

    steps: int
    pixels_per_step: int
    price_per_pixel_step_wei: Fraction
    fee_wei: int
    seed: int


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    steps_per_second: float
    eta_seconds: float | None


@dataclass(frozen=True)
class Preview:
    """A look at the job after `step`: the image bytes, in `format` (webp, png or jpeg)."""

    step: int
    format: str
    width: int
    height: int
    image: bytes


@dataclass(frozen=True)
class Payment:
    """The cost so far of the whole job (across orchestrators)."""

    tickets_total: int
    ev_paid_wei: int
    fee_wei: int


@dataclass(frozen=True)
class Media:
    """One output: where the gateway serves it, and its seed."""

    url: str
    seed: int
    nsfw: bool


@dataclass(frozen=True)
class Result:
    images: tuple[Media, ...]
    steps: int
    fee_wei: int
    ev_paid_wei: int
    tickets_sent: int
    seconds: float
    steps_per_second: float
    time_to_first_preview: float | None


@dataclass(frozen=True)
class Error:
    """How the job ended when it did not succeed: a code for programs, a message for people."""

    code: str
    message: str
    status: int


Event = Submitted | OrchestratorChanged | Accepted | Progress | Preview | Payment | Result | Error


def _event(data: Mapping[str, Any]) -> Event | None:
    """The typed event of one gateway event, or None for a kind this client does not know."""
    kind = data.get("type")
    if kind == "orchestrator_changed":
        return OrchestratorChanged(
            data["url"],
            data.get("address"),
            data["reason"],
            data.get("previous"),
            data.get("detail"),
            bool(data.get("resumed", False)),
            int(data.get("from_step", 0)),
        )
    if kind == "accepted":
        return Accepted(
            data["steps"],
            data["pixels_per_step"],
            Fraction(data["price_per_pixel_step_wei"]),
            int(data["fee_wei"]),
            data["seed"],
        )
    if kind == "progress":
        return Progress(
            data["step"], data["total_steps"], data["steps_per_second"], data["eta_seconds"]
        )
    if kind == "preview":
        image = base64.b64decode(data["image"].split(",", 1)[1])
        return Preview(data["step"], data["format"], data["width"], data["height"], image)
    if kind == "payment":
        return Payment(data["tickets_total"], int(data["ev_paid_wei"]), int(data["fee_wei"]))
    if kind == "result":
        return Result(
            tuple(Media(m["url"], m["seed"], m["nsfw"]) for m in data["images"]),
            data["steps"],
            int(data["fee_wei"]),
            int(data["ev_paid_wei"]),
            data["tickets_sent"],
            data["seconds"],
            data["steps_per_second"],
            data["time_to_first_preview"],
        )
    if kind == "error":
        return Error(data["code"], data["message"], data.get("status", 500))
    return None


class GatewayClient:
    """One gateway: its base URL and, when it requires one, its bearer token."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Reads wait at most 4 heartbeats (15 s each): a silent stream is a dead one.
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout)
        )

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(
        self,
        pipeline: str,
        arguments: Mapping[str, Any],
        *,
        image: bytes | str | Path | None = None,
        wait_for_subscriber: bool = True,
    ) -> str:
        """Submit a job and return its id; GatewayError if the gateway refuses it.

        text-to-image takes JSON; image-to-image and image-to-video take the
        image (bytes or a file's path) and send the arguments as a form.
        """
        query = "?wait_for_subscriber=1" if wait_for_subscriber else ""
        path = f"/jobs/{pipeline}{query}"
        if image is None:
            response = await self._http.post(path, json=dict(arguments))
        else:
            data = Path(image).read_bytes() if isinstance(image, str | Path) else image
            fields = {k: _form_value(v) for k, v in arguments.items() if v is not None}
            response = await self._http.post(
                path, data=fields, files={"image": ("image", data, "application/octet-stream")}
            )
        if response.status_code != 202:
            raise _error(response)
        return str(response.json()["job_id"])

    async def stream(
        self,
        pipeline: str,
        arguments: Mapping[str, Any],
        *,
        image: bytes | str | Path | None = None,
    ) -> AsyncIterator[Event]:
        """Submit a job and yield its events: Submitted first, Result or Error last."""
        job_id = await self.submit(pipeline, arguments, image=image)
        yield Submitted(job_id)
        async for event in self.events(job_id):
            yield event

    async def run(
        self,
        pipeline: str,
        arguments: Mapping[str, Any],
        *,
        image: bytes | str | Path | None = None,
    ) -> Result:
        """Submit a job and wait for its Result; GatewayError if it fails."""
        async for event in self.stream(pipeline, arguments, image=image):
            if isinstance(event, Result):
                return event
            if isinstance(event, Error):
                raise GatewayError(event.status, event.code, event.message)
        raise GatewayError(500, "internal_error", "the stream ended without a result")

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The events of a job from the one after event number `after`, to its end.

        A dropped connection is resumed (Last-Event-ID) up to RECONNECTS times.
        """
        last = after
        drops = 0
        while True:
            try:
                async for event_id, data in self._sse(job_id, last):
                    last = event_id
                    event = _event(data)
                    if event is not None:
                        yield event
                    if isinstance(event, Result | Error):
                        return
                return  # the gateway ended the stream: the job had ended before `last`
            except httpx.TransportError:
                drops += 1
                if drops > RECONNECTS:
                    raise
                await anyio.sleep(0.5 * drops)  # the browser's EventSource waits too

    async def cancel(self, job_id: str) -> None:
        response = await self._http.delete(f"/jobs/{job_id}")
        if response.status_code != 202:
            raise _error(response)

    async def status(self, job_id: str) -> dict[str, Any]:
        response = await self._http.get(f"/jobs/{job_id}")
        if response.status_code != 200:
            raise _error(response)
        return dict(response.json())

    async def offers(self) -> list[dict[str, Any]]:
        """What the gateway's orchestrators offer: pipeline, model_id, price, ..."""
        response = await self._http.get("/offers")
        if response.status_code != 200:
            raise _error(response)
        return list(response.json()["offers"])

    async def download(self, media: Media) -> bytes:
        """The bytes of an output (PNG, or MP4 for video)."""
        response = await self._http.get(media.url)
        if response.status_code != 200:
            raise _error(response)
        return response.content

    async def _sse(self, job_id: str, after: int) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        headers = {"Last-Event-ID": str(after)} if after else {}
        async with self._http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                raise _error(r)
            event_id, data = after, ""
            async for line in r.aiter_lines():
                if line.startswith("id:"):
                    event_id = int(line[3:].strip())
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and data:
                    yield event_id, json.loads(data)
                    data = ""


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _error(response: httpx.Response) -> GatewayError:
    try:
        error = response.json()["error"]
        return GatewayError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return GatewayError(response.status_code, "http_error", response.text[:500])
