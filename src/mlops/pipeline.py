"""One case through a trained model: decode, check, prepare, run the network with its output signals, finish, volumes.

`mlops predict` (files and folders), `POST /predict` (uploads) and `mlops batch` (Ray actors) segment with these
functions, so one input gives the same labels, header, volumes and signals whichever way it came in; each edge only
reads its input and writes its output its own way. :func:`load_segmenter` is the model as the config describes it
(folds, `mlops find-best`'s choice and post-processing, backend, precision).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from pydicom.dataset import Dataset

from mlops import nnunet
from mlops.datasets import inventory
from mlops.dicom.seg import segmentation
from mlops.dicom.series import Limits, Series, is_zip_name, read_zip
from mlops.errors import Cancelled, PipelineError
from mlops.evaluate import model_validation_warnings
from mlops.inference import Segmenter
from mlops.inference.segmenter import Prepared
from mlops.models import best_choice
from mlops.monitoring.signals import observe, volume_signals
from mlops.monitoring.stats import input_statistics
from mlops.volumes import (
    Budget,
    InputError,
    ModelGrid,
    check_volume,
    decode_nifti,
    label_volumes,
    load_nifti,
    segmentation_like,
)
from mlops.workspace import config_folds


def load_segmenter(cfg: DictConfig, folder: Path) -> Segmenter:
    """The model in ``folder`` with the config's folds, device, backend and precision, and `mlops find-best`'s folds
    and post-processing when they were chosen for this folder; its validation warnings are logged."""
    if not (folder / "plans.json").is_file():
        raise PipelineError(
            f"no trained model in {folder}; train one with `mlops train --fold 0` "
            f"(or point to an nnU-Net results folder with --model); {inventory(cfg)}"
        )
    folds = config_folds(cfg)
    choice = best_choice(cfg)
    if choice is not None and Path(choice.model_dirs[0]).resolve() != folder.resolve():
        choice = None
    if choice is not None:
        folds = list(choice.folds)
    t0 = time.perf_counter()
    seg = Segmenter(
        folder,
        folds=folds,
        checkpoint=str(cfg.predict.checkpoint),
        device=str(cfg.predict.device),
        tta=bool(cfg.predict.tta),
        tile_step_size=float(cfg.predict.tile_step_size),
        backend=str(cfg.predict.get("backend", "auto")),
        precision=str(cfg.predict.get("precision", "auto")),
        max_batch=cfg.predict.get("max_batch"),
        threads=cfg.predict.get("threads"),
    )
    logger.info(
        f"Loaded {folder.name} folds {seg.folds} on {seg.device} ({seg.backend}, {seg.precision}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    if choice is not None:
        seg.postprocessing, steps = nnunet.load_postprocessing(Path(choice.postprocessing))
        logger.info(
            f"find-best's choice: folds {choice.folds}, post-processing {steps or 'none'} "
            f"(cross-validation Dice {choice.dice_before_pp:.4f} -> {choice.dice_after_pp:.4f})"
        )
    for warning in model_validation_warnings(folder, list(seg.folds)):
        logger.warning(warning)
    return seg


def budget(segmenter: Segmenter, max_request_mib: float | None, max_passes: int | None = None) -> Budget | None:
    """The working-memory (and network-pass) budget of one case on this model's grid; None without a limit."""
    if not max_request_mib:
        return None
    return Budget(ModelGrid.of(segmenter), int(float(max_request_mib) * 2**20), max_passes)


@dataclass
class Case:
    """A case decoded, checked and preprocessed, waiting for the network."""

    name: str  # how messages name it: a path, or a request's upload name
    image: nib.Nifti1Image  # the input's header and geometry, which the segmentation copies
    data: np.ndarray  # (i, j, k[, c]) float32
    spacing: tuple[float, ...]
    prepared: Prepared
    started: float


def open_case(
    segmenter: Segmenter,
    image: nib.Nifti1Image,
    name: str,
    budget: Budget | None = None,
    data: np.ndarray | None = None,
    cancel: Callable[[], bool] | None = None,
    started: float | None = None,
) -> Case:
    """Check a loaded image (``data``: its channels already stacked) and preprocess it for the network."""
    t0 = time.perf_counter() if started is None else started
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    if data is None:
        data = check_volume(image, name, segmenter.num_channels, budget)
    elif budget is not None:
        budget.check(name, data.shape, spacing, data.itemsize)
    if cancel is not None and cancel():
        raise Cancelled(f"{name}: cancelled before segmentation")
    return Case(name, image, data, spacing, segmenter.prepare(data, spacing), t0)


