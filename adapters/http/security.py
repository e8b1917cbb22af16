"""Bearer tokens, per-client rate limits and body limits (see docs/security.md)."""

from __future__ import annotations

import hmac
import math
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.config import Settings, token_name, token_secret
from adapters.http.errors import ApiError, plain_number, problem_response

TOKEN_FILE = ".api-token"
PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/openapi.json", "/docs", "/"})
PUBLIC_PREFIXES = ("/static/",)
CLIENTS_MAX = 10_000


def ensure_tokens(settings: Settings) -> tuple[list[str], str | None]:
    """The configured tokens, or a token made on first start and kept in DATA/.api-token.

    Returns the tokens and, when a token was made just now, the token to print once.
    """
    if settings.api_tokens:
        return list(settings.api_tokens), None
    path = settings.data_path / TOKEN_FILE
    if path.is_file():
        return [f"default:{path.read_text().strip()}"], None
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return [f"default:{secret}"], secret


def read_token_file(data_dir: Path) -> str | None:
    """The token the server made on first start (for the CLI)."""
    path = data_dir / TOKEN_FILE
    return path.read_text().strip() if path.is_file() else None


class TokenAuth:
    """ASGI middleware: bearer tokens on every route but the public ones."""

    def __init__(self, app: ASGIApp, tokens: list[str], *, enabled: bool = True,
                 metrics_public: bool = False, rate_per_s: float = 50.0, burst: int = 100
                 ) -> None:
        self.app = app
        self.failures = RateLimit(app, rate_per_s=rate_per_s, burst=burst)
        self.enabled = enabled
        self.metrics_public = metrics_public
        self.secrets = [(token_name(t), token_secret(t).encode()) for t in tokens]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES) or \
            (path == "/metrics" and self.metrics_public)
        actor = self.actor(scope) if self.enabled else "anonymous"
        if actor is None and not public:
            # Guessing tokens is rate limited per address, like everything else.
            wait_s = self.failures.take(RateLimit.client_key(scope))
            if wait_s > 0:
                response = problem_response(
                    429, "too many failed authentications from this client; slow down",
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
            else:
                response = problem_response(401, "a valid bearer token is required",
                                            headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["actor"] = actor or "anonymous"
        await self.app(scope, receive, send)

    def actor(self, scope: Scope) -> str | None:
        """The name of the token the request carries, compared in constant time."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, presented = header.partition(b" ")
        if scheme.lower() != b"bearer" or not presented:
            return None
        found = None
        for name, secret in self.secrets:
            if hmac.compare_digest(presented.strip(), secret):
                found = name
        return found


def route_path(scope: Scope) -> str:
    """The request's path inside this app: without the prefix it is mounted under (an
    embedding app's `Mount("/multiflow", app)`, which leaves the prefix in `path`)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


class RateLimit:
    """ASGI middleware: a token bucket per client (its token's name, else its address)."""

    def __init__(self, app: ASGIApp, *, rate_per_s: float, burst: int) -> None:
        self.app = app
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith("/api/"):
            await self.app(scope, receive, send)
            return
        wait_s = self.take(self.client_key(scope))
        if wait_s > 0:
            response = problem_response(
                429, "too many requests from this client; slow down",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def client_key(scope: Scope) -> str:
        actor = scope.get("state", {}).get("actor")
        if actor and actor != "anonymous":
            return f"token:{actor}"
        client = scope.get("client")
        return f"addr:{client[0] if client else 'unknown'}"

    def take(self, key: str) -> float:
        """Take one request from the client's bucket; seconds to wait when it is empty."""
        now = time.monotonic()
        tokens, last = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            wait_s = 0.0
        else:
            self.buckets[key] = (tokens, now)
            wait_s = (1 - tokens) / self.rate_per_s
        while len(self.buckets) > CLIENTS_MAX:
            self.buckets.popitem(last=False)
        return wait_s


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit_bytes`.

    Read from the ASGI messages themselves: Starlette's `stream()` generator cost more
    than the rest of reading a small JSON body.
    """
    declared = plain_number(request.headers.get("content-length"))
    if declared is not None and declared > limit_bytes:
        raise ApiError(413, f"the body is over the limit of {limit_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise ApiError(413, f"the body is over the limit of {limit_bytes} bytes")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
