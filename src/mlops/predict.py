"""`mlops predict`: segment NIfTI files or folders with a trained nnU-Net model kept in memory.

Outputs carry the input's exact geometry (shape, affine, qform/sform and codes, spacing) and are written atomically.
In a folder, a bad file is reported and skipped; the others are still segmented, and the run fails at the end.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
from loguru import logger
from omegaconf import DictConfig

from mlops import nnunet
from mlops.errors import MlopsError, PipelineError
from mlops.progress import track
from mlops.volumes import (
    Budget,
    InputError,
    ModelGrid,
    check_volume,
    is_nifti_name,
    label_volumes,
    load_nifti,
    segmentation_like,
)

CHANNEL_SUFFIX = re.compile(r"_0000(\.nii(\.gz)?)$", re.IGNORECASE)


@dataclass
class CasePrediction:
    input: Path
    output: Path
    shape: tuple[int, ...]
    volumes_mm3: dict[str, float]
    seconds: float


def model_dir(cfg: DictConfig, override: Path | None = None) -> Path:
    """The model folder: ``--model``, else ``predict.model_dir``, else where `mlops train` puts this dataset's model."""
    if override is not None:
        return Path(override)
    if cfg.predict.get("model_dir"):
        return Path(cfg.predict.model_dir)
    from mlops.train import export_paths, model_dir_for, prepared_dataset

    export_paths(cfg)
    try:
        identity, _ = prepared_dataset(cfg)
    except MlopsError:
        from mlops.prepare import dataset_identity

        identity = dataset_identity(cfg)
    return model_dir_for(cfg, identity)


def load_segmenter(cfg: DictConfig, folder: Path) -> nnunet.Segmenter:
    if not (folder / "plans.json").is_file():
        raise PipelineError(
            f"no trained model in {folder}; train one with `mlops train --fold 0` "
            "(or point to an nnU-Net results folder with --model)"
        )
    folds = None if cfg.predict.folds is None else [f if f == "all" else int(f) for f in cfg.predict.folds]
    t0 = time.perf_counter()
    seg = nnunet.Segmenter(
        folder,
        folds=folds,
        checkpoint=str(cfg.predict.checkpoint),
        device=str(cfg.predict.device),
        tta=bool(cfg.predict.tta),
        tile_step_size=float(cfg.predict.tile_step_size),
    )
    logger.info(f"Loaded {folder.name} folds {seg.folds} on {seg.device} in {time.perf_counter() - t0:.1f} s")
    return seg


def output_name(path: Path) -> str:
    """nnU-Net's convention: ``case_0000.nii.gz`` (channel 0) is segmented as ``case.nii.gz``."""
    name = CHANNEL_SUFFIX.sub(r"\1", path.name)
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    return stem + ".nii.gz"


def segment_file(
    segmenter: nnunet.Segmenter,
    src: Path,
    dst: Path,
    max_voxels: int | None,
    tta: bool | None,
    budget: Budget | None = None,
) -> CasePrediction:
    t0 = time.perf_counter()
    img = load_nifti(src, max_voxels, budget)
    data = check_volume(img, str(src), segmenter.num_channels, budget)
    seg = segmenter.segment(data, tuple(float(z) for z in img.header.get_zooms()[:3]), tta=tta)
    out = segmentation_like(seg, img)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part.nii.gz")
    nib.save(out, tmp)
    tmp.replace(dst)
    return CasePrediction(
        src, dst, tuple(seg.shape), label_volumes(seg, img, segmenter.labels), time.perf_counter() - t0
    )


def predict(
    cfg: DictConfig, source: Path, output: Path | None = None, model: Path | None = None, tta: bool | None = None
) -> list[CasePrediction]:
    """Segment a file (output: ``-o`` file, default ``<case>_seg.nii.gz`` beside it) or a folder (``-o`` folder)."""
    if not source.exists():
        raise InputError(f"{source}: no such file or folder", 400)
    if source.is_dir():
        inputs = sorted(p for p in source.iterdir() if is_nifti_name(p.name) and not p.name.startswith("."))
        if not inputs:
            raise InputError(f"{source}: no .nii or .nii.gz files", 400)
        out_dir = output or source.with_name(source.name + "_seg")
        if out_dir.resolve() == source.resolve():
            raise InputError(f"{out_dir}: the output folder must differ from the input folder", 400)
        targets = [(p, out_dir / output_name(p)) for p in inputs]
    else:
        default = source.with_name(output_name(source).replace(".nii.gz", "_seg.nii.gz"))
        targets = [(source, output or default)]
    segmenter = load_segmenter(cfg, model_dir(cfg, model))
    max_voxels = int(cfg.predict.max_voxels) if cfg.predict.get("max_voxels") else None
    budget = None
    if cfg.predict.get("max_request_mib"):
        budget = Budget(ModelGrid.of(segmenter), int(float(cfg.predict.max_request_mib) * 2**20))
    results, failures = [], []
    for src, dst in track(targets, "Segmenting", total=len(targets)):
        try:
            results.append(segment_file(segmenter, src, dst, max_voxels, tta, budget))
            logger.debug(f"{src.name} -> {dst} in {results[-1].seconds:.2f} s")
        except InputError as exc:
            if len(targets) == 1:
                raise
            logger.error(str(exc))
            failures.append(str(exc))
        except Exception as exc:  # one odd file must not stop a folder: report it, go on (details with --verbose)
            if len(targets) == 1:
                raise
            message = f"{src}: segmentation failed ({type(exc).__name__})"
            logger.opt(exception=exc).debug(message)
            logger.error(message)
            failures.append(message)
    if failures:
        raise InputError(
            f"{len(failures)} of {len(targets)} file(s) could not be segmented:\n  - " + "\n  - ".join(failures)
        )
    return results
