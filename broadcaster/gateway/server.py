"""Running a gateway under uvicorn on a socket we bind ourselves.

Binding first means port 0 works (the OS picks a free port and we know it
before serving) and clients may connect at once: the kernel queues them
until uvicorn accepts.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

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
    server = uvicorn.Server(config)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    stopped = anyio.Event()

    async def serve() -> None:
        try:
            await server.serve([sock])
        finally:
            stopped.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            # Yield once uvicorn has started: from then on it owns SIGINT and SIGTERM and
            # shuts down in order (a Ctrl-C before would cancel its lifespan mid-start).
            while not server.started:
                if stopped.is_set():
                    raise RuntimeError("the gateway's server stopped while starting")
                await anyio.sleep(0.01)
            try:
                yield f"http://{shown}:{bound}"
            finally:
                server.should_exit = True
    finally:
        sock.close()
