"""Hydra configuration, composed through Hydra's compose API so that Typer owns the command line.

Each command passes its trailing ``key=value`` arguments here as Hydra overrides. The resolved configuration is
saved next to each run's outputs so a result can always be traced back to the settings that made it.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlops.errors import ConfigError
from mlops.files import write_atomic

CONFIG_NAME = "config"


def config_dir() -> Path:
    """Where the YAML lives: ``$MLOPS_CONFIG_DIR``, else the repository's ``configs/``, else ``./configs``."""
    env = os.environ.get("MLOPS_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs"]
    for candidate in candidates:
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate.resolve()
    searched = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"no {CONFIG_NAME}.yaml found in {searched}; set MLOPS_CONFIG_DIR to the configs folder")


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose the configuration with Hydra overrides and resolve every interpolation (fail early, not mid-run)."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. dataset.id=621)")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None, job_name="mlops"):
            cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid configuration override(s) {overrides}: {exc}") from exc
    from mlops.schema import validate

    validate(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    return cfg


def save_config(cfg: DictConfig, path: Path) -> Path:
    """Write the resolved configuration as YAML (atomically: a reader never sees half a file)."""
    return write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
