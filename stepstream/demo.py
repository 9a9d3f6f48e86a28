"""`make demo`: an orchestrator process and a broadcaster on this machine, one paid job.

Starts a local anvil node (installed from npm into .tools/ on first use),
deploys the TicketBroker to it, funds the broadcaster's deposit and reserve,
and settles the job's winning tickets on it. The job runs stepstream/tiny-shapes,
the tiny model with trained weights, so the previews show its shape emerging.
Writes under --out: the final image, every preview (`image.preview-NNN.png`),
a strip and an animation of the previews (enlarged, for a 64x64 job), and
prints a summary of the job's steps, speed, payments, fee and what was
redeemed on chain.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import anyio
from PIL import Image

from broadcaster.events import JobError, JobResult, PreviewFrame
from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from pipelines.tiny_shapes import TINY_SHAPES
from protocol.messages import TextToImageParams
from protocol.pm import address_of
from stepstream.anvil import find_or_install_anvil, run_anvil
from stepstream.chain import SenderInfo, TicketBrokerClient, fund_account, http_web3
from stepstream.demo_gateway import demo_gateway
from stepstream.generate import image_path, preview_path
from stepstream.keys import write_new_key
from stepstream.processes import stepstream_process
from stepstream.settlement import connect_chain

MODEL, PROMPT = TINY_SHAPES, "a yellow triangle on a blue background"
STEPS, PREVIEW_EVERY, SIZE = 24, 4, 64
"""tiny-shapes draws at the 64x64 it was trained at."""
SHOWN_SIDE = 256
"""The strip's and animation's frames are enlarged (nearest neighbour) to this side."""
PRICE_PER_UNIT = 4_768_371  # wei per output pixel, as in go-livepeer's examples
ETH = 10**18
DEPOSIT, RESERVE = ETH // 10, ETH // 10


def write_ai_models(
    path: Path, price_per_unit: int = PRICE_PER_UNIT, model_id: str = TINY_SD
) -> Path:
    """A go-livepeer aiModels.json offering one tiny model, warm."""
    entry = {
        "pipeline": "text-to-image",
        "model_id": model_id,
        "warm": True,
        "capacity": 1,
        "price_per_unit": price_per_unit,
        "pixels_per_unit": 1,
    }
    path.write_text(json.dumps([entry], indent=2))
    return path


@contextmanager
def orchestrator_process(
    out: Path,
    chain_flags: Sequence[str] = (),
    startup_timeout: float = 180.0,
    model_id: str = TINY_SD,
) -> Iterator[str]:
    """Run `stepstream orchestrator` on 127.0.0.1 and a free port; yield its ws:// URL.

    Offers `model_id` for text-to-image. Uses `out/orchestrator.key`, creating
    it if absent, and keeps winners under `out/orchestrator-data`.
    """
    models = write_ai_models(out / "aiModels.json", model_id=model_id)
    key = out / "orchestrator.key"
    if not key.exists():
        write_new_key(key)
    args = [
        "orchestrator", "--models", str(models), "--key", str(key),
        "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(out / "orchestrator-data"), *chain_flags,
    ]  # fmt: skip
    with stepstream_process(
        args, "listening on ", out / "orchestrator.log", startup_timeout
    ) as url:
        yield url


def enlarged(frame: Image.Image, side: int = SHOWN_SIDE) -> Image.Image:
    """`frame` scaled up by a whole factor (nearest neighbour) to about `side`; never down."""
    factor = max(1, side // max(frame.size))
    return frame.resize((frame.width * factor, frame.height * factor), Image.Resampling.NEAREST)


def save_strip(frames: list[Image.Image], path: Path) -> None:
    strip = Image.new("RGB", (sum(f.width for f in frames), max(f.height for f in frames)))
    x = 0
    for frame in frames:
        strip.paste(frame, (x, 0))
        x += frame.width
    strip.save(path)


async def run_demo(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    print("starting anvil (installed from npm into .tools/ on first use)")
    with run_anvil(binary=find_or_install_anvil()) as eth_url:
        return await run_demo_on_chain(out, eth_url)


async def run_demo_on_chain(out: Path, eth_url: str) -> int:
    key = write_new_key(out / "broadcaster.key")
    o_key = write_new_key(out / "orchestrator.key")
    deployer = write_new_key(out / "deployer.key")
    w3 = http_web3(eth_url)
    for k in (key, o_key, deployer):
        fund_account(w3, address_of(k), 10 * ETH)
    broker = TicketBrokerClient.deploy(w3, deployer).address
    print(f"anvil at {eth_url}, TicketBroker deployed at {broker}")
    b_chain = connect_chain(eth_url, broker, key)
    b_chain.fund_deposit_and_reserve(DEPOSIT, RESERVE)
    funds = b_chain.sender_info(b_chain.account)
    o_address = address_of(o_key)
    o_balance = b_chain.balance(o_address)
    # Demo economics: a face value below one window's fee makes every ticket a sure
    # winner, so redemption shows on chain; in production the face value stays
    # 100x above a redemption's gas (spec 8.2) and few tickets win.
    flags = ["--eth-url", eth_url, "--ticket-broker", broker]
    flags += ["--face-value", "1", "--redeem-cost-multiplier", "0"]
    image = out / "image.png"
    params = TextToImageParams(
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        seed=42,
    )
    with orchestrator_process(out, flags, model_id=MODEL) as url:
        print(f"orchestrator listening at {url}, settling on {eth_url}")
        async with BroadcasterSession(url, key, max_price=Fraction(10**6)) as session:
            frames: list[Image.Image] = []
            async for event in session.generate(
                params, model_id=MODEL, preview_every=PREVIEW_EVERY
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
        redeemed = await anyio.to_thread.run_sync(wait_redeemed, b_chain, o_address, result.winners)
        o_gain = b_chain.balance(o_address) - o_balance
        save_and_summarise(out, image, frames, result, funds, broker, redeemed, o_gain)
        await demo_gateway(out, url, out / "broadcaster.key")
    return 0


def save_and_summarise(
    out: Path,
    image: Path,
    frames: list[Image.Image],
    result: JobResult,
    funds: SenderInfo,
    broker: str,
    redeemed: list[int],
    o_gain: int,
) -> None:
    for i, img in enumerate(result.images):
        image_path(image, i).write_bytes(img.image)
    shown = [enlarged(f) for f in frames]
    save_strip(shown, out / "previews-strip.png")
    shown[0].save(
        out / "previews.gif", save_all=True, append_images=shown[1:], duration=300, loop=0
    )
    ttfp = f"{result.time_to_first_preview:.2f} s" if result.time_to_first_preview else "n/a"
    print(
        "\nsummary\n"
        f'  model, prompt          {MODEL}, "{PROMPT}"\n'
        f"  image                  {image} ({SIZE}x{SIZE}), previews: {len(frames)}, "
        f"strip: {out / 'previews-strip.png'}, animation: {out / 'previews.gif'}\n"
        f"  steps                  {result.steps}\n"
        f"  steps/s                {result.steps_per_second:.1f}\n"
        f"  time to first preview  {ttfp}\n"
        f"  job time               {result.seconds:.2f} s\n"
        f"  deposit / reserve      {funds.deposit:,} / {funds.reserve:,} wei "
        f"(TicketBroker {broker})\n"
        f"  tickets sent           {result.tickets_sent}\n"
        f"  winners                {result.winners} (every ticket wins in this demo; in "
        f"production face value stays 100x above a redemption's gas and few tickets win)\n"
        f"  redeemed on chain      {len(redeemed)}: {sum(redeemed):,} wei face value; the "
        f"orchestrator's balance changed by {o_gain:,} wei after gas\n"
        f"  EV paid / fee          {float(result.ev_paid):,.0f} / {float(result.fee):,.0f} wei "
        f"({float(result.ev_paid / result.fee):.4f}x)"
    )


def wait_redeemed(chain: object, recipient: str, winners: int, timeout: float = 30.0) -> list[int]:
    """Face values of the recipient's redeemed tickets, once `winners` are (or at timeout)."""
    broker = chain.client.contract  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        logs = broker.events.WinningTicketRedeemed.get_logs(from_block=0)
        faces = [e["args"]["faceValue"] for e in logs if e["args"]["recipient"] == recipient]
        if len(faces) >= winners or time.monotonic() > deadline:
            return faces
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    sys.exit(anyio.run(run_demo, args.out))


if __name__ == "__main__":
    main()
