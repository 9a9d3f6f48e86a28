"""Which orchestrator runs a job: filter, pool, then a weighted draw (or the deadline rule).

1. Filter: offers the pipeline and model, at or under the client's maximum
   price, reachable, not suspended, not already tried for this job.
2. With a deadline: only orchestrators whose measured speed finishes the
   job in time, cheapest first (ties: the faster).
3. Otherwise pools in order: warm with a free slot, cold with a free slot,
   then the full ones. In the first non-empty pool, unmeasured orchestrators
   are explored with probability `explore` (always, when none is measured);
   else a weighted draw over the measured ones:

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
        found.append(Candidate(url, cap, metrics.get(url, model_id), stakes.get(url, 0)))
    return found, rejected


def for_deadline(found: Sequence[Candidate], pixel_steps: int, seconds: float) -> list[Candidate]:
    """Those whose measured speed finishes `pixel_steps` within `seconds`, cheapest first."""
    timed = [(c, c.speed.seconds_for(pixel_steps)) for c in found if c.has_room]
    fits = [(c, t) for c, t in timed if t is not None and t <= seconds]
    fits.sort(key=lambda ct: (ct[0].price, ct[1]))
    return [c for c, _ in fits]


def pools(found: Sequence[Candidate]) -> list[list[Candidate]]:
    """Warm with room, cold with room, then full: go-livepeer's warm-first order."""
    warm = [c for c in found if c.capability.warm and c.has_room]
    cold = [c for c in found if not c.capability.warm and c.has_room]
    full = [c for c in found if not c.has_room]
    return [p for p in (warm, cold, full) if p]


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
            raise NoOrchestrator(
                f"no orchestrator is measured fast enough to finish within {deadline:g} s",
                {c.url: _projection(c, pixel_steps) for c in found},
            )
        return fits[0]
    pool = pools(found)[0]
    unmeasured = [c for c in pool if not c.speed.measured]
    measured = [c for c in pool if c.speed.measured]
    if unmeasured and (not measured or rng.random() < config.explore):
        return rng.choice(unmeasured)
    probs = draw_probabilities(measured, config.weights)
    return rng.choices(measured, weights=probs, k=1)[0]


def _projection(c: Candidate, pixel_steps: int) -> str:
    seconds = c.speed.seconds_for(pixel_steps)
    return "not measured yet" if seconds is None else f"projected {seconds:.2f} s"
