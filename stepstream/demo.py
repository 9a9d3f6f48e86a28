"""`make demo`: an orchestrator process and a broadcaster on this machine, one paid job.

Writes under --out: the final image, every preview (`image.preview-NNN.png`),
a strip and an animation of the previews, and prints a summary of the job's
steps, speed, payments and fee.
"""

from __future__ import annotations

import argparse
import io
import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import anyio
from PIL import Image

from broadcaster.events import JobError, JobResult, PreviewFrame
from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from protocol.messages import TextToImageParams
from stepstream.demo_gateway import demo_gateway
from stepstream.generate import image_path, preview_path
from stepstream.keys import write_new_key

STEPS, PREVIEW_EVERY, SIZE = 24, 4, 128
PRICE_PER_UNIT = 4_768_371  # wei per output pixel, as in go-livepeer's examples


def write_ai_models(path: Path, price_per_unit: int = PRICE_PER_UNIT) -> Path:
    """A go-livepeer aiModels.json offering the tiny model, warm."""
    entry = {
        "pipeline": "text-to-image",
        "model_id": TINY_SD,
        "warm": True,
        "capacity": 1,
        "price_per_unit": price_per_unit,
        "pixels_per_unit": 1,
    }
    path.write_text(json.dumps([entry], indent=2))
    return path


@contextmanager
def orchestrator_process(out: Path, startup_timeout: float = 180.0) -> Iterator[str]:
    """Run `stepstream orchestrator` on 127.0.0.1 and a free port; yield its ws:// URL."""
    models = write_ai_models(out / "aiModels.json")
    write_new_key(out / "orchestrator.key")
    log_path = out / "orchestrator.log"
    command = [
        sys.executable, "-m", "stepstream.cli", "orchestrator", "--models", str(models),
        "--key", str(out / "orchestrator.key"), "--host", "127.0.0.1", "--port", "0",
    ]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            yield _wait_for_url(proc, startup_timeout, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_url(proc: subprocess.Popen[str], timeout: float, log_path: Path) -> str:
    """Read the child's stdout until its `listening on URL` line, within `timeout`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"orchestrator exited ({proc.wait()}); see {log_path}")
        if line.startswith("listening on "):
            return line.split()[-1]
    raise RuntimeError(f"orchestrator did not start within {timeout:g} s; see {log_path}")


def save_strip(frames: list[Image.Image], path: Path) -> None:
    strip = Image.new("RGB", (sum(f.width for f in frames), max(f.height for f in frames)))
    x = 0
    for frame in frames:
        strip.paste(frame, (x, 0))
        x += frame.width
    strip.save(path)


async def run_demo(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    key = write_new_key(out / "broadcaster.key")
    image = out / "image.png"
    params = TextToImageParams(
        prompt="a lighthouse on a cliff at dusk, oil painting",
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        seed=42,
    )
    with orchestrator_process(out) as url:
        print(f"orchestrator listening at {url} (no chain: tickets checked, not redeemed)")
        async with BroadcasterSession(url, key, max_price=Fraction(10**6)) as session:
            frames: list[Image.Image] = []
            async for event in session.generate(
                params, model_id=TINY_SD, preview_every=PREVIEW_EVERY
            ):
                if isinstance(event, PreviewFrame):
                    frame = Image.open(io.BytesIO(event.image)).convert("RGB")
                    frame.save(preview_path(image, event.step))
                    frames.append(frame)
                    print(f"  preview at step {event.step:>3}/{STEPS}")
                elif isinstance(event, JobError):
                    print(f"job failed: {event.code}: {event.message}", file=sys.stderr)
                    return 1
                elif isinstance(event, JobResult):
                    result = event
        await demo_gateway(out, url)
    for i, img in enumerate(result.images):
        image_path(image, i).write_bytes(img.image)
    save_strip(frames, out / "previews-strip.png")
    frames[0].save(
        out / "previews.gif", save_all=True, append_images=frames[1:], duration=300, loop=0
    )
    ttfp = f"{result.time_to_first_preview:.2f} s" if result.time_to_first_preview else "n/a"
    print(
        "\nsummary\n"
        f"  image                  {image} ({SIZE}x{SIZE}), previews: {len(frames)}, "
        f"strip: {out / 'previews-strip.png'}, animation: {out / 'previews.gif'}\n"
        f"  steps                  {result.steps}\n"
        f"  steps/s                {result.steps_per_second:.1f}\n"
        f"  time to first preview  {ttfp}\n"
        f"  job time               {result.seconds:.2f} s\n"
        f"  tickets sent           {result.tickets_sent}\n"
        f"  EV paid / fee          {float(result.ev_paid):,.0f} / {float(result.fee):,.0f} wei "
        f"({float(result.ev_paid / result.fee):.4f}x)"
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    sys.exit(anyio.run(run_demo, args.out))


if __name__ == "__main__":
    main()
