"""Who may call the service and what it writes about each request.

- :class:`BearerToken`: with ``serve.api_token`` set (from ``$MLOPS_API_TOKEN``; for deployments outside Cloud Run
  IAM), every path but the page, its assets, the docs and the health probes needs ``Authorization: Bearer <token>``;
  401 otherwise. The token is compared in constant time and never logged.
- :class:`AccessLog`: one loguru line per request: method, path, status, seconds. Never the query string's values
  or the upload's file name (a file name can identify a patient).
"""

from __future__ import annotations

import hmac
import json
import time

from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops.logs import client_text

# Open without a token: the page and its assets (it asks for the token itself), the docs, the probes.
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/docs", "/redoc", "/openapi.json", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class BearerToken:
    """Pure ASGI: 401 with ``WWW-Authenticate: Bearer`` before the app (and before any upload is read)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self._expected = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, credentials = given.strip().partition(b" ")
        # RFC 7235: the scheme name is case-insensitive ("bearer" is "Bearer"); the token itself is not.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._expected):
            await self.app(scope, receive, send)
            return
        detail = "missing or wrong bearer token: send 'Authorization: Bearer <token>' (serve.api_token)"
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="mlops"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class AccessLog:
    """Pure ASGI: ``GET /info 200 0.003 s`` after each response (the status is 500 if none was sent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            # The path only: query values and form fields (the upload's file name) never reach the log; the path is
            # the client's text, escaped so that it cannot forge a log line.
            path, method = client_text(scope["path"]), client_text(scope["method"], 20)
            logger.info(f"{method} {path} {status[0]} {time.perf_counter() - t0:.3f} s")
