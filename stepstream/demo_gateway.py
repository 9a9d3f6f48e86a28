"""The demo's gateway: `stepstream gateway` in front of the demo's orchestrator.

Started beside the demo's own job, it prints its address so a person can
open the page and watch a job; it runs one job through the Livepeer
text-to-image route to show the REST side, and when the demo runs in a
terminal it stays up until Enter is pressed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx

from stepstream.processes import stepstream_process

PROMPT = "a white circle on a red background"
"""A prompt stepstream/tiny-shapes (the demo orchestrator's model) knows."""


@contextmanager
def gateway_process(
    out: Path,
    orchestrator_url: str,
    key: Path,
    chain_flags: Sequence[str] = (),
    timeout: float = 60.0,
) -> Iterator[str]:
    """Start `stepstream gateway` on 127.0.0.1 and a free port; yield its URL.

    The gateway pays as a broadcaster does, so it takes a key whose sender
    has deposit and reserve where the orchestrator settles on a chain.
    """
    args = ["gateway", "--orchestrators", orchestrator_url, "--key", str(key)]
    args += ["--host", "127.0.0.1", "--port", "0", "--outputs", str(out / "gateway-outputs")]
    args += ["--metrics-db", str(out / "gateway-metrics.sqlite3"), *chain_flags]
    with stepstream_process(args, "gateway listening on ", out / "gateway.log", timeout) as child:
        url = child.url
        yield url


async def demo_gateway(
    out: Path, orchestrator_url: str, key: Path, chain_flags: Sequence[str] = ()
) -> None:
    with gateway_process(out, orchestrator_url, key, chain_flags) as url:
        print(f"\ngateway listening at {url}  (open it in a browser to run and watch a job)")
        body = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 12}
        async with httpx.AsyncClient(timeout=120) as client:
            response = await client.post(f"{url}/text-to-image", json=body)
        print(f"  POST {url}/text-to-image -> {response.status_code} {response.text}")
        print(f"  metrics at {url}/metrics, API at {url}/openapi.json")
        if sys.stdin.isatty():
            await anyio.to_thread.run_sync(input, "  press Enter to stop the gateway and finish ")
