"""Which trained model answers: the folder `--model` or the config names, else `mlops find-best`'s recorded choice,
else where `mlops train` put this dataset's model.

In the bottom layer with the workspace: `mlops predict`, `serve`, `batch`, `drift` and `export` choose their model
here, the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mlops.errors import DatasetError, MlopsError, PipelineError
from mlops.workspace import dataset_identity, export_paths, model_dir_for, prepared_dataset

CHOICE_FILE = "mlops_best.json"


@dataclass
class BestChoice:
    dataset: str
    model_dirs: list[str]  # one model folder, or two for a cross-configuration ensemble
    folds: list[int]
    postprocessing: str  # nnU-Net's postprocessing.pkl
    postprocessing_steps: list[str]
    dice_before_pp: float  # cross-validation foreground Dice, before and after post-processing
    dice_after_pp: float
    all_results: dict[str, float]
    instructions: str  # nnU-Net's inference_instructions.txt

    @property
    def ensemble(self) -> bool:
        return len(self.model_dirs) > 1


def model_dir(cfg: DictConfig, override: Path | None = None) -> Path:
    """The model folder: ``--model``, else ``predict.model_dir``, else where `mlops train` puts this dataset's model."""
    if override is not None:
        return Path(override)
    if cfg.predict.get("model_dir"):
        return Path(cfg.predict.model_dir)
    choice = best_choice(cfg)
    if choice is not None:
        if choice.ensemble:
            raise PipelineError(
                f"`mlops find-best` chose an ensemble of {len(choice.model_dirs)} configurations for {choice.dataset}; "
                f"mlops predicts with one configuration: run nnU-Net's commands in {choice.instructions}, or choose "
                "one with --model (or predict.best=false)"
            )
        return Path(choice.model_dirs[0])
    export_paths(cfg)
    try:
        identity, _ = prepared_dataset(cfg)
    except MlopsError:
        identity = dataset_identity(cfg)
    return model_dir_for(cfg, identity)


def best_choice(cfg: DictConfig) -> BestChoice | None:
    """`mlops find-best`'s choice for this dataset, unless a model was chosen by hand or ``predict.best=false``."""
    if cfg.predict.get("model_dir") or not cfg.predict.get("best", True):
        return None
    return read_choice(cfg)


def read_choice(cfg: DictConfig) -> BestChoice | None:
    """The choice `mlops find-best` recorded for the config's dataset, if any."""
    export_paths(cfg)
    try:
        identity, _ = prepared_dataset(cfg)
    except MlopsError:
        try:
            identity = dataset_identity(cfg)
        except MlopsError:
            return None
    path = Path(cfg.paths.results).expanduser().resolve() / identity.folder / CHOICE_FILE
    if not path.is_file():
        return None
    try:
        return BestChoice(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: unreadable find-best choice ({exc}); rerun `mlops find-best`") from None
