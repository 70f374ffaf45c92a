"""The CLI's shared parts: the Typer app, its consoles, the error edge (library errors -> one line, exit 1) and how
a command composes its Hydra configuration from ``key=value`` overrides."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from mlops import __version__
from mlops.config import load_config
from mlops.errors import ConfigError, MlopsError
from mlops.logs import setup_logging
from mlops.nnunet import TrainingInterrupted

app = typer.Typer(
    name="mlops",
    help="Medical Segmentation Decathlon -> nnU-Net v2: prepare, train, predict, serve, monitor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def overrides_help(example: str) -> str:
    return f"Hydra overrides key=value of configs/, e.g. {example}."


OVERRIDES_HELP = overrides_help("dataset.id=621")
DATASET_HELP = "Dataset as nnU-Net takes it: id (4), folder (Dataset004_Hippocampus), name or config group (synthetic)."
DEVICE_HELP = "auto, cuda, cpu or mps (-D: -d is the dataset, as in nnU-Net)"


def _version(value: bool) -> None:
    if value:
        out.print(f"mlops {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs, including nnU-Net's own output."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Medical Segmentation Decathlon -> nnU-Net v2: prepare, train, predict, serve, monitor."""
    setup_logging(verbose)


def handle_errors(fn: F) -> F:
    """Turn library errors into one clear line and an exit code; no tracebacks for expected failures."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TrainingInterrupted as exc:
            err.print(f"[bold yellow]Interrupted:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except ConfigError as exc:
            err.print(f"[bold red]Usage error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except MlopsError as exc:
            err.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # the disk is full, a folder went read-only, a mount vanished: say which file
            where = f"{exc.filename}: " if exc.filename else ""
            err.print(f"[bold red]Error:[/] {escape(where + (exc.strerror or str(exc)))}", highlight=False,
                      soft_wrap=True)  # fmt: skip
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def split_args(args: list[str] | None, max_positional: int = 1) -> tuple[list[str], list[str]]:
    """Separate positional arguments from trailing ``key=value`` overrides. A path that exists is a path, even with
    an ``=`` in its name (``run=1/a=b.nii.gz``), and so is a URL or a path whose part before the ``=`` holds a ``/``
    (``gs://bucket/run=1/``: a config key never does); anything else with an ``=`` is an override."""
    positional = [a for a in args or [] if not _is_override(a)]
    overrides = [a for a in args or [] if _is_override(a)]
    if len(positional) > max_positional:
        raise ConfigError(f"unexpected argument(s) {positional[max_positional:]}; overrides look like key=value")
    return positional, overrides


def _is_override(arg: str) -> bool:
    key = arg.split("=", 1)[0]
    return "=" in arg and "/" not in key and "\\" not in key and not Path(arg).exists()


def compose(overrides: list[str], **extra: Any) -> DictConfig:
    """Compose the config; CLI flags (``extra``) are applied as overrides after the user's own."""
    flags = [f"{k}={_override_value(v)}" for k, v in extra.items() if v is not None]
    return load_config([*overrides, *flags])


def with_dataset(overrides: list[str], dataset: str | None) -> list[str]:
    """The user's overrides plus those selecting ``--dataset`` (resolved against the folders the config points to)."""
    if dataset is None:
        return overrides
    from mlops.config import config_dir
    from mlops.datasets import dataset_overrides

    return [*overrides, *dataset_overrides(dataset, load_config(overrides), overrides, config_dir())]


def _override_value(value: Any) -> str:
    """Quote strings and paths so spaces or Hydra grammar characters in them survive parsing."""
    if isinstance(value, str | Path):
        escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"'{escaped}'"
    return str(value)
