"""The conformance cases: one function each, named after the spec id it checks.

A case name starts with the spec id (`F1-text-frame`), so `--case F1` runs
every case of F1, and spec/PROTOCOL.md section 14 names cases by name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

CaseFunction = Callable[[Any], Awaitable["str | Any | None"]]


@dataclass(frozen=True)
class Case:
    name: str
    ids: tuple[str, ...]
    title: str
    run: CaseFunction
    slow: bool = False
    """Waits on block time (expiry, refresh): run only with --slow."""
    background: bool = False
    """Mostly waits on the node's timers, holding one idle connection: runs alongside the
    other cases (but never beside an `alone` one)."""
    alone: bool = False
    """Counts the suite's connections: no background case may run meanwhile."""


class Registry:
    def __init__(self) -> None:
        self.cases: list[Case] = []

    def case(
        self,
        name: str,
        *ids: str,
        title: str,
        slow: bool = False,
        background: bool = False,
        alone: bool = False,
    ) -> Callable[[CaseFunction], CaseFunction]:
        def register(run: CaseFunction) -> CaseFunction:
            if any(c.name == name for c in self.cases):
                raise ValueError(f"case {name} registered twice")
            if not name.startswith(ids[0]):
                raise ValueError(f"case {name} must start with its first id {ids[0]}")
            self.cases.append(Case(name, ids, title, run, slow, background, alone))
            return run

        return register

    def select(self, patterns: list[str], slow: bool) -> list[Case]:
        """Cases whose name equals a pattern, or whose name or ids start with one (K2 runs
        every K2 case); all fast cases when there is no pattern. Slow ones need `slow`
        unless named exactly."""
        chosen = []
        for c in self.cases:
            if not patterns:
                if slow or not c.slow:
                    chosen.append(c)
                continue
            exact = c.name in patterns
            matched = exact or any(c.name.startswith(p + "-") or p in c.ids for p in patterns)
            if matched and (exact or slow or not c.slow):
                chosen.append(c)
        return chosen

    def names(self) -> set[str]:
        return {c.name for c in self.cases}
