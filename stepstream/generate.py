"""`stepstream generate`: one job through the network, with a progress bar.

Everything the user typed is checked first, against the same rules an
orchestrator applies (the wire's field ranges, the pipeline's size rules),
so a bad flag exits 2 naming it before any orchestrator is contacted or
paid, and blames no orchestrator. Then the job runs; the final image goes
to --out (PNG, JPEG or WebP by its suffix, with the job's parameters
inside, as AUTOMATIC1111 writes them) and each preview beside it as
`<stem>.preview-<step><suffix>`. The summary names the seed, the
orchestrators, the time to the first preview, every file written, and the
EV paid against the fee, with what went to orchestrators the job left.
A failed job exits non-zero with the protocol's error code.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import anyio
from tqdm import tqdm

from broadcaster.discovery import Discovery, OrchestratorListError, parse_orchestrator_urls
from broadcaster.failover import FailoverPolicy, JobRunner
from broadcaster.hardware import HardwareFilter, HardwareFilterError
from broadcaster.image_files import UnsupportedImageFile, format_for, parameters_text, write_image
from broadcaster.job_control import JobControl
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import PROFILES, SelectionConfig
from pipelines.errors import InvalidRequest
from pipelines.requests import PIXEL_MULTIPLE, output_shape
from protocol.codec import check
from protocol.errors import ErrorCode, ProtocolError
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    OrchestratorChanged,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import JobRequest, TextToImageParams
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


FLAG_OF_FIELD = {
    "params.prompt": "--prompt",
    "params.negative_prompt": "--negative-prompt",
    "params.width": "--width",
    "params.height": "--height",
    "params.guidance_scale": "--guidance-scale",
    "params.num_inference_steps": "--steps",
    "params.seed": "--seed",
    "params.num_images_per_prompt": "--num-images",
    "model_id": "--model",
    "preview_every": "--preview-every",
    "preview_method": "--preview-method",
}
"""Wire fields of a text-to-image job (after `job.`), and the flag that sets each."""


class UsageError(ValueError):
    """A flag's value that no orchestrator should be asked about; the message names the flag."""


def preview_path(out: Path, step: int) -> Path:
    """`out.png` and step 4 -> `out.preview-004.png` (the suffix of `out`, so its format)."""
    return out.with_name(f"{out.stem}.preview-{step:03d}{out.suffix}")


def image_path(out: Path, index: int) -> Path:
    """The first image is `out` itself; further ones are `out-1.png`, `out-2.png`..."""
    return out if index == 0 else out.with_name(f"{out.stem}-{index}{out.suffix}")


def checked_request(args: argparse.Namespace) -> TextToImageParams:
    """The job's parameters, checked as an orchestrator would check them; UsageError if not."""
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
        check(
            JobRequest(
                job_id="0" * 32,
                pipeline=params.PIPELINE,
                model_id=args.model,
                params=params,
                preview_every=args.preview_every,
                preview_method=args.preview_method,
            )
        )
    except ProtocolError as err:
        path, _, what = err.message.partition(": ")
        flag = FLAG_OF_FIELD.get(path.removeprefix("job."), path)
        raise UsageError(f"{flag}: {what}") from None
    for flag, side in (("--width", params.width), ("--height", params.height)):
        if side % PIXEL_MULTIPLE:
            raise UsageError(f"{flag}: must be a multiple of {PIXEL_MULTIPLE}, got {side}")
    try:
        output_shape(params)
    except InvalidRequest as exc:
        flags = "--width/--height" if "pixels per job" not in str(exc) else "--num-images"
        raise UsageError(f"{flags}: {exc}") from None
    try:
        format_for(args.out)
    except UnsupportedImageFile as exc:
        raise UsageError(f"--out: {exc}") from None
    if args.deadline is not None and args.deadline <= 0:
        raise UsageError(f"--deadline: must be a positive number of seconds, got {args.deadline}")
    hardware_filter(args)
    if args.max_orchestrators < 1:
        raise UsageError("--max-orchestrators: must be at least 1")
    for flag, value in (("--deposit", args.deposit), ("--reserve", args.reserve)):
        if value < 0:
            raise UsageError(f"{flag}: must not be negative, got {value}")
    return params


def hardware_filter(args: argparse.Namespace) -> HardwareFilter:
    """--min-vram and --gpu as a filter of offers (spec 4.5); UsageError naming the flag."""
    try:
        HardwareFilter.parse(args.min_vram, None)
    except HardwareFilterError as exc:
        raise UsageError(f"--min-vram: {exc}") from None
    try:
        return HardwareFilter.parse(args.min_vram, args.gpu)
    except HardwareFilterError as exc:
        raise UsageError(f"--gpu: {exc}") from None


async def run_generate(args: argparse.Namespace) -> int:
    try:
        params = checked_request(args)
        urls = parse_orchestrator_urls(args.orchestrator, args.orchestrators_file)
    except (UsageError, OrchestratorListError) as exc:
        print(f"stepstream generate: {exc}", file=sys.stderr)
        return 2
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
            hardware=hardware_filter(args),
        )
        return await _run_job(runner, params, args, out)
    finally:
        metrics.close()


