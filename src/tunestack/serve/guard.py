"""What stands before the routes: the API key, the body size, and the count of requests in flight."""

from __future__ import annotations

import base64
import hmac
import json
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tunestack.serve.protocol import error_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def key_matches(header: str, keys: Sequence[str]) -> bool:
    """`Authorization: Bearer KEY` (or Basic user:pass for --api_auth), compared in constant time."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    given = value.encode("utf-8")
    # Every key is compared (no early exit), each in constant time.
    return bool(sum(hmac.compare_digest(given, key.encode("utf-8")) for key in keys))


async def send_error(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: a key for /v1/* when keys are set (401), and request bodies up to `max_body_bytes` (413).

    The body is read here, at most `max_body_bytes` of it, and replayed to the app; later `receive` calls go
    to the server, so a client that goes away is still seen as a disconnect.
    """

    def __init__(self, app: Any, keys: Sequence[str], max_body_bytes: int):
        self.app, self.keys, self.max_body_bytes = app, [k for k in keys if k], max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.keys and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = headers.get("authorization")
            if not auth:
                message = "Missing API key: send the header 'Authorization: Bearer <key>'"
                return await send_error(
                    send, 401, error_body(message, "invalid_request_error", None, "missing_api_key")
                )
            if not key_matches(auth, self.keys):
                body = error_body("Incorrect API key provided", "invalid_request_error", None, "invalid_api_key")
                return await send_error(send, 401, body)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = error_body(
            f"request body larger than {self.max_body_bytes} bytes (--max_body_bytes)",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await send_error(send, 413, too_large, [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await send_error(send, 413, too_large, [(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class Capacity:
    """Requests in flight: up to `limit` (decoding + waiting); one more is refused with a 429."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self.lock = threading.Lock()

    def acquire(self, n: int = 1) -> bool:
        with self.lock:
            if self.in_use + n > self.limit:
                return False
            self.in_use += n
            return True

    def release(self, n: int = 1) -> None:
        with self.lock:
            self.in_use = max(0, self.in_use - n)
