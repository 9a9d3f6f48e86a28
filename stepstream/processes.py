"""Running `stepstream` servers as child processes, the way users run them.

The demo, the benches and the tests that must cross process boundaries
start `stepstream orchestrator` (which starts its own runner processes) and
`stepstream gateway` through here, and learn each one's address from the
line it prints once it listens.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.tiny import TINY_SD
from stepstream.keys import write_new_key

PRICE_PER_UNIT = 4_768_371
"""Wei per output pixel, as in go-livepeer's examples."""


@dataclass(frozen=True)
class ChildServer:
    url: str
    process: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def stepstream_process(
    args: Sequence[str],
    ready_prefix: str,
    log_path: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> Iterator[ChildServer]:
    """Run `stepstream ARGS`; yield its URL (the last word of its first stdout line
    starting with `ready_prefix`) and process. Stderr goes to `log_path`; the child is
    ended on exit (continued first, should a test have stopped it)."""
    with log_path.open("w") as log:
        command = [sys.executable, "-m", "stepstream.cli", *args]
        child_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env
        )
        try:
            yield ChildServer(_wait_for_line(proc, ready_prefix, timeout, log_path), proc)
        finally:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot exit
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


def model_entry(
    model_id: str = TINY_SD,
    pipeline: str = "text-to-image",
    *,
    capacity: int = 1,
    price_per_unit: int = PRICE_PER_UNIT,
    warm: bool = True,
) -> dict[str, Any]:
    """One go-livepeer aiModels.json entry."""
    return {
        "pipeline": pipeline,
        "model_id": model_id,
        "warm": warm,
        "capacity": capacity,
        "price_per_unit": price_per_unit,
        "pixels_per_unit": 1,
    }


def write_ai_models(path: Path, entries: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """A go-livepeer aiModels.json (by default the tiny model, warm)."""
    path.write_text(json.dumps(list(entries or [model_entry()]), indent=2))
    return path


@contextmanager
def orchestrator_process(
    workdir: Path,
    entries: Sequence[Mapping[str, Any]] | None = None,
    *,
    name: str = "orchestrator",
    chain_flags: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 180.0,
) -> Iterator[ChildServer]:
    """Run `stepstream orchestrator` on 127.0.0.1 and a free port, with its runner processes.

    Uses `workdir/<name>.key` (created if absent), `workdir/<name>-models.json`,
    keeps winners under `workdir/<name>-data` and logs to `workdir/<name>.log`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    models = write_ai_models(workdir / f"{name}-models.json", entries)
    key = workdir / f"{name}.key"
    if not key.exists():
        write_new_key(key)
    args = [
        "orchestrator", "--models", str(models), "--key", str(key),
        "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(workdir / f"{name}-data"), *chain_flags, *extra_args,
    ]  # fmt: skip
    with stepstream_process(
        args, "listening on ", workdir / f"{name}.log", startup_timeout, env
    ) as child:
        yield child
