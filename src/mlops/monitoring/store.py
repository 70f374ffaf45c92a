"""Request records through fsspec: ``<monitor.store>/<model key>/<YYYY-MM-DD>/<instance>.jsonl``.

Each serving instance writes only its own file for the day, so instances never contend, and an object store that
cannot append (``gs://``) works: the instance rewrites its day file from memory (at most every ``flush_s`` seconds,
and when it stops). A record holds statistics, a random id and the time, never a file name or other identifier.
Records are keyed by the model's checkpoint hash, so one model's traffic is never compared with another's profile.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import fsspec
from loguru import logger

from mlops.errors import DatasetError


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


class RequestStore:
    """Appends records for one model from one instance (thread-safe)."""

    def __init__(self, url: str, model_key: str, flush_s: float = 0.0, instance: str | None = None) -> None:
        self.fs, root = fsspec.core.url_to_fs(str(url))
        self.root = root.rstrip("/")
        self.model_key, self.flush_s = model_key, float(flush_s)
        self.instance = instance or uuid.uuid4().hex[:12]
        self._rows: list[str] = []
        self._day = ""
        self._dirty, self._last_flush = False, 0.0
        self._lock = threading.Lock()

    def path(self, day: str) -> str:
        return f"{self.root}/{self.model_key}/{day}/{self.instance}.jsonl"

    def record(self, stats: dict[str, Any], now: float | None = None) -> str:
        """Store one request's statistics under a fresh random id; returns the id."""
        now = time.time() if now is None else now
        rid = uuid.uuid4().hex
        line = json.dumps({"id": rid, "time": round(now, 3), **stats}, allow_nan=False, default=float)
        with self._lock:
            day = _day(now)
            if day != self._day:
                if self._dirty:
                    self._write()
                self._day, self._rows = day, []
            self._rows.append(line)
            self._dirty = True
            if now - self._last_flush >= self.flush_s:
                self._write()
                self._last_flush = now
        return rid

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._write()

    def _write(self) -> None:
        path = self.path(self._day)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "w") as f:
            f.write("\n".join(self._rows) + "\n")
        self._dirty = False


def read_records(url: str, model_key: str, since_days: int | None = None) -> list[dict]:
    """Every instance's records for ``model_key`` (optionally only the last ``since_days`` days), oldest first."""
    fs, root = fsspec.core.url_to_fs(str(url))
    pattern = f"{root.rstrip('/')}/{model_key}/*/*.jsonl"
    files = sorted(fs.glob(pattern))
    if since_days is not None:
        cutoff = _day(time.time() - since_days * 86400)
        files = [f for f in files if f.rsplit("/", 2)[-2] >= cutoff]
    rows: list[dict] = []
    for path in files:
        with fs.open(path, "r") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        logger.warning(f"{path}:{n}: unreadable record skipped")
    if not rows:
        raise DatasetError(
            f"{url}: no request records for model {model_key} yet (the service writes them when "
            "serve.record_stats=true)"
        )
    return sorted(rows, key=lambda r: r.get("time", 0))
