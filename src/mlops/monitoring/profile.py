"""The reference profile: what the model saw in training and what it answered on its validation cases.

Written into the model folder (``monitoring_profile.json``) when training ends and by `mlops monitor profile`, so a
deployed service compares live traffic against it without the training data. The model key is a hash of the
checkpoints the profile was made with; request records are stored under it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from mlops.errors import MlopsError, PipelineError
from mlops.files import write_atomic
from mlops.inference import Segmenter
from mlops.monitoring.signals import SIGNAL_COLUMNS, observe, volume_signals
from mlops.monitoring.stats import input_statistics
from mlops.progress import track
from mlops.volumes import case_id, read_case_arrays
from mlops.workspace import (
    config_folds,
    export_paths,
    prepared_dataset,
    source_folder,
    task_images,
    validation_cases,
)

PROFILE_NAME = "monitoring_profile.json"
VERSION = 1


def model_key(checkpoints: list[Path]) -> str:
    """First 16 hex digits of the SHA-256 of the checkpoint files (in fold order): the model's identity."""
    digest = hashlib.sha256()
    for path in checkpoints:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def input_row(segmenter: Any, data: np.ndarray, spacing: tuple[float, ...], affine: np.ndarray) -> tuple[dict, Any]:
    """Raw, normalised and geometry statistics of one case, and the case as prepared for the network."""
    prepared = segmenter.prepare(data, spacing)
    return input_statistics(data, spacing, affine, prepared.data.numpy()), prepared


def build_profile(
    segmenter: Any, train_images: list[Path], val_images: list[Path], tta: bool | None = None
) -> dict[str, Any]:
    """Input statistics of ``train_images`` and output signals (with inputs) of ``val_images``, predicted here."""
    channels = int(segmenter.num_channels)
    reference = []
    for path in track(train_images, f"Profiling {len(train_images)} training cases", total=len(train_images)):
        data, spacing, affine = read_case_arrays(path, channels)
        row, _ = input_row(segmenter, data, spacing, affine)
        reference.append({"case": case_id(path), **row})
    validation = []
    for path in track(val_images, f"Predicting {len(val_images)} validation cases", total=len(val_images)):
        data, spacing, affine = read_case_arrays(path, channels)
        row, prepared = input_row(segmenter, data, spacing, affine)
        logits, signals = observe(segmenter, prepared, tta)
        seg = segmenter.finish(prepared, logits)
        unit = float(np.prod(spacing))
        volumes = {n: float(np.count_nonzero(seg == v)) * unit for v, n in segmenter.labels.items() if v != 0}
        validation.append({"case": case_id(path), **row, **signals,
                           **volume_signals(volumes)})  # fmt: skip
    return {
        "version": VERSION,
        "model": segmenter.model_dir.name,
        "model_key": model_key(segmenter.model.checkpoint_files()),
        "folds": [str(f) for f in segmenter.folds],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "labels": {str(k): v for k, v in sorted(segmenter.labels.items())},
        "reference": reference,
        "validation": validation,
    }


def profile_path(model_dir: Path, folds: list[int | str] | list[str]) -> Path:
    """One fold: ``fold_F/monitoring_profile.json`` (each trained fold writes its own, beside its checkpoint); an
    ensemble of folds: the model folder's ``monitoring_profile.json`` (from `mlops monitor profile`)."""
    names = [str(f) for f in folds]
    return Path(model_dir) / (f"fold_{names[0]}" if len(names) == 1 else "") / PROFILE_NAME


def write_profile(model_dir: Path, profile: dict[str, Any]) -> Path:
    path = profile_path(model_dir, profile["folds"])
    write_atomic(path, json.dumps(profile, indent=1, allow_nan=False))
    logger.info(
        f"Reference profile: {len(profile['reference'])} training, {len(profile['validation'])} validation cases "
        f"-> {path}"
    )
    return path


def read_profile(model_dir: Path, folds: list[int | str] | list[str]) -> dict[str, Any]:
    path = profile_path(model_dir, folds)
    if not path.is_file():
        raise PipelineError(f"{path}: no reference profile for fold(s) {', '.join(str(f) for f in folds)}; write one "
                            "with `mlops monitor profile`")  # fmt: skip
    try:
        profile = json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path}: unreadable reference profile ({type(exc).__name__})") from exc
    if not isinstance(profile, dict) or not isinstance(profile.get("reference"), list):
        raise PipelineError(f"{path}: not a reference profile (no list of reference cases); rewrite it with "
                            "`mlops monitor profile`")  # fmt: skip
    return profile


def profile_model(cfg: Any, model_dir: Path, source: Path | None = None, folds: list[int | str] | None = None) -> Path:
    """Write ``model_dir``'s reference profile from the training images of ``source`` (default: the dataset's
    prepared raw folder) and predictions of (up to ``monitor.profile_val_cases``) validation cases of its fold."""
    splits, src = None, Path(source) if source is not None else None
    try:  # the prepared dataset the config names: its nnU-Net splits, and its raw folder as the default source
        export_paths(cfg)
        identity, pre_dir = prepared_dataset(cfg)
        splits = pre_dir / "splits_final.json"
        raw = Path(os.environ["nnUNet_raw"]) / identity.folder
        if src is None and (raw / "dataset.json").is_file():
            src = raw
    except MlopsError:  # no preprocessed dataset here (a downloaded model): the fold's validation folder decides
        pass
    train, _ = task_images(src if src is not None else source_folder(cfg), require_test=False)
    p = cfg.predict
    chosen = folds if folds is not None else config_folds(cfg)
    segmenter = Segmenter(Path(model_dir), folds=chosen, checkpoint=str(p.checkpoint), device=str(p.device),
                          tta=bool(p.tta), tile_step_size=float(p.tile_step_size), backend="torch")  # fmt: skip
    val = validation_cases(Path(model_dir), splits, segmenter.folds[0], train)[: int(cfg.monitor.profile_val_cases)]
    return write_profile(Path(model_dir), build_profile(segmenter, train, val))


def profile_reference(profile: dict) -> list[dict]:
    """The profile's rows for a comparison: training inputs, plus the validation cases' output signals only (their
    inputs are already among the training cases)."""
    signals = [{k: v for k, v in row.items() if k in SIGNAL_COLUMNS or k.startswith("volume_ml_")}
               for row in profile.get("validation", [])]  # fmt: skip
    return [*profile["reference"], *signals]
