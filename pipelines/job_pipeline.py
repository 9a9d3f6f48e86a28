"""A pipeline object for one job: the model's weights, with its own run state.

A diffusers pipeline keeps per-run state: the scheduler's timesteps and step
index, the guidance scale, the interrupt flag. The fast CLIP tokenizer keeps
its padding and truncation settings on the object and every call rewrites
them, `tokenize()` included, so two jobs sharing one tokenizer can swap
settings and get a wrong image or a tensor-size error. A job therefore runs
on a shallow copy of the pipeline with a fresh scheduler and tokenizers
borrowed from a pool: each job in flight holds its own, and copies are made
only when more jobs run at once than ever before.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.schedule import fresh_scheduler

if TYPE_CHECKING:
    from pipelines.loader import LoadedModel


@contextlib.contextmanager
def job_pipeline(model: LoadedModel, scheduler: Any | None = None) -> Iterator[Any]:
    """A copy of the model's pipeline for one job: a fresh scheduler (or `scheduler`)
    and tokenizers of its own. The weights are shared; the copy is the job's for the block.
    """
    pipe = model.pipe
    with model.tokenizers.borrowed() as tokenizers:
        job = copy.copy(pipe)
        base = pipe.scheduler
        job.scheduler = scheduler or fresh_scheduler(base)
        for name, tokenizer in tokenizers.items():
            setattr(job, name, tokenizer)
        yield job
