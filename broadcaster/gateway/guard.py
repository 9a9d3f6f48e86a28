"""Who may make a gateway spend its key: origins, hosts and CORS, before any route runs.

The gateway pays for every job with its key, so a web page on another
site must not be able to start one through a visitor's browser:

- Origin: a request that can change something (any method but GET, HEAD
  and OPTIONS, and every WebSocket) whose `Origin` is neither the gateway's
  own nor on the allow-list (`--allow-origin`) is refused with 403
  `forbidden_origin`. Requests without an Origin (curl, SDKs, servers) pass.
- CORS: only allow-listed origins get `Access-Control-Allow-Origin`, on
  preflights and on answers; none are allowed by default.
- Host: a gateway without a token serves loopback only (the CLI refuses to
  listen elsewhere), and answers only requests whose `Host` names a
  loopback address, so a DNS-rebinding page (evil.example resolving to
  127.0.0.1, which makes it "same origin") is refused with 403
  `forbidden_host`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broadcaster.gateway.errors import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_METHODS = "GET, POST, DELETE"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"
PREFLIGHT_MAX_AGE = "600"


def is_loopback(host: str) -> bool:
    """Whether a host name or address (IPv6 with or without brackets) is this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The host of a `Host` header, without its port: "[::1]:80" -> "::1"."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class RequestGuard:
    """ASGI middleware applying the rules above to HTTP requests and WebSocket handshakes."""

    def __init__(
        self, app: ASGIApp, *, allow_origins: Iterable[str], loopback_hosts_only: bool
    ) -> None:
        self.app = app
        self.allow_origins = frozenset(o.rstrip("/") for o in allow_origins)
        self.loopback_hosts_only = loopback_hosts_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.loopback_hosts_only and not is_loopback(host_name(host)):
            await self._deny(
                scope,
                receive,
                send,
                ApiError(
                    403,
                    "forbidden_host",
                    f"this gateway has no token, so it answers loopback addresses only, "
                    f"not Host {host!r}; give it --token-file to serve other hosts",
                ),
            )
            return
        origin = headers.get("origin")
        cross = origin is not None and not _same_origin(origin, host)
        allowed = cross and origin is not None and origin.rstrip("/") in self.allow_origins
        method = scope.get("method", "GET")
        if (
            scope["type"] == "http"
            and method == "OPTIONS"
            and cross
            and ("access-control-request-method" in headers)
        ):
            await self._preflight(scope, receive, send, origin or "", allowed)
            return
        changes = scope["type"] == "websocket" or method not in SAFE_METHODS
        if cross and changes and not allowed:
            await self._deny(
                scope,
                receive,
                send,
                ApiError(
                    403,
                    "forbidden_origin",
                    f"requests from {origin} may not use this gateway; "
                    "start it with --allow-origin to allow that site",
                ),
            )
            return
        if allowed and scope["type"] == "http":
            send = _with_cors_headers(send, origin or "")
        await self.app(scope, receive, send)

    async def _preflight(
        self, scope: Scope, receive: Receive, send: Send, origin: str, allowed: bool
    ) -> None:
        if not allowed:
            await self._deny(
                scope,
                receive,
                send,
                ApiError(403, "forbidden_origin", f"{origin} is not an allowed origin"),
            )
            return
        response = Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
                "Vary": "Origin",
            },
        )
        await response(scope, receive, send)

    async def _deny(self, scope: Scope, receive: Receive, send: Send, err: ApiError) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": err.code})
            return
        await err.response()(scope, receive, send)


def _same_origin(origin: str, host: str) -> bool:
    return urlsplit(origin).netloc.lower() == host.lower()


def _with_cors_headers(send: Send, origin: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers.append((b"access-control-allow-origin", origin.encode("latin-1")))
            headers.append((b"vary", b"Origin"))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped
