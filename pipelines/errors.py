"""Errors the pipelines raise that callers are expected to turn into protocol errors."""

from __future__ import annotations


class ModelNotFound(Exception):
    """A model id resolved to nothing on this machine.

    Carries every place that was searched, because "not found" is only
    actionable when the operator can see where the files were expected.
    """

    def __init__(self, model_id: str, searched: list[str]) -> None:
        self.model_id = model_id
        self.searched = list(searched)
        places = "; ".join(self.searched) if self.searched else "(nowhere)"
        super().__init__(f"model {model_id!r} not found offline; searched: {places}")


class InvalidRequest(ValueError):
    """A job's parameters are outside what the pipeline will run.

    Raised before any GPU work so the job can be refused before it is paid for.
    """
