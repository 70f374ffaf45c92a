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

import nibabel as nib
import numpy as np
from loguru import logger

from mlops.errors import DatasetError, MlopsError, PipelineError
from mlops.monitoring.signals import observe, volume_signals
from mlops.monitoring.stats import normalised_stats, orientation, raw_stats
from mlops.progress import track

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


def channel_files(first: Path, channels: int) -> list[Path]:
    """``case_0000.nii.gz`` -> the files of every channel of an nnU-Net raw case."""
    name = first.name
    return (
        [first.with_name(name.replace("_0000.nii", f"_{c:04d}.nii")) for c in range(channels)]
        if channels > 1
        else [first]
    )


def load_case(path: Path, channels: int) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """(data (i, j, k[, c]), spacing, affine) of a case; errors name the file."""
    try:
        imgs = [nib.load(p) for p in channel_files(path, channels)]
        arrays = [np.asanyarray(i.dataobj).astype(np.float32) for i in imgs]
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable volume ({type(exc).__name__}: {exc})") from exc
    data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    return data, tuple(float(z) for z in imgs[0].header.get_zooms()[:3]), imgs[0].affine


def input_row(segmenter: Any, data: np.ndarray, spacing: tuple[float, ...], affine: np.ndarray) -> tuple[dict, Any]:
    """Raw, normalised and geometry statistics of one case, and the case as prepared for the network."""
    prepared = segmenter.prepare(data, spacing)
    row = {**raw_stats(data, spacing), "orientation": orientation(affine)}
    row.update(normalised_stats(prepared.data.numpy()))
    return row, prepared


def build_profile(
    segmenter: Any, train_images: list[Path], val_images: list[Path], tta: bool | None = None
) -> dict[str, Any]:
    """Input statistics of ``train_images`` and output signals (with inputs) of ``val_images``, predicted here."""
    channels = int(segmenter.num_channels)
    reference = []
    for path in track(train_images, f"Profiling {len(train_images)} training cases", total=len(train_images)):
        data, spacing, affine = load_case(path, channels)
        row, _ = input_row(segmenter, data, spacing, affine)
        reference.append({"case": case_id(path), **row})
    validation = []
    for path in track(val_images, f"Predicting {len(val_images)} validation cases", total=len(val_images)):
        data, spacing, affine = load_case(path, channels)
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
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(profile, indent=1, allow_nan=False))
    tmp.replace(path)
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
        assert isinstance(profile.get("reference"), list)
    except (ValueError, AssertionError) as exc:
        raise PipelineError(f"{path}: unreadable reference profile ({type(exc).__name__})") from exc
    return profile


def case_id(path: Path) -> str:
    """``hippocampus_001.nii.gz`` and nnU-Net's ``hippocampus_001_0000.nii.gz`` -> ``hippocampus_001``."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.removesuffix("_0000")


def validation_cases(model_dir: Path, splits: Path | None, fold: int | str, images: list[Path]) -> list[Path]:
    """The fold's validation images: per nnU-Net's ``splits_final.json``, else the cases its validation folder holds."""
    val: set[str] = set()
    if fold != "all" and splits is not None and splits.is_file():
        val = set(json.loads(splits.read_text())[int(fold)]["val"])
    if not val:
        val = {case_id(p) for p in (Path(model_dir) / f"fold_{fold}" / "validation").glob("*.nii*")}
    return [p for p in images if case_id(p) in val]


def profile_model(cfg: Any, model_dir: Path, source: Path | None = None, folds: list[int | str] | None = None) -> Path:
    """Write ``model_dir``'s reference profile from the training images of ``source`` (default: the dataset's
    prepared raw folder) and predictions of (up to ``monitor.profile_val_cases``) validation cases of its fold."""
    from mlops.drift import drift_source, task_images
    from mlops.inference import Segmenter

    splits, src = None, Path(source) if source is not None else None
    try:  # the prepared dataset the config names: its nnU-Net splits, and its raw folder as the default source
        from mlops.train import export_paths, prepared_dataset

        export_paths(cfg)
        identity, pre_dir = prepared_dataset(cfg)
        splits = pre_dir / "splits_final.json"
        raw = Path(os.environ["nnUNet_raw"]) / identity.folder
        if src is None and (raw / "dataset.json").is_file():
            src = raw
    except MlopsError:  # no preprocessed dataset here (a downloaded model): the fold's validation folder decides
        pass
    train, _ = task_images(src if src is not None else drift_source(cfg), require_test=False)
    p = cfg.predict
    chosen = folds
    if chosen is None and p.folds is not None:
        chosen = [f if f == "all" else int(f) for f in p.folds]
    segmenter = Segmenter(Path(model_dir), folds=chosen, checkpoint=str(p.checkpoint), device=str(p.device),
                          tta=bool(p.tta), tile_step_size=float(p.tile_step_size), backend="torch")  # fmt: skip
    val = validation_cases(Path(model_dir), splits, segmenter.folds[0], train)[: int(cfg.monitor.profile_val_cases)]
    return write_profile(Path(model_dir), build_profile(segmenter, train, val))
