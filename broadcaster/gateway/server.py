"""Running a gateway under uvicorn on a socket we bind ourselves.

Binding first means port 0 works (the OS picks a free port and we know it
before serving) and clients may connect at once: the kernel queues them
until uvicorn accepts.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import anyio
import uvicorn

from broadcaster.gateway.app import Gateway
from broadcaster.gateway.guard import is_loopback


@contextlib.asynccontextmanager
async def serving(gateway: Gateway, host: str, port: int) -> AsyncIterator[str]:
    """Serve the gateway on host:port; yield its base URL ("http://host:port").

    A gateway without a token pays for anyone who reaches it: it serves loopback only.
    """
    if gateway.token is None and not is_loopback(host):
        raise ValueError(f"a gateway without a token serves loopback only, not {host}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        gateway.app,
        log_level="warning",
        ws="websockets-sansio",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            # Shielded: cancelled (a Ctrl-C), the block below tells it to exit, and it
            # shuts down in order, within timeout_graceful_shutdown, even mid-start.
            with anyio.CancelScope(shield=True):
                await server.serve([sock])
        finally:
            stopped.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                while not server.started:
                    if stopped.is_set():
                        raise RuntimeError("the gateway's server stopped while starting")
                    await anyio.sleep(0.01)
                yield f"http://{shown}:{bound}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn without its own SIGINT and SIGTERM handlers: a Ctrl-C is the command's
    (stepstream/interrupt.py), which cancels the gateway, and `serving` then stops uvicorn
    in order. uvicorn's handlers would only re-raise the signal after its shutdown, into
    asyncio's one-shot cancel, which CI saw lost."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
