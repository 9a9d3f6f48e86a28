"""`make demo`: an orchestrator process and a broadcaster on this machine, one paid job.

Starts a local anvil node (installed from npm into .tools/ on first use),
deploys the project's contracts to it (Controller, TicketBroker,
RoundsManager, BondingManager, Minter) with the orchestrator registered as
an active transcoder, funds the broadcaster's deposit and reserve, and
settles the job's winning tickets on it. The job runs stepstream/tiny-shapes,
the tiny model with trained weights, so the previews show its shape emerging.
Writes under --out: the final image, every preview (`image.preview-NNN.png`),
a strip and an animation of the previews (enlarged, for a 64x64 job), and
prints a summary of the job's steps, speed, payments, fee and the fees the
chain credited to the orchestrator.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from fractions import Fraction
from pathlib import Path

import anyio
from PIL import Image

from broadcaster.session import BroadcasterSession
from pipelines.tiny_shapes import TINY_SHAPES
from protocol.job_events import JobError, JobResult, PreviewFrame
from protocol.messages import TextToImageParams
from protocol.pm import address_of
from settlement.chain import OnChain, connect_chain
from settlement.contracts import SenderInfo
from settlement.deploy import deploy_contracts
from settlement.eth import fund_account, http_web3
from stepstream.anvil import find_or_install_anvil, run_anvil
from stepstream.demo_gateway import demo_gateway
from stepstream.generate import image_path, preview_path
from stepstream.keys import write_new_key
from stepstream.processes import model_entry, orchestrator_process

MODEL, PROMPT = TINY_SHAPES, "a yellow triangle on a blue background"
STEPS, PREVIEW_EVERY, SIZE = 24, 4, 64
"""tiny-shapes draws at the 64x64 it was trained at."""
SHOWN_SIDE = 256
"""The strip's and animation's frames are enlarged (nearest neighbour) to this side."""
ETH = 10**18
DEPOSIT, RESERVE = ETH // 10, ETH // 10


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
    o_address = address_of(o_key)
    controller = deploy_contracts(w3, deployer, [(o_address, ETH)]).controller
    print(f"anvil at {eth_url}, contracts deployed behind the Controller at {controller}")
    b_chain = connect_chain(eth_url, key, controller=controller)
    b_chain.fund_deposit_and_reserve(DEPOSIT, RESERVE)
    funds = b_chain.sender_info(b_chain.account)
    fees_before = fee_pool(b_chain, o_address)
    # Demo economics: a face value below one window's fee makes every ticket a sure
    # winner, so redemption shows on chain; in production the face value stays
    # 100x above a redemption's gas (spec 8.2) and few tickets win.
    chain_flags = ["--eth-url", eth_url, "--eth-controller", controller]
    flags = [*chain_flags, "--initialize-round"]
    flags += ["--face-value", "1", "--redeem-cost-multiplier", "0"]
    image = out / "image.png"
    params = TextToImageParams(
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        seed=42,
    )
    entries = [model_entry(MODEL)]
    with orchestrator_process(out, entries, chain_flags=flags) as orchestrator:
        url = orchestrator.url
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
        fees = fee_pool(b_chain, o_address) - fees_before
        save_and_summarise(out, image, frames, result, funds, controller, redeemed, fees)
        await demo_gateway(out, url, out / "broadcaster.key", chain_flags)
    return 0


def save_and_summarise(
    out: Path,
    image: Path,
    frames: list[Image.Image],
    result: JobResult,
    funds: SenderInfo,
    controller: str,
    redeemed: list[int],
    fees: int,
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
        f"(Controller {controller})\n"
        f"  tickets sent           {result.tickets_sent}\n"
        f"  winners                {result.winners} (every ticket wins in this demo; in "
        f"production face value stays 100x above a redemption's gas and few tickets win)\n"
        f"  redeemed on chain      {len(redeemed)} tickets, {sum(redeemed):,} wei face value\n"
        f"  fees on chain          {fees:,} wei: the rise of the orchestrator's fee pool "
        f"(BondingManager.pendingFees), withdrawn with withdrawFees\n"
        f"  EV paid / fee          {float(result.ev_paid):,.0f} / {float(result.fee):,.0f} wei "
        f"({float(result.ev_paid / result.fee):.4f}x)"
    )


def fee_pool(chain: OnChain, orchestrator: str) -> int:
    """The orchestrator's fees as the chain records them (the BondingManager's pendingFees)."""
    return chain.bonding.pending_fees(orchestrator, chain.rounds_manager.current_round())


def wait_redeemed(chain: OnChain, recipient: str, winners: int, timeout: float = 30.0) -> list[int]:
    """Face values of the recipient's redeemed tickets, once `winners` are (or at timeout)."""
    broker = chain.broker.contract
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
