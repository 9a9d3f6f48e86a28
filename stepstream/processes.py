"""Running a `stepstream` server as a child process and learning its address."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def stepstream_process(
    args: Sequence[str], ready_prefix: str, log_path: Path, timeout: float
) -> Iterator[str]:
    """Run `stepstream ARGS`; yield the last word of its first stdout line starting with
    `ready_prefix` (its URL). Stderr goes to `log_path`; the child is ended on exit."""
    with log_path.open("w") as log:
        command = [sys.executable, "-m", "stepstream.cli", *args]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            yield _wait_for_line(proc, ready_prefix, timeout, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float, log_path: Path) -> str:
    """Read the child's stdout until a line starts with `prefix`, within `timeout`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{log_path.stem} exited ({proc.wait()}); see {log_path}")
        if line.startswith(prefix):
            return line.split()[-1]
    raise RuntimeError(f"{log_path.stem} did not start within {timeout:g} s; see {log_path}")
