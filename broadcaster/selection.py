"""Which orchestrator runs a job: filter, pool, then a weighted draw (or the deadline rule).

1. Filter: offers the pipeline and model, at or under the client's maximum
   price, on the hardware asked for (broadcaster/hardware.py), reachable,
   not suspended, not already tried for this job.
2. With a deadline: only orchestrators projected to finish the job in time
   (measured speed, else the speed they claim, spec 4.5), cheapest first
   (ties: the faster). When none is, the job is refused before anything is
   sent, naming the fastest projection (DeadlineUnmeetable).
3. Otherwise pools in order: warm with a free slot, cold with a free slot,
   then the full ones, then those marked down for claiming far more than
   they deliver (metrics_store.py). In the first non-empty pool, unmeasured
   orchestrators are explored with probability `explore` (always, when none
   is measured), the fastest claim first; else a weighted draw over the
   measured ones:

       p_i = w_stake * stake_i / sum(stake) + w_price * exp(-price_i / mean price) / sum
           + w_speed * speed_i / sum(speed) + w_random / n

   The default profile is go-livepeer's weights (stake 0.7, random 0.3,
   price 0). With no stake known for any candidate (no chain, no config),
   the stake weight goes to measured speed instead: go-livepeer falls back
   on its latency score there too, and a draw over nothing but equal stakes
   would ignore what the broadcaster has observed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from broadcaster.discovery import OrchestratorStatus
from broadcaster.hardware import HardwareFilter
from broadcaster.metrics_store import MetricsStore, SpeedRecord
from broadcaster.suspension import Suspensions
from protocol.messages import Capability


@dataclass(frozen=True)
class Weights:
    stake: float
    price: float
    speed: float
    random: float


LIVEPEER_WEIGHTS = Weights(stake=0.7, price=0.0, speed=0.0, random=0.3)
"""go-livepeer's defaults (selection_algorithm.go): stake 0.7, random 0.3, price 0."""
PROFILES: dict[str, Weights] = {
    "livepeer": LIVEPEER_WEIGHTS,
    "speed": Weights(stake=0.2, price=0.1, speed=0.5, random=0.2),
    "cheap": Weights(stake=0.1, price=0.6, speed=0.2, random=0.1),
}
DEFAULT_EXPLORE = 0.5


@dataclass(frozen=True)
class Candidate:
    url: str
    capability: Capability
    speed: SpeedRecord
    stake: int = 0

    @property
    def price(self) -> Fraction:
        return self.capability.price_per_pixel_step

    @property
    def has_room(self) -> bool:
        return self.capability.in_use < self.capability.capacity

    @property
    def claimed_speed(self) -> float | None:
        """Pixel-steps per second the node claims (spec 4.5); None: no claim."""
        return self.capability.claimed_pixel_steps_per_second

    @property
    def expected_speed(self) -> float | None:
        """What we measured, else the claim: a claim is only a prior (spec M5)."""
        return self.speed.pixel_steps_per_second if self.speed.measured else self.claimed_speed

    def projected_seconds(self, pixel_steps: int) -> float | None:
        """Seconds to run `pixel_steps` here: measured, else claimed; None when unknown."""
        if self.speed.measured:
            return self.speed.seconds_for(pixel_steps)
        claim = self.claimed_speed
        return None if not claim else pixel_steps / claim


@dataclass
class SelectionConfig:
    weights: Weights = LIVEPEER_WEIGHTS
    stakes: Mapping[str, int] = field(default_factory=dict)
    """Stake per orchestrator URL, from the chain where configured, else from config."""
    explore: float = DEFAULT_EXPLORE


class NoOrchestrator(Exception):
    """No orchestrator can take the job; `reasons` says why for each one considered."""

    def __init__(self, summary: str, reasons: Mapping[str, str]) -> None:
        detail = "; ".join(f"{url}: {why}" for url, why in reasons.items())
        super().__init__(f"{summary}" + (f" ({detail})" if detail else ""))
        self.reasons = dict(reasons)


class DeadlineUnmeetable(NoOrchestrator):
    """No offer is projected to finish within the deadline (spec M6); refused before paying."""

    def __init__(self, deadline: float, fastest: str, seconds: float, reasons: Mapping[str, str]):
        super().__init__(
            f"no offer can finish within {deadline:g} s: the fastest, {fastest}, "
            f"is projected to finish in {seconds:.2f} s",
            reasons,
        )
        self.fastest, self.seconds = fastest, seconds


