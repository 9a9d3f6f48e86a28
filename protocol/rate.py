"""Steps per second as the broadcaster observes it, from progress arrivals."""

from __future__ import annotations

from collections import deque


class StepRate:
    """Moving average over the last `window` progress events.

    Observed, not advertised: this is what selection and stall timeouts
    will be built on, so it uses arrival times only.
    """

    def __init__(self, window: int = 8) -> None:
        self._points: deque[tuple[float, int]] = deque(maxlen=window)

    def observe(self, now: float, step: int) -> None:
        self._points.append((now, step))

    @property
    def steps_per_second(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._points[0], self._points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
