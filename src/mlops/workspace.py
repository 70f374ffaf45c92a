"""Where datasets and models live: nnU-Net's three folders, a dataset's identity and its prepared folder, a trained
model's folder and folds, and the images a model was trained and validated on.

The bottom layer, with the volumes, the config and the errors: `mlops prepare`, `train`, `predict`, the service,
batch, drift, the reference profile and the export check all ask here, so they agree on one answer. Nothing here
imports nnU-Net; its boundary (:mod:`mlops.nnunet`) reads the folders from the environment this module sets.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mlops.datasets import inventory
from mlops.decathlon import TASK_RE, read_task, task_folder_name
from mlops.errors import ConfigError, DatasetError
from mlops.volumes import case_id

PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def export_folders(raw: Path, preprocessed: Path, results: Path) -> None:
    """Create nnU-Net's three folders and export them as absolute paths for nnU-Net (and its worker processes)."""
    for var, path in zip(PATH_VARS, (raw, preprocessed, results), strict=True):
        path = Path(path).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)


def export_paths(cfg: DictConfig) -> None:
    """nnU-Net's three folders from ``paths.raw/preprocessed/results``, created and exported."""
    export_folders(Path(cfg.paths.raw), Path(cfg.paths.preprocessed), Path(cfg.paths.results))


TRAINER_NAME = "nnUNetTrainer"  # checkpoints name this class; nnU-Net finds it without walking the variants
PRE_STAMP = "mlops_preprocess.json"  # `mlops prepare` writes it when a configuration is fully preprocessed


@dataclass
class DatasetIdentity:
    id: int
    name: str

    @property
    def folder(self) -> str:
        return f"Dataset{self.id:03d}_{self.name}"


