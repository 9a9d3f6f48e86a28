"""Ctrl-C for the long-running commands: a level-triggered cancel, woken from any thread.

`asyncio.run` answers SIGINT by cancelling the main task once. Two faults follow, both
seen in CI: a handler that catches that one CancelledError (a cleanup's `suppress`, a
library's retry) swallows the Ctrl-C and the command runs on; and a SIGINT the kernel
hands to another thread (a worker, the runner's reader) only trips a flag, so an idle
event loop sleeps in `select` and never sees it. Here the signal goes through the
loop's wake-up fd (`open_signal_receiver`), whichever thread took it, and cancels an
anyio scope, which stays cancelled at every later checkpoint until the command ends.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from anyio.abc import TaskStatus

T = TypeVar("T")


async def until_interrupted(
    command: Callable[[], Awaitable[T]], signals: tuple[int, ...] = (signal.SIGINT,)
) -> T:
    """Run `command()`; on one of `signals` cancel it as a whole, and then raise
    KeyboardInterrupt (SIGINT) or SystemExit(128 + the signal's number).

    The handler is in place before `command` starts, so whatever it prints (a
    "listening on" line, a progress bar) comes after Ctrl-C is handled this way.
    """
    received: list[int] = []
    result: list[T] = []

    async def watch(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(*signals) as arriving:
            task_status.started()
            async for signum in arriving:
                received.append(signum)
                tg.cancel_scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        await tg.start(watch)
        result.append(await command())
        tg.cancel_scope.cancel()
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt
    if received:
        raise SystemExit(128 + received[0])
    return result[0]