@dataclass
class _Journey:
    """What the summary tells: where the job ran, what it was paid, what was written."""

    seed: int | None = None
    orchestrators: list[str] = field(default_factory=list)
    moves: list[OrchestratorChanged] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    @property
    def paid_to_left(self) -> Fraction:
        return sum((m.paid for m in self.moves), Fraction(0))


async def _run_job(
    runner: JobRunner, params: TextToImageParams, args: argparse.Namespace, out: Path
) -> int:
    bar: tqdm | None = None
    postfix: dict[str, str] = {}
    journey = _Journey()
    control = JobControl()
    try:
        async for event in runner.generate(
            params,
            model_id=args.model,
            preview_every=args.preview_every,
            preview_method=args.preview_method,
            deadline=args.deadline,
            control=control,
        ):
            if isinstance(event, Accepted):
                if journey.seed is None:
                    journey.seed = event.seed
                if control.url and control.url not in journey.orchestrators:
                    journey.orchestrators.append(control.url)
                if bar is None:
                    # Steps are counted over the whole schedule, across orchestrators.
                    bar = tqdm(total=args.steps, unit="step", desc="generating", file=sys.stderr)
            elif isinstance(event, ProgressUpdate) and bar is not None:
                bar.update(event.step - bar.n)
                postfix["steps/s"] = f"{event.steps_per_second:.1f}"
                bar.set_postfix(postfix)
            elif isinstance(event, OrchestratorChanged):
                journey.moves.append(event)
                print(f"\n{move_line(event)}", file=sys.stderr)
            elif isinstance(event, PreviewFrame):
                path = preview_path(out, event.step)
                write_image(path, event.image)
                journey.written.append(path)
            elif isinstance(event, PaymentSent) and bar is not None:
                postfix["paid"] = f"{float(event.ev_paid / event.fee):.0%}" if event.fee else "free"
                bar.set_postfix(postfix)
            elif isinstance(event, JobResult):
                if bar is not None:
                    bar.close()
                for i, image in enumerate(event.images):
                    path = image_path(out, i)
                    write_image(path, image.image, _parameters(args, image.seed))
                    journey.written.insert(i, path)
                print(_summary(event, journey, runner, out))
                return 0
            elif isinstance(event, JobError):
                if bar is not None:
                    bar.close()
                print(f"stepstream generate: {event.code}: {event.message}", file=sys.stderr)
                if journey.written:
                    print(f"  wrote {', '.join(map(str, journey.written))}", file=sys.stderr)
                return 3 if event.code == ErrorCode.PRICE_TOO_HIGH.value else 1
    finally:
        if bar is not None:
            bar.close()
    return 1


def _parameters(args: argparse.Namespace, seed: int) -> str:
    """The image's parameters, as AUTOMATIC1111 writes them."""
    return parameters_text(
        args.prompt,
        {
            "Steps": args.steps,
            "CFG scale": args.guidance_scale,
            "Seed": seed,
            "Size": f"{args.width}x{args.height}",
            "Model": args.model,
        },
        args.negative_prompt,
    )


def _wei(amount: Fraction) -> str:
    return f"{round(amount):,} wei"


def _summary(result: JobResult, journey: _Journey, runner: JobRunner, out: Path) -> str:
    def named(url: str) -> str:
        status = runner.discovery.status(url)
        info = status.info if status is not None else None
        return f"{url} (0x{info.orchestrator.hex()})" if info is not None else url

    lines = [f"wrote {out} ({result.steps} steps)"]
    lines.append(f"  seed                   {journey.seed}")
    for i, url in enumerate(journey.orchestrators):
        label = "orchestrator" if i == 0 else ""
        lines.append(f"  {label:<22} {named(url)}")
    for move in journey.moves:
        how = f"resumed at step {move.from_step}" if move.resumed else "restarted"
        lines.append(
            f"  {'':<22} left {move.old} after {move.delivered_steps} steps "
            f"({move.reason}), {how} on {move.new}"
        )
    lines.append(
        f"  steps                  {result.steps} in {result.seconds:.2f} s "
        f"({result.steps_per_second:.1f} steps/s at the end)"
    )
    ttfp = result.time_to_first_preview
    lines.append(f"  time to first preview  {'-' if ttfp is None else f'{ttfp:.2f} s'}")
    lines.append(f"  tickets                {result.tickets_sent} sent, {result.winners} winners")
    ratio = f" ({float(result.ev_paid / result.fee):.3f}x)" if result.fee else ""
    lines.append(f"  EV paid / fee          {_wei(result.ev_paid)} / {_wei(result.fee)}{ratio}")
    if result.ev_carried:
        lines.append(
            f"  credit carried         {_wei(result.ev_carried)} left by earlier jobs of this key"
        )
    if journey.moves:
        left = ", ".join(sorted({m.old for m in journey.moves}))
        lines.append(f"  paid to orchestrators left  {_wei(journey.paid_to_left)} ({left})")
    lines.append("  files                  " + ", ".join(map(str, journey.written)))
    return "\n".join(lines)
