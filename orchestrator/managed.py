"""Managed runners: runner processes this orchestrator starts, watches and restarts.

Each managed runner is `stepstream runner --managed` on one device, on a
free loopback port, with a fresh random token passed in its environment. It
is healthy while its process lives and its WebSocket answers pings; when
either fails, the jobs on it end with `runner_lost`, the process is killed
if it still lives, and a new one is started. A managed runner exits by
itself when its stdin closes, so none outlives this process.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Callable

import anyio
import anyio.abc

from orchestrator.runner_client import RunnerClient, RunnerUnavailable
from runner.args import TOKEN_ENV

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0
"""Longest a runner may take to import torch and listen."""
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
"""Waits before successive restarts of a runner that keeps failing."""


class ManagedRunner:
    """One supervised runner process on `device`; `client` is set while it is up."""

    def __init__(
        self,
        device: str,
        memory_budget: int | None = None,
        offload: bool = False,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.memory_budget = memory_budget
        self.offload = offload
        self.on_restart = on_restart
        self.client: RunnerClient | None = None
        self.process: anyio.abc.Process | None = None
        self.restarts = 0
        self._up = anyio.Event()
        self._started = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start supervising (once) in `tg`; the process goes when `tg` is cancelled."""
        if not self._started:
            self._started = True
            tg.start_soon(self.supervise)

    async def wait_up(self, timeout: float = START_TIMEOUT) -> RunnerClient:
        """The live client, waiting for a (re)start; RunnerUnavailable after `timeout`."""
        with anyio.move_on_after(timeout):
            while True:
                client = self.client
                if client is not None and not client.closed.is_set():
                    return client
                await self._up.wait()
        raise RunnerUnavailable(f"runner on {self.device} did not come up in {timeout:g} s")

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "stepstream.cli", "runner", "--managed"]
        cmd += ["--device", self.device, "--host", "127.0.0.1", "--port", "0"]
        if self.memory_budget is not None:
            cmd += ["--memory-budget", str(self.memory_budget)]
        if self.offload:
            cmd.append("--offload")
        return cmd

    async def supervise(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    await self._run_once()
                    failures = 0
                except RunnerUnavailable as exc:
                    log.error("runner on %s failed to start: %s", self.device, exc)
                    failures += 1
                self.restarts += 1
                if self.on_restart is not None:
                    self.on_restart()
                await anyio.sleep(RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)])
                log.warning("restarting the runner on %s", self.device)
        finally:
            with anyio.CancelScope(shield=True):
                await self._kill()

    async def _run_once(self) -> None:
        """Start the process, connect, and return when either one ends."""
        token = secrets.token_urlsafe(32)
        env = {**os.environ, TOKEN_ENV: token}
        self.process = await anyio.open_process(
            self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env
        )
        log.info("started runner pid %d on %s", self.process.pid, self.device)
        try:
            url = await self._read_url()
            client = RunnerClient(url, token, f"{self.device} (pid {self.process.pid})")
            await client.connect()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drain_stdout)
                tg.start_soon(self._watch_process, client)
                self.client = client
                self._up.set()
                await client.receive_loop()
                tg.cancel_scope.cancel()
        finally:
            self.client = None
            self._up = anyio.Event()
            with anyio.CancelScope(shield=True):
                await self._kill()

    async def _read_url(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        with anyio.move_on_after(START_TIMEOUT):
            async for chunk in self.process.stdout:
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if line.startswith("listening on "):
                        return line.removeprefix("listening on ").strip()
            raise RunnerUnavailable(f"runner exited: {buffer.decode(errors='replace')[-500:]}")
        raise RunnerUnavailable(f"runner did not listen within {START_TIMEOUT:g} s")

    async def _drain_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for _chunk in self.process.stdout:
            pass

    async def _watch_process(self, client: RunnerClient) -> None:
        """A dead process closes the connection at once (its socket may linger otherwise)."""
        assert self.process is not None
        code = await self.process.wait()
        log.warning("runner on %s exited with %s", self.device, code)
        await client.aclose()

    async def _kill(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        with anyio.move_on_after(5):
            await process.wait()
            return
        process.kill()
        await process.wait()