def candidates(
    statuses: Sequence[OrchestratorStatus],
    *,
    pipeline: str,
    model_id: str,
    max_price: Fraction | None,
    metrics: MetricsStore,
    suspensions: Suspensions,
    exclude: Mapping[str, str],
    stakes: Mapping[str, int],
    hardware: HardwareFilter | None = None,
) -> tuple[list[Candidate], dict[str, str]]:
    """The orchestrators that may take the job, and why each other one may not."""
    found: list[Candidate] = []
    rejected: dict[str, str] = {}
    for status in statuses:
        url = status.url
        if url in exclude:
            rejected[url] = exclude[url]
            continue
        suspended = suspensions.reason(url)
        if suspended is not None:
            rejected[url] = f"suspended after {suspended}"
            continue
        if not status.reachable:
            rejected[url] = f"unreachable: {status.error}"
            continue
        cap = status.capability(pipeline, model_id)
        if cap is None:
            rejected[url] = f"does not offer {pipeline} {model_id}"
            continue
        if max_price is not None and cap.price_per_pixel_step > max_price:
            rejected[url] = f"price {float(cap.price_per_pixel_step):g} above the maximum"
            continue
        unfit = hardware.refusal(status.info, cap) if hardware is not None else None
        if unfit is not None:
            assert status.info is not None
            rejected[url] = unfit
            continue
        found.append(Candidate(url, cap, metrics.get(url, model_id), stakes.get(url, 0)))
    return found, rejected


def for_deadline(found: Sequence[Candidate], pixel_steps: int, seconds: float) -> list[Candidate]:
    """Those projected (measured, else claimed) to finish `pixel_steps` within `seconds`,
    cheapest first."""
    timed = [(c, c.projected_seconds(pixel_steps)) for c in found if c.has_room]
    fits = [(c, t) for c, t in timed if t is not None and t <= seconds]
    fits.sort(key=lambda ct: (ct[0].price, ct[1]))
    return [c for c, _ in fits]


def pools(found: Sequence[Candidate]) -> list[list[Candidate]]:
    """Warm with room, cold with room, then full: go-livepeer's warm-first order; those
    marked down for overclaiming come after all of them."""
    fair = [c for c in found if not c.speed.marked_down]
    warm = [c for c in fair if c.capability.warm and c.has_room]
    cold = [c for c in fair if not c.capability.warm and c.has_room]
    full = [c for c in fair if not c.has_room]
    marked = [c for c in found if c.speed.marked_down]
    return [p for p in (warm, cold, full, marked) if p]


def draw_probabilities(pool: Sequence[Candidate], weights: Weights) -> list[float]:
    """p_i of the module docstring for each measured candidate of `pool`."""
    n = len(pool)
    stake_total = sum(c.stake for c in pool)
    speed_w = weights.speed + (weights.stake if stake_total == 0 else 0.0)
    stake_w = weights.stake if stake_total > 0 else 0.0
    speeds = [c.speed.pixel_steps_per_second or 0.0 for c in pool]
    speed_total = sum(speeds)
    mean_price = float(sum(c.price for c in pool)) / n
    price_scores = [math.exp(-float(c.price) / mean_price) if mean_price else 1.0 for c in pool]
    price_total = sum(price_scores)
    probs = []
    for c, speed, price_score in zip(pool, speeds, price_scores, strict=True):
        p = weights.random / n
        if stake_total:
            p += stake_w * c.stake / stake_total
        if speed_total:
            p += speed_w * speed / speed_total
        p += weights.price * price_score / price_total
        probs.append(p)
    total = sum(probs)
    return [p / total for p in probs] if total > 0 else [1.0 / n] * n


def choose(
    found: Sequence[Candidate],
    config: SelectionConfig,
    rng: random.Random,
    *,
    pixel_steps: int,
    deadline: float | None = None,
) -> Candidate:
    """Pick one candidate (see the module docstring); NoOrchestrator when none fits."""
    if not found:
        raise NoOrchestrator("no orchestrator offers the job", {})
    if deadline is not None:
        fits = for_deadline(found, pixel_steps, deadline)
        if not fits:
            reasons = {c.url: _projection(c, pixel_steps) for c in found}
            timed = [(t, c.url) for c in found if (t := c.projected_seconds(pixel_steps))]
            if timed:
                seconds, fastest = min(timed)
                raise DeadlineUnmeetable(deadline, fastest, seconds, reasons)
            raise NoOrchestrator(
                f"no orchestrator is measured fast enough to finish within {deadline:g} s",
                reasons,
            )
        return fits[0]
    pool = pools(found)[0]
    unmeasured = [c for c in pool if not c.speed.measured]
    measured = [c for c in pool if c.speed.measured]
    if unmeasured and (not measured or rng.random() < config.explore):
        return by_claim(unmeasured, rng)
    probs = draw_probabilities(measured, config.weights)
    return rng.choices(measured, weights=probs, k=1)[0]


def by_claim(unmeasured: Sequence[Candidate], rng: random.Random) -> Candidate:
    """The unmeasured node claiming the most speed; those claiming nothing are drawn from
    only when no node claims anything (spec M5: the claim is the prior)."""
    claimed = [c for c in unmeasured if c.claimed_speed]
    if not claimed:
        return rng.choice(list(unmeasured))
    return max(claimed, key=lambda c: c.claimed_speed or 0.0)


def _projection(c: Candidate, pixel_steps: int) -> str:
    seconds = c.projected_seconds(pixel_steps)
    if seconds is None:
        return "not measured yet, and claims no speed"
    how = "measured" if c.speed.measured else "claimed"
    return f"projected {seconds:.2f} s ({how})"
