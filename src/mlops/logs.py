"""loguru set-up shared by the CLI and the service: one console sink, optional file sinks next to outputs."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

_FORMAT = "<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {message}"


def setup_logging(verbose: bool = False) -> None:
    """Route logs to stderr: INFO by default, DEBUG with --verbose. Stdout stays free for results (tables, JSON)."""
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if verbose else "INFO", format=_FORMAT, colorize=None)


def add_file_sink(path: Path) -> int:
    """Also write DEBUG-level logs to ``path`` (e.g. next to training results); returns the sink id to remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return logger.add(path, level="DEBUG", enqueue=False)