def decode_case(
    segmenter: Segmenter,
    raw: bytes,
    name: str,
    max_voxels: int | None,
    budget: Budget | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Case:
    """An upload's or a cohort file's bytes: decoded (header first, within the limits), checked, preprocessed."""
    t0 = time.perf_counter()
    return open_case(segmenter, decode_nifti(raw, name, max_voxels, budget), name, budget, cancel=cancel, started=t0)


def decode_upload(
    segmenter: Segmenter,
    raw: bytes,
    name: str,
    max_voxels: int | None,
    budget: Budget | None = None,
    cancel: Callable[[], bool] | None = None,
    limits: Limits | None = None,
    series_uid: str | None = None,
) -> tuple[Case, Series | None]:
    """An upload's or a cohort file's bytes: a NIfTI (:func:`decode_case`), or a zipped DICOM series, whose
    :class:`Series` comes back too (its SEG references it)."""
    if not is_zip_name(name):
        return decode_case(segmenter, raw, name, max_voxels, budget, cancel), None
    t0 = time.perf_counter()
    limits = limits or Limits()
    series = read_zip(raw, name, series_uid, max_voxels, budget, limits.max_files, limits.max_unzipped_bytes)
    return open_case(segmenter, series.image, name, budget, cancel=cancel, started=t0), series


def load_channels(files: list[Path], max_voxels: int | None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Channel files of one case (``case_0000``, ``case_0001``, ...) stacked channels-last, after checking they share
    one grid; the first file's image carries the geometry."""
    first = load_nifti(files[0], max_voxels)
    arrays = [check_volume(first, str(files[0]), 1)]
    for f in files[1:]:
        img = load_nifti(f, max_voxels)
        if img.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine, atol=1e-4):
            raise InputError(
                f"{f}: shape {img.shape} / affine differ from {files[0].name} {first.shape}: channels of one case "
                "must share one grid",
                400,
            )
        arrays.append(check_volume(img, str(f), 1))
    return first, np.stack([a.astype(np.float32, copy=False) for a in arrays], axis=-1)


def read_case(segmenter: Segmenter, files: list[Path], max_voxels: int | None, budget: Budget | None = None) -> Case:
    """A case from its file, or from its channel files (:func:`load_channels`)."""
    t0 = time.perf_counter()
    if len(files) == 1:
        return open_case(segmenter, load_nifti(files[0], max_voxels, budget), str(files[0]), budget, started=t0)
    first, data = load_channels(files, max_voxels)
    return open_case(segmenter, first, str(files[0]), budget, data=data, started=t0)


def run_network(
    segmenter: Segmenter,
    case: Case,
    tta: bool | None = None,
    cancel: Callable[[], bool] | None = None,
    max_member_mib: float = 1024,
) -> tuple[torch.Tensor, dict[str, float | None]]:
    """The network's logits of a case and their output signals (:mod:`mlops.monitoring.signals`)."""
    return observe(segmenter, case.prepared, tta, cancel, max_member_mib)


@dataclass
class Segmentation:
    """A finished case: labels on the input's grid, as an image with the input's header, and what they measure."""

    labels: np.ndarray
    image: nib.Nifti1Image
    volumes: dict[str, float]  # mm³ per foreground label
    signals: dict[str, float | None]  # output signals, label volumes included
    seconds: float
    probabilities: np.ndarray | None = None  # nnU-Net's layout (classes, z, y, x), when asked for


def finish_case(
    segmenter: Segmenter,
    case: Case,
    logits: torch.Tensor,
    signals: dict[str, float | None],
    probabilities: bool = False,
) -> Segmentation:
    """nnU-Net's export of the logits to the input's grid (with its probabilities when asked), volumes, signals."""
    if probabilities:
        labels, probs = segmenter.finish_with_probabilities(case.prepared, logits)
    else:
        labels, probs = segmenter.finish(case.prepared, logits), None
    volumes = label_volumes(labels, case.image, segmenter.labels)
    return Segmentation(
        labels,
        segmentation_like(labels, case.image),
        volumes,
        {**signals, **volume_signals(volumes)},
        time.perf_counter() - case.started,
        probs,
    )


def segment_case(
    segmenter: Segmenter,
    case: Case,
    tta: bool | None = None,
    cancel: Callable[[], bool] | None = None,
    max_member_mib: float = 1024,
) -> Segmentation:
    """Network and finish in one go (the service and batch; `mlops predict` overlaps them across cases)."""
    logits, signals = run_network(segmenter, case, tta, cancel, max_member_mib)
    return finish_case(segmenter, case, logits, signals)


def seg_for(segmenter: Segmenter, series: Series, labels: np.ndarray, cfg: DictConfig) -> Dataset:
    """A DICOM SEG of a series' labels, with the model's label names and the dataset config's coded concepts."""
    concepts = OmegaConf.to_container(cfg.dataset.get("segments") or {}, resolve=True)
    return segmentation(labels, series, segmenter.labels, segmenter.model_dir.name, concepts,  # type: ignore[arg-type]
                        int(cfg.dicom.series_number))  # fmt: skip


def case_statistics(case: Case) -> dict:
    """The input statistics monitoring records for a case (raw, geometry, what the network sees)."""
    return input_statistics(case.data, case.spacing, case.image.affine, case.prepared.data.numpy())
