"""Tokenizers lent to one job at a time (see pipelines/job_pipeline.py for why).

The fast CLIP tokenizer keeps its padding and truncation settings on the
object, and every call rewrites them, so a tokenizer is never shared by two
jobs in flight: the pool hands each job a set of its own.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")


class TokenizerPool:
    """Spare copies of one pipeline's tokenizers; a job borrows one set at a time."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._names = [n for n in TOKENIZER_NAMES if getattr(pipe, n, None) is not None]
        self._spare: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.copies = 0
        """Sets made so far: the most jobs that ever held tokenizers at once."""

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[dict[str, Any]]:
        """A set of tokenizers no other job uses until this block ends."""
        with self._lock:
            tokenizers = self._spare.pop() if self._spare else None
            if tokenizers is None:
                self.copies += 1
        if tokenizers is None:
            tokenizers = {n: copy.deepcopy(getattr(self._pipe, n)) for n in self._names}
        try:
            yield tokenizers
        finally:
            with self._lock:
                self._spare.append(tokenizers)
