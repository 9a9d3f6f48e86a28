"""How long a broadcaster's connection may sit idle, and how many one client may hold.

A connection costs the orchestrator memory and a task; one that never sends
`hello`, or that holds no job, must end on its own, and no single address
may open enough of them to crowd out others (spec 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 32


@dataclass(frozen=True)
class ConnectionLimits:
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    """Seconds from the WebSocket handshake to `hello`."""
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    """Seconds a connection may stay open with no job in flight (after `info`, between jobs)."""
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    """Open connections per client IP address; one more is refused."""
