"""Every orchestrator case, in the order the suite runs them."""

from __future__ import annotations

from conformance import (
    cases_credit,
    cases_first_payment,
    cases_framing,
    cases_jobs,
    cases_lifecycle,
    cases_offers,
    cases_resume,
    cases_states,
    cases_tickets,
)
from conformance.registry import Registry

REGISTRY = Registry()
for module in (
    cases_framing,
    cases_states,
    cases_jobs,
    cases_credit,
    cases_first_payment,
    cases_tickets,
    cases_lifecycle,
    cases_offers,
    cases_resume,
):
    REGISTRY.cases.extend(module.cases.cases)
