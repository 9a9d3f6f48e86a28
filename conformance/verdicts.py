"""Verdicts of conformance cases, and how a case says which one it reached."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    PASS = "PASS"
    """The node did what the spec requires."""
    FAIL = "FAIL"
    """The node broke a MUST; the detail says which and how."""
    SKIP = "SKIP"
    """The case could not run here (a feature not offered, a flag not given); the detail
    says why."""
    INFO = "INFO"
    """Ran, and the spec leaves the outcome to the node (a MAY or SHOULD); the detail says
    what it did."""


@dataclass(frozen=True)
class CaseResult:
    name: str
    ids: tuple[str, ...]
    """The spec ids the case checks (spec/PROTOCOL.md section 14)."""
    title: str
    verdict: Verdict
    detail: str
    seconds: float


class CaseFailed(Exception):
    """Raised inside a case: the node broke the rule the case checks."""


class CaseSkipped(Exception):
    """Raised inside a case: it cannot run against this node; the message says why."""


@dataclass(frozen=True)
class Info:
    """Returned by a case whose outcome the spec leaves to the node."""

    detail: str


def check(condition: bool, failure: str) -> None:
    """FAIL the running case with `failure` unless `condition` holds."""
    if not condition:
        raise CaseFailed(failure)
