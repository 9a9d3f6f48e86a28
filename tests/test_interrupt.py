"""Ctrl-C ends a command whatever thread takes the signal and whatever swallows one cancel.

Each case runs in a child process (a signal in pytest's own process would reach pytest),
forcing the interleaving that lost a Ctrl-C in CI: the signal handed to another thread
while the event loop sleeps, and a cleanup that suppresses the one cancellation
`asyncio.run` delivers. `stepstream orchestrator` and `generate` run under
`until_interrupted`; tests/test_cli_errors.py Ctrl-Cs the real processes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import contextlib, signal, sys, threading
import anyio
from stepstream.interrupt import until_interrupted

def run(command):
    try:
        anyio.run(until_interrupted, command) if sys.argv[1] == "wrapped" else anyio.run(command)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""

TO_ANOTHER_THREAD = """
import platform

EPOLL_WAITS = {"x86_64": {"232", "281", "441"}, "aarch64": {"22", "441"}}

def sleeping(tid):
    # In epoll_wait itself (not merely blocked, say on the GIL): the loop's select().
    with open(f"/proc/self/task/{tid}/wchan") as f:
        if "epoll" in f.read():
            return True
    with open(f"/proc/self/task/{tid}/syscall") as f:
        return f.read().split()[0] in EPOLL_WAITS.get(platform.machine(), set())

async def idle():
    main = threading.get_native_id()

    def signal_this_thread_once_main_sleeps():
        while not sleeping(main):  # the loop is in select(), with nothing due
            pass
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=signal_this_thread_once_main_sleeps, daemon=True).start()
    await anyio.sleep_forever()

run(idle)
"""

SWALLOWED = """
async def stubborn():
    with contextlib.suppress(BaseException):  # a cleanup that eats a cancellation
        signal.raise_signal(signal.SIGINT)
        await anyio.sleep_forever()
    await anyio.sleep_forever()

run(stubborn)
"""


def outcome(script: str, mode: str, timeout: float = 20) -> str:
    """What the child printed, or "hung" when it was still running after `timeout`."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(PRELUDE + script), mode],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return "hung"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("script", [TO_ANOTHER_THREAD, SWALLOWED], ids=["thread", "swallowed"])
def test_ctrl_c_ends_the_command(script: str) -> None:
    assert outcome(script, "wrapped") == "interrupted"


def test_bare_asyncio_run_loses_a_ctrl_c_taken_by_another_thread() -> None:
    # The control: the fault the wrapper exists for, on this Python.
    assert outcome(TO_ANOTHER_THREAD, "bare", timeout=3) == "hung"
