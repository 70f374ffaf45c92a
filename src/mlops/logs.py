"""loguru set-up shared by the CLI and the service: one console sink, optional file sinks next to outputs."""

from __future__ import annotations

import logging
from pathlib import Path

from loguru import logger
from rich.text import Text

from mlops.progress import stderr_console

_FORMAT = "<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {message}"


def _to_console(message: str) -> None:
    # Through rich's console, so log lines print above live progress bars instead of tearing them.
    stderr_console.print(Text.from_ansi(message.rstrip("\n")), soft_wrap=True, highlight=False)


def client_text(text: str, limit: int = 200) -> str:
    """Text a client sent (a URL path, a header), made safe for one log line: control characters (a newline that
    would forge a second line, ANSI escapes) are shown escaped, and it is cut at ``limit`` characters."""
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: limit + 1])
    return safe if len(text) <= limit else safe[:limit] + "..."


def setup_logging(verbose: bool = False) -> None:
    """Route logs to stderr: INFO by default, DEBUG with --verbose. Stdout stays free for results (tables, JSON)."""
    logger.remove()
    # diagnose=False: loguru would otherwise print every local variable of a traceback, i.e. voxel arrays.
    logger.add(_to_console, level="DEBUG" if verbose else "INFO", format=_FORMAT, colorize=True, diagnose=False)


def add_file_sink(path: Path) -> int:
    """Also write DEBUG-level logs to ``path`` (e.g. next to training results); returns the sink id to remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return logger.add(path, level="DEBUG", enqueue=False, diagnose=False)


class _InterceptHandler(logging.Handler):
    """Send stdlib logging (uvicorn, libraries) through loguru, so every log line has one format and one sink."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(level, f"[{record.name}] {record.getMessage()}")


def intercept_stdlib_logging(names: tuple[str, ...] = ("uvicorn", "uvicorn.error", "uvicorn.access")) -> None:
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
    for name in names:
        lg = logging.getLogger(name)
        lg.handlers = [_InterceptHandler()]
        lg.propagate = False
