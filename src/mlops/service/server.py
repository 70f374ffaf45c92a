"""uvicorn around the app: bounded connections, idle keep-alive, and a SIGTERM that drains work in flight."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from loguru import logger
from omegaconf import DictConfig

from mlops.service.limits import Drain


def build_server(app: FastAPI, cfg: DictConfig) -> Any:
    """uvicorn on ``serve.host:serve.port`` with bounded connections and idle keep-alive, and a SIGTERM that drains.

    On SIGTERM (Cloud Run, docker stop) uvicorn stops accepting at once; work in flight gets ``serve.shutdown_grace_s``
    to finish and is then cancelled at its next tile, so the process exits within Cloud Run's 10 s. The server is
    returned, not run, so tests can run the very same server in a thread (uvicorn installs no signal handlers there).
    """
    import uvicorn

    drain: Drain = app.state.drain

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            if not self.should_exit:
                logger.info(f"Signal {sig}: no new requests; in-flight work has {drain.grace_s:g} s to finish")
            drain.start()
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    config = uvicorn.Config(
        app,
        host=str(cfg.serve.host),
        port=int(cfg.serve.port),
        log_config=None,
        access_log=False,
        limit_concurrency=int(cfg.serve.max_connections),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(float(cfg.serve.shutdown_grace_s)) + 1,
    )
    return DrainingServer(config)


def run_server(app: FastAPI, cfg: DictConfig) -> None:
    """Serve until SIGTERM/Ctrl-C (:func:`build_server`)."""
    build_server(app, cfg).run()
