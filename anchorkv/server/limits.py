"""Limits enforced before any route runs, as plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide
a client's disconnect from the routes): the body's size, and the key on pages that are not the API."""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection, Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anchorkv.server.errors import error_body


class BodyLimit:
    """ASGI middleware: a body over `max_bytes`, by its Content-Length or as it streams in, gets a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        # no length given: read the body here, up to the limit, and hand it on whole
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(send)
        return await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)

    async def _refuse(self, send: Send) -> None:
        mb = self.max_bytes / 2**20
        await send_error(send, 413, f"the request body is over {mb:g} MB (--max-body-mb)", "invalid_request_error")


async def send_error(send: Send, status: int, message: str, type_: str) -> None:
    body = json.dumps(error_body(message, type_)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], then: Receive) -> Receive:
    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        return await then()

    return receive


def key_matches(headers: Mapping[str, str], key: str) -> bool:
    """`Authorization: Bearer KEY` or `x-api-key: KEY`, compared in constant time."""
    given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    return hmac.compare_digest(given.encode(), key.encode())


class KeyedPages:
    """ASGI middleware: `paths` (metrics, API docs) answer 401 without the key."""

    def __init__(self, app: ASGIApp, paths: Collection[str], key: str) -> None:
        self.app, self.paths, self.key = app, paths, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths and not key_matches(Headers(scope=scope), self.key):
            return await send_error(send, 401, "invalid or missing API key", "authentication_error")
        await self.app(scope, receive, send)
