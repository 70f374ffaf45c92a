"""`mlops predict`: segment NIfTI files or folders with a trained nnU-Net model kept in memory.

Outputs carry the input's exact geometry (shape, affine, qform/sform and codes, spacing) and are written atomically.
In a folder, a bad file is reported and skipped; the others are still segmented, and the run fails at the end.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import torch
from loguru import logger
from omegaconf import DictConfig

from mlops.errors import ConfigError, MlopsError, PipelineError
from mlops.inference import Segmenter
from mlops.inference.segmenter import Prepared
from mlops.monitoring.signals import observe, volume_signals
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
    labels: dict[int, str] = field(default_factory=dict)  # label id -> name, background included
    model: str = ""  # the model folder's name
    folds: list[str] = field(default_factory=list)
    signals: dict[str, float | None] = field(default_factory=dict)  # mlops.monitoring.signals: output signals


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


def load_segmenter(cfg: DictConfig, folder: Path) -> Segmenter:
    if not (folder / "plans.json").is_file():
        raise PipelineError(
            f"no trained model in {folder}; train one with `mlops train --fold 0` "
            "(or point to an nnU-Net results folder with --model)"
        )
    folds = None if cfg.predict.folds is None else [f if f == "all" else int(f) for f in cfg.predict.folds]
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
    )
    logger.info(
        f"Loaded {folder.name} folds {seg.folds} on {seg.device} ({seg.backend}, {seg.precision}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return seg


def parse_folds(text: str) -> list[int | str]:
    """``0,1,2`` or ``all`` -> fold ids, with a clear error for anything else."""
    folds: list[int | str] = []
    for item in (t.strip() for t in text.split(",")):
        if item == "all":
            folds.append(item)
        elif item.isdigit():
            folds.append(int(item))
        else:
            raise ConfigError(f"--folds {text!r}: expected comma-separated fold numbers (0,1,2) or 'all'")
    return folds


def output_name(path: Path) -> str:
    """nnU-Net's convention: ``case_0000.nii.gz`` (channel 0) is segmented as ``case.nii.gz``."""
    name = CHANNEL_SUFFIX.sub(r"\1", path.name)
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    return stem + ".nii.gz"


@dataclass
class LoadedCase:
    """A case decoded, checked and preprocessed, waiting for the network."""

    src: Path
    dst: Path
    image: nib.Nifti1Image
    prepared: Prepared
    started: float


def load_case(
    segmenter: Segmenter, src: Path, dst: Path, max_voxels: int | None, budget: Budget | None = None
) -> LoadedCase:
    """Decode, check (header first, then data) and preprocess one file: the work that overlaps the network's."""
    t0 = time.perf_counter()
    img = load_nifti(src, max_voxels, budget)
    data = check_volume(img, str(src), segmenter.num_channels, budget)
    prepared = segmenter.prepare(data, tuple(float(z) for z in img.header.get_zooms()[:3]))
    return LoadedCase(src, dst, img, prepared, t0)


def write_case(
    segmenter: Segmenter, case: LoadedCase, logits: torch.Tensor, signals: dict | None = None
) -> CasePrediction:
    """nnU-Net's export of the logits to the input's grid, saved atomically with the input's geometry."""
    seg = segmenter.finish(case.prepared, logits)
    out = segmentation_like(seg, case.image)
    case.dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = case.dst.with_name(f".{case.dst.name}.part.nii.gz")
    try:
        nib.save(out, tmp)
        tmp.replace(case.dst)
    finally:
        tmp.unlink(missing_ok=True)
    volumes = label_volumes(seg, case.image, segmenter.labels)
    return CasePrediction(
        case.src, case.dst, tuple(seg.shape), volumes, time.perf_counter() - case.started, dict(segmenter.labels),
        segmenter.model_dir.name, [str(f) for f in segmenter.folds], {**(signals or {}), **volume_signals(volumes)},
    )  # fmt: skip


def segment_file(
    segmenter: Segmenter,
    src: Path,
    dst: Path,
    max_voxels: int | None,
    tta: bool | None,
    budget: Budget | None = None,
    max_member_mib: float = 1024,
) -> CasePrediction:
    """One file, start to end, in this thread."""
    case = load_case(segmenter, src, dst, max_voxels, budget)
    return write_case(segmenter, case, *observe(segmenter, case.prepared, tta, None, max_member_mib))


def predict(
    cfg: DictConfig, source: Path, output: Path | None = None, model: Path | None = None, tta: bool | None = None
) -> list[CasePrediction]:
    """Segment a file (output: ``-o`` file, default ``<case>_seg.nii.gz`` beside it) or a folder (``-o`` folder).

    In a folder the work overlaps: while the network runs on one case, the next is decoded and preprocessed in one
    thread and the previous one is resampled back and written in another (outputs stay in input order).
    """
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
    member_mib = float(cfg.monitor.max_member_mib)
    if len(targets) == 1:
        return [segment_file(segmenter, *targets[0], max_voxels, tta, budget, member_mib)]

    results: list[CasePrediction] = []
    failures: list[str] = []

    def failed(src: Path, exc: BaseException) -> None:
        """One odd file must not stop a folder: report it and go on (the traceback only with --verbose)."""
        if isinstance(exc, InputError):
            message = str(exc)
        else:
            message = f"{src}: segmentation failed ({type(exc).__name__})"
            logger.opt(exception=exc).debug(message)
        logger.error(message)
        failures.append(message)

    def collect(pending: tuple[Path, Future[CasePrediction]] | None) -> None:
        if pending is None:
            return
        src, future = pending
        try:
            results.append(future.result())
            logger.debug(f"{src.name} -> {results[-1].output} in {results[-1].seconds:.2f} s")
        except Exception as exc:
            failed(src, exc)

    with ThreadPoolExecutor(1, "mlops-load") as loader, ThreadPoolExecutor(1, "mlops-write") as writer:
        loads = {0: loader.submit(load_case, segmenter, *targets[0], max_voxels, budget)}
        writing: tuple[Path, Future[CasePrediction]] | None = None
        for i, (src, _) in enumerate(track(targets, "Segmenting", total=len(targets))):
            if i + 1 < len(targets):  # decode + preprocess the next case while this one runs
                loads[i + 1] = loader.submit(load_case, segmenter, *targets[i + 1], max_voxels, budget)
            try:
                case = loads.pop(i).result()
                logits, signals = observe(segmenter, case.prepared, tta, None, member_mib)
            except Exception as exc:
                failed(src, exc)
                continue
            collect(writing)
            writing = (src, writer.submit(write_case, segmenter, case, logits, signals))
        collect(writing)
    if failures:
        raise InputError(
            f"{len(failures)} of {len(targets)} file(s) could not be segmented:\n  - " + "\n  - ".join(failures)
        )
    return results
