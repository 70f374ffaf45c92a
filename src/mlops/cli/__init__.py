"""The `mlops` command line: a thin Typer edge over the library, one module per command group (data, training,
inference) on the app of :mod:`mlops.cli.common`.

Every command composes the Hydra configuration from its trailing ``key=value`` overrides. Library errors
(:class:`~mlops.errors.MlopsError`) become one red line on stderr and exit code 1; configuration mistakes are usage
errors (exit code 2). Results go to stdout, logs to stderr.
"""

from __future__ import annotations

# isort: off
# Each module registers its commands on the app; `mlops --help` lists them in this order (the workflow's).
from mlops.cli import data, training, inference, monitoring  # noqa: F401
from mlops.cli.common import app, split_args

# isort: on

__all__ = ["app", "main", "split_args"]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