def dataset_identity(cfg: DictConfig, source: Path | None = None) -> DatasetIdentity:
    """nnU-Net id and name: from the config when set, else from the Decathlon name ``TaskNN_Name`` of the source."""
    source = Path(cfg.dataset.source) if source is None else source
    m = TASK_RE.match(task_folder_name(source))
    if m is None and source.is_dir() and not (source / "dataset.json").exists():
        subs = [p for p in source.iterdir() if p.is_dir() and TASK_RE.match(p.name)]
        m = TASK_RE.match(subs[0].name) if len(subs) == 1 else None
    ds_id = cfg.dataset.id if cfg.dataset.id is not None else (int(m.group(1)) if m else None)
    name = cfg.dataset.name if cfg.dataset.name is not None else (m.group(2) if m else None)
    if ds_id is None or name is None:
        raise ConfigError(
            f"{source}: cannot derive the nnU-Net dataset id/name from this name (expected TaskNN_Name); "
            "set dataset.id=NNN dataset.name=Name"
        )
    if not 1 <= int(ds_id) <= 999:
        raise ConfigError(f"dataset.id must be between 1 and 999, got {ds_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(name)):
        raise ConfigError(f"dataset.name {name!r} must be letters, digits, '-' or '_'")
    return DatasetIdentity(int(ds_id), str(name))


def prepared_dataset(cfg: DictConfig) -> tuple[DatasetIdentity, Path]:
    """The preprocessed dataset the config names (by id, as nnU-Net resolves it), or a clear error."""
    identity = dataset_identity(cfg)
    pre_root = Path(os.environ["nnUNet_preprocessed"])
    matches = sorted(p for p in pre_root.glob(f"Dataset{identity.id:03d}_*") if p.is_dir())
    if len(matches) == 1:
        identity = DatasetIdentity(identity.id, matches[0].name.split("_", 1)[1])
    plans = pre_root / identity.folder / f"{cfg.prepare.plans_identifier}.json"
    if not plans.is_file():
        raise DatasetError(
            f"{pre_root / identity.folder}: no preprocessed dataset (missing {plans.name}); "
            f"run `mlops prepare` first (dataset.id={identity.id}), or choose another with --dataset: {inventory(cfg)}"
        )
    _check_preprocessed(cfg, pre_root / identity.folder, plans, identity)
    return identity, pre_root / identity.folder


def _check_preprocessed(cfg: DictConfig, pre_dir: Path, plans: Path, identity: DatasetIdentity) -> None:
    """The configuration to train must be fully preprocessed (an interrupted `mlops prepare` leaves it half done).

    `mlops prepare` stamps the configurations it finished; a dataset preprocessed by nnU-Net's own tools has no
    stamp, and then every training case must have its preprocessed file.
    """
    configuration = str(cfg.train.configuration)
    hint = f"run `mlops prepare` first (dataset.id={identity.id} prepare.configurations=[{configuration}])"
    try:
        planned = json.loads(plans.read_text()).get("configurations", {})
        stamp_file = pre_dir / PRE_STAMP
        stamp = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
        num_training = int(json.loads((pre_dir / "dataset.json").read_text()).get("numTraining", 0))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{pre_dir}: unreadable preprocessed dataset ({type(exc).__name__}); {hint}") from None
    if configuration not in planned:
        return  # nnU-Net's trainer names the planned configurations in its own error
    if stamp is not None and configuration in stamp.get("configurations", []):
        return
    data_dir = pre_dir / str(planned[configuration].get("data_identifier", ""))
    cases = len(list(data_dir.glob("*.pkl"))) if data_dir.is_dir() else 0
    if stamp is None and num_training and cases >= num_training:
        return
    raise DatasetError(
        f"{pre_dir}: {configuration} is not fully preprocessed ({cases} of {num_training} cases in {data_dir.name}; "
        f"was `mlops prepare` interrupted?); {hint}"
    )


def model_dir_for(cfg: DictConfig, identity: DatasetIdentity) -> Path:
    """Where `mlops train` writes this dataset's model for ``train.configuration``."""
    return model_folder(identity.folder, str(cfg.train.configuration), str(cfg.prepare.plans_identifier))


def model_folder(dataset_folder: str, configuration: str, plans_identifier: str = "nnUNetPlans") -> Path:
    """nnU-Net's results folder for a trained configuration (the ``--model`` folder of predict)."""
    return Path(os.environ["nnUNet_results"]) / dataset_folder / f"{TRAINER_NAME}__{plans_identifier}__{configuration}"


def available_folds(model_dir: Path, checkpoint: str = "checkpoint_final.pth") -> list[int | str]:
    """Folds of a trained model folder that have ``checkpoint``."""
    folds: list[int | str] = []
    for sub in sorted(model_dir.glob("fold_*")):
        if (sub / checkpoint).is_file():
            name = sub.name.removeprefix("fold_")
            folds.append(int(name) if name.isdigit() else name)
    return folds


FOLDS = ("0", "1", "2", "3", "4", "all")


def parse_fold(value: object) -> int | str:
    """One fold: ``0``-``4`` or ``all``."""
    fold = str(value).strip()
    if fold not in FOLDS:
        raise DatasetError(f"unknown fold {fold!r}; nnU-Net's 5-fold cross-validation has folds 0-4, or 'all'")
    return "all" if fold == "all" else int(fold)


def parse_folds(value: object, option: str = "--fold") -> list[int | str]:
    """``0``, ``all``, ``0,1,2`` or a range ``0-4`` -> fold ids in the order given (train, predict, export, find-best
    all read folds here); a fold listed twice is an error naming ``option``."""
    folds: list[int | str] = []
    for item in (t.strip() for t in str(value).split(",")):
        m = re.fullmatch(r"(\d)-(\d)", item)
        for one in [str(i) for i in range(int(m.group(1)), int(m.group(2)) + 1)] if m else [item]:
            fold = parse_fold(one)
            if fold in folds:
                raise DatasetError(f"{option} {value!r}: fold {fold} is listed twice")
            folds.append(fold)
    return folds


def config_folds(cfg: DictConfig) -> list[int | str] | None:
    """``predict.folds`` as fold ids; None: every fold the model has."""
    return None if cfg.predict.get("folds") is None else [parse_fold(f) for f in cfg.predict.folds]


def task_images(source: Path, require_test: bool = True) -> tuple[list[Path], list[Path]]:
    """(training images, test images) of a Decathlon task folder or a prepared nnU-Net raw dataset folder."""
    meta_path = source / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{source}: no dataset.json (expected a Decathlon task or an nnU-Net raw dataset folder)")
    meta = json.loads(meta_path.read_text())
    if "channel_names" in meta:  # nnU-Net raw dataset: channel 0 files

        def listing(folder: str) -> list[Path]:
            return sorted(p for p in (source / folder).glob("*_0000.nii*") if not p.name.startswith("."))

        train, test = listing("imagesTr"), listing("imagesTs") if (source / "imagesTs").is_dir() else []
    else:
        task = read_task(source)
        train, test = [c.image for c in task.training], [c.image for c in task.test]
    if not train:
        raise DatasetError(f"{source}: no training images")
    if not test and require_test:
        raise DatasetError(f"{source}: no test images (imagesTs) to compare with the training images")
    return train, test


def source_folder(cfg: DictConfig) -> Path:
    """The folder whose images describe the dataset (drift, the reference profile): ``drift.source``, else this
    dataset's prepared raw folder, else ``dataset.source`` when it is a folder."""
    if cfg.drift.get("source"):
        return Path(cfg.drift.source)
    raw = Path(os.environ.get("nnUNet_raw") or cfg.paths.raw) / dataset_identity(cfg).folder
    if (raw / "dataset.json").is_file():
        return raw
    if Path(cfg.dataset.source).is_dir():
        return Path(cfg.dataset.source)
    raise DatasetError(f"{raw}: no prepared dataset, and {cfg.dataset.source} is not a folder; pass SOURCE")


def validation_cases(model_dir: Path, splits: Path | None, fold: int | str, images: list[Path]) -> list[Path]:
    """The fold's validation images: per nnU-Net's ``splits_final.json``, else the cases its validation folder holds."""
    val: set[str] = set()
    if fold != "all" and splits is not None and splits.is_file():
        val = set(json.loads(splits.read_text())[int(fold)]["val"])
    if not val:
        val = {case_id(p) for p in (Path(model_dir) / f"fold_{fold}" / "validation").glob("*.nii*")}
    return [p for p in images if case_id(p) in val]
