"""Structured log lines that carry the job they belong to.

A job's task sets `current_job_id`; every record logged from that task (and
from code it calls, in any module) then has a `job_id` attribute, so one
format string puts `job=<id>` on every line without threading the id
through each call.
"""

from __future__ import annotations

import logging

from protocol.job_context import current_job_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s job=%(job_id)s: %(message)s"

_installed = False


def install_job_id_records() -> None:
    """Make every LogRecord carry `job_id` (idempotent; safe with any handler)."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.job_id = current_job_id.get()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def configure_logging(level: int) -> None:
    """The CLI's logging: one line per record, with the job id."""
    install_job_id_records()
    logging.basicConfig(level=level, format=LOG_FORMAT)
