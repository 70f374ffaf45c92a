"""Calls into remote stores bounded in time: an object store that cannot be reached (no network, a missing bucket,
no credentials) makes fsspec backends retry for minutes; a command should fail in seconds with one line instead."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
QUIET_LOGGERS = ("gcsfs", "fsspec", "aiohttp", "google")  # their retry tracebacks: the caller reports the failure


def call_within(work: Callable[[], T], timeout_s: float, on_timeout: Callable[[], Exception]) -> T:
    """``work()`` in a daemon thread, its exceptions re-raised here; ``on_timeout()`` is raised if it has not
    answered within ``timeout_s`` (the thread is abandoned: it holds no lock and writes nothing)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        thread = threading.Thread(target=run, name="mlops-remote", daemon=True)
        thread.start()
        thread.join(timeout_s)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    if thread.is_alive():
        raise on_timeout()
    if "error" in box:
        raise box["error"]
    return box["value"]
