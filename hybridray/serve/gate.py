"""The ingress's front door, in front of FastAPI: bearer tokens, rate limits, body size.

It runs before any request body is parsed, so an unauthenticated or oversized request costs
almost nothing: 401 (with ``WWW-Authenticate``), 429 (with ``Retry-After``) and 413 are
answered here. Tokens are compared as SHA-256 digests (``hmac.compare_digest``): the
service never holds the tokens themselves, only their digests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any


def digest(token: str) -> str:
    """The SHA-256 hex digest a service stores for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class GatePolicy:
    """What the gate enforces; replaced as a whole when the service is reconfigured."""

    auth: bool = True
    digests: frozenset[str] = frozenset()
    public_paths: tuple[str, ...] = ("/healthz", "/openapi.json", "/docs")
    max_body_bytes: int = 1 << 20
    rate: float | None = None
    burst: int = 0
    retry_after_s: float = 1.0
    on_reject: Any = None          # callable(route, reason) for metrics

    def __post_init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def is_public(self, path: str, root_path: str = "") -> bool:
        """Exactly one of ``public_paths``, below the app's mount point ``root_path``.

        Matched exactly, never by suffix: ``/v1/models/healthz`` is not ``/healthz``.
        """
        root = root_path.rstrip("/")
        if root and path.startswith(root + "/"):
            path = path[len(root):]
        return path in self.public_paths

    def allowed(self, header: str | None) -> str | None:
        """The caller's digest when ``header`` carries a known token, else None."""
        if not header or not header[:7].lower() == "bearer ":
            return None
        got = digest(header[7:].strip())
        ok = any(hmac.compare_digest(got, d) for d in self.digests)
        return got if ok else None

    def wait(self, key: str) -> float:
        if self.rate is None:
            return 0.0
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst)
            return bucket.take()


def error_body(status: int, message: str, type_: str, code: str | None = None,
               param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


class Gate:
    """ASGI middleware; reads the current ``GatePolicy`` from ``policy()`` per request."""

    def __init__(self, app, policy=None):
        self.app = app
        self.policy = policy or (lambda: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy: GatePolicy | None = self.policy()
        if policy is None:   # no user_config applied yet: refuse rather than serve unguarded
            return await _reply(send, 503, error_body(
                503, "this service is not configured yet; retry shortly", "server_error",
                "not_configured"), [(b"retry-after", b"1")])
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        public = policy.is_public(path, scope.get("root_path", ""))
        who = headers.get("x-forwarded-for") or (scope.get("client") or ("?",))[0]
        if policy.auth and not public:
            key = policy.allowed(headers.get("authorization"))
            if key is None:
                missing = "authorization" not in headers
                reject(policy, path, "auth")
                return await _reply(send, 401, error_body(
                    401, "missing bearer token: send 'Authorization: Bearer TOKEN'" if missing
                    else "invalid bearer token", "authentication_error",
                    "missing_token" if missing else "invalid_token"),
                    [(b"www-authenticate", b'Bearer realm="hybridray"')])
            who = key
        if not public:
            wait = policy.wait(who)
            if wait > 0:
                reject(policy, path, "rate")
                return await _reply(send, 429, error_body(
                    429, f"rate limit of {policy.rate:g} requests/s (burst {policy.burst}) "
                         "exceeded; retry after the Retry-After seconds", "rate_limit_error",
                    "rate_limit_exceeded"),
                    [(b"retry-after", str(max(1, round(wait + 0.5))).encode())])
        limit = policy.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            reject(policy, path, "body_size")
            return await _reply(send, 413, _too_large(limit, int(length)))
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    reject(policy, path, "body_size")
                    return await _reply(send, 413, _too_large(limit, None))
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def reject(policy: GatePolicy, path: str, reason: str) -> None:
    if policy.on_reject is not None:
        policy.on_reject(path, reason)


def _too_large(limit: int, got: int | None) -> bytes:
    size = f"{got} bytes" if got is not None else "more"
    return error_body(413, f"request body is {size}; this service accepts at most {limit} "
                           "bytes (limits.max_body_bytes)", "invalid_request_error",
                      "request_too_large")


async def _reply(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
