"""Typed errors of the library layer.

Every expected failure raises a subclass of :class:`MlopsError` with a message a user can act on (it names the file
and the problem). The CLI turns these into one line and exit code 1; the API into a JSON ``detail``.
"""

from __future__ import annotations


class MlopsError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(MlopsError):
    """The configuration (or a command-line override) is invalid. A usage error: the CLI exits with code 2."""


class DatasetError(MlopsError):
    """A Decathlon task or nnU-Net dataset cannot be read or converted."""


class ValidationError(DatasetError):
    """A Decathlon task failed validation; carries every problem found, one per case."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) found, nothing was written:\n{shown}")


class DownloadError(MlopsError):
    """A download failed or its checksum did not match."""


class PipelineError(MlopsError):
    """nnU-Net's planning, preprocessing, training or inference failed."""


class Cancelled(MlopsError):
    """Work was cancelled on purpose (a client disconnected, a time limit passed, the service is shutting down)."""
