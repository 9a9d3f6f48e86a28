"""Which job the running task works for, so that log lines can name it.

A job's task sets `current_job_id`; stepstream/logs.py puts it on every log
record made from that task, and from code it calls. A context variable, not
an argument: no function between the task and the log call has to carry it.
"""

from __future__ import annotations

import contextvars

current_job_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="-")
