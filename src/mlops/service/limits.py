"""What bounds the service: requests in flight (503 beyond), the drain on SIGTERM, and the ASGI guard that limits
each upload's size and time, counts every request and answers 500 rather than dying."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi import HTTPException
from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops.logs import client_text
from mlops.service.metrics import Metrics


class Slots:
    """A non-blocking counter of requests in flight: acquire fails at once when full (-> 503)."""

    def __init__(self, size: int) -> None:
        self.size, self.used, self._lock = size, 0, threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.used -= 1


class Drain:
    """SIGTERM: the server stops accepting at once; work in flight gets ``grace_s`` to finish, then is cancelled.

    Cloud Run allows 10 s between SIGTERM and SIGKILL; uvicorn's graceful shutdown waits slightly longer than the
    grace so the cancelled requests can still be answered.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s, self.deadline = grace_s, float("inf")

    def start(self) -> None:
        self.deadline = min(self.deadline, time.monotonic() + self.grace_s)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


class Guard:
    """Pure ASGI middleware: request metrics, a bounded and time-limited request body, and a last-resort 500.

    The body limit counts the bytes as they arrive, so a chunked upload without Content-Length is cut off at the
    limit instead of being spooled to disk in full; a client that stops sending gets 408 after ``upload_timeout_s``.
    Both answers close the connection. (Pure ASGI rather than ``@app.middleware``: the endpoint keeps the real
    ``receive``, so ``request.is_disconnected()`` sees a client that went away.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_timeout_s: float, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.upload_timeout_s, self.metrics = app, max_bytes, upload_timeout_s, metrics
        self.known_paths: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.known_paths:
            self.known_paths.update(getattr(r, "path", "") for r in scope["app"].routes)
        path = scope["path"] if scope["path"] in self.known_paths else "other"  # bounded metric labels
        t0, status = time.perf_counter(), [500]
        started = [False]

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0], status[0] = True, int(message["status"])
            await send(message)

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                detail = f"upload of {int(declared):,} bytes is above the limit of {self.max_bytes:,}"
                await _json(send_observed, 413, detail)
            else:
                await self.app(scope, self._bounded(receive), send_observed)
        except Exception:  # last resort: never let one request take the server down (no locals: no voxel data)
            logger.opt(exception=True).error(
                f"unhandled error on {client_text(scope['method'], 20)} {client_text(scope['path'])}"
            )
            if not started[0]:
                await _json(send_observed, 500, "internal server error")
        finally:
            code = str(status[0])
            self.metrics.requests.labels(scope["method"], path, code).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)
            if status[0] >= 400:
                self.metrics.errors.labels(code).inc()

    def _bounded(self, receive: Receive) -> Receive:
        received, done = [0], [False]
        deadline = time.monotonic() + self.upload_timeout_s
        limit, timeout = self.max_bytes, self.upload_timeout_s

        async def bounded_receive() -> Message:
            if done[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(
                    408, f"upload incomplete after {timeout:g} s (serve.upload_timeout_s)", {"Connection": "close"}
                ) from None
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise HTTPException(
                        413, f"upload above the limit of {limit:,} bytes", {"Connection": "close"}
                    ) from None
                done[0] = not message.get("more_body", False)
            else:
                done[0] = True
            return message

        return bounded_receive


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
