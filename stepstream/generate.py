"""`stepstream generate`: one job through the network, with a progress bar.

Writes the final image to --out and each preview beside it as
`<stem>.preview-<step>.png`, and returns a non-zero exit code with the
protocol's error code when the job fails.
"""

from __future__ import annotations

import argparse
import io
import secrets
import sys
from pathlib import Path

import anyio
from PIL import Image
from tqdm import tqdm

from broadcaster.discovery import Discovery, OrchestratorListError, parse_orchestrator_urls
from broadcaster.failover import FailoverPolicy, JobRunner
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import PROFILES, SelectionConfig
from protocol.errors import ErrorCode
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    OrchestratorChanged,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import TextToImageParams
from protocol.pm import address_of
from settlement.chain import settlement_for
from settlement.eth import ChainError
from settlement.stakes import ChainStakes
from stepstream.keys import KeyFileError, load_private_key


def move_line(event: OrchestratorChanged) -> str:
    """`moved from A to B (reason); resumed at step K` (or `; restarted`), then why and
    what the old orchestrator delivered and was paid."""
    how = f"resumed at step {event.from_step}" if event.resumed else "restarted"
    return (
        f"moved from {event.old} to {event.new} ({event.reason}); {how}\n"
        f"  {event.detail}; it delivered {event.delivered_steps} steps and was paid "
        f"{float(event.paid):.0f} wei"
    )


def preview_path(out: Path, step: int) -> Path:
    """`out.png` and step 4 -> `out.preview-004.png`."""
    return out.with_name(f"{out.stem}.preview-{step:03d}.png")


def image_path(out: Path, index: int) -> Path:
    """The first image is `out` itself; further ones are `out-1.png`, `out-2.png`..."""
    return out if index == 0 else out.with_name(f"{out.stem}-{index}{out.suffix}")


def save_as_png(data: bytes, path: Path) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.save(path, format="PNG")


async def run_generate(args: argparse.Namespace) -> int:
    try:
        key = (
            load_private_key(args.key, args.key_password_file)
            if args.key
            else secrets.token_bytes(32)
        )
        settlement = settlement_for(
            args.eth_url, key, controller=args.eth_controller, broker=args.ticket_broker
        )
    except (KeyFileError, ChainError) as exc:
        print(f"stepstream generate: {exc}", file=sys.stderr)
        return 2
    print(f"stepstream generate: {settlement.describe()}", file=sys.stderr)
    if args.deposit or args.reserve:
        try:
            settlement.fund_deposit_and_reserve(args.deposit, args.reserve)
            info = settlement.sender_info(address_of(key))
        except ChainError as exc:
            print(f"stepstream generate: cannot fund deposit and reserve: {exc}", file=sys.stderr)
            return 2
        assert info is not None
        print(
            f"stepstream generate: deposit {info.deposit} wei, reserve {info.reserve} wei",
            file=sys.stderr,
        )
    try:
        params = TextToImageParams(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps,
            seed=args.seed,
            num_images_per_prompt=args.num_images,
        )
    except (TypeError, ValueError) as exc:
        print(f"stepstream generate: {exc}", file=sys.stderr)
        return 2
    try:
        urls = parse_orchestrator_urls(args.orchestrator, args.orchestrators_file)
    except OrchestratorListError as exc:
        print(f"stepstream generate: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    discovery = Discovery(urls, key)
    await discovery.refresh()
    for status in discovery.statuses:
        if not status.reachable:
            print(f"stepstream generate: {status.url} unreachable: {status.error}", file=sys.stderr)
    stakes = ChainStakes(settlement)
    if settlement.redeems:  # stake for selection, from the BondingManager
        addresses = {s.url: s.info.orchestrator for s in discovery.statuses if s.info}
        await anyio.to_thread.run_sync(stakes.refresh, addresses)
        for url, stake in stakes.items():
            print(f"stepstream generate: {url} has stake {stake} wei", file=sys.stderr)
    metrics = MetricsStore(args.metrics_db)
    try:
        runner = JobRunner(
            discovery,
            key,
            metrics=metrics,
            selection=SelectionConfig(weights=PROFILES[args.selection], stakes=stakes),
            policy=FailoverPolicy(
                max_orchestrators=args.max_orchestrators, stall_floor=args.stall_floor
            ),
            max_price=args.max_price,
        )
        return await _run_job(runner, params, args, out)
    finally:
        metrics.close()


async def _run_job(
    runner: JobRunner, params: TextToImageParams, args: argparse.Namespace, out: Path
) -> int:
    bar: tqdm | None = None
    postfix: dict[str, str] = {}
    try:
        async for event in runner.generate(
            params,
            model_id=args.model,
            preview_every=args.preview_every,
            preview_method=args.preview_method,
            deadline=args.deadline,
        ):
            if isinstance(event, Accepted) and bar is None:
                # Steps are counted over the whole schedule, across orchestrators.
                bar = tqdm(total=args.steps, unit="step", desc="generating", file=sys.stderr)
            elif isinstance(event, ProgressUpdate) and bar is not None:
                bar.update(event.step - bar.n)
                postfix["steps/s"] = f"{event.steps_per_second:.1f}"
                bar.set_postfix(postfix)
            elif isinstance(event, OrchestratorChanged):
                print(f"\n{move_line(event)}", file=sys.stderr)
            elif isinstance(event, PreviewFrame):
                save_as_png(event.image, preview_path(out, event.step))
            elif isinstance(event, PaymentSent) and bar is not None:
                postfix["paid"] = f"{float(event.ev_paid / event.fee):.0%}" if event.fee else "free"
                bar.set_postfix(postfix)
            elif isinstance(event, JobResult):
                if bar is not None:
                    bar.close()
                for i, image in enumerate(event.images):
                    save_as_png(image.image, image_path(out, i))
                print(
                    f"wrote {out} ({event.steps} steps, {event.steps_per_second:.1f} steps/s, "
                    f"{event.tickets_sent} tickets, {event.winners} winners, "
                    f"EV paid {float(event.ev_paid):.0f} wei "
                    f"of fee {float(event.fee):.0f} wei)"
                )
                return 0
            elif isinstance(event, JobError):
                if bar is not None:
                    bar.close()
                print(f"stepstream generate: {event.code}: {event.message}", file=sys.stderr)
                return 3 if event.code == ErrorCode.PRICE_TOO_HIGH.value else 1
    finally:
        if bar is not None:
            bar.close()
    return 1
