"""`mlops predict`: segment NIfTI files or folders with a trained nnU-Net model kept in memory.

Outputs carry the input's exact geometry (shape, affine, qform/sform and codes, spacing) and are written atomically.
In a folder, a bad file is reported and skipped; the others are still segmented, and the run fails at the end.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from loguru import logger
from omegaconf import DictConfig

from mlops.errors import ConfigError, MlopsError, PipelineError
from mlops.inference import Segmenter
from mlops.inference.segmenter import Prepared
from mlops.monitoring.signals import observe, volume_signals
from mlops.outputs import check_collisions, check_output_file, check_output_folder
from mlops.progress import track
from mlops.volumes import (
    CHANNEL_ANY,
    CHANNEL_SUFFIX,
    Budget,
    InputError,
    ModelGrid,
    check_volume,
    is_nifti_name,
    label_volumes,
    load_nifti,
    output_name,
    segmentation_like,
)

if TYPE_CHECKING:
    from mlops.best import BestChoice


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
    choice = best_choice(cfg)
    if choice is not None:
        if choice.ensemble:
            raise PipelineError(
                f"`mlops find-best` chose an ensemble of {len(choice.model_dirs)} configurations for {choice.dataset}; "
                f"mlops predicts with one configuration: run nnU-Net's commands in {choice.instructions}, or choose "
                "one with --model (or predict.best=false)"
            )
        return Path(choice.model_dirs[0])
    from mlops.train import export_paths, model_dir_for, prepared_dataset

    export_paths(cfg)
    try:
        identity, _ = prepared_dataset(cfg)
    except MlopsError:
        from mlops.prepare import dataset_identity

        identity = dataset_identity(cfg)
    return model_dir_for(cfg, identity)


def best_choice(cfg: DictConfig) -> BestChoice | None:
    """`mlops find-best`'s choice for this dataset, unless a model was chosen by hand or ``predict.best=false``."""
    if cfg.predict.get("model_dir") or not cfg.predict.get("best", True):
        return None
    from mlops.best import read_choice

    return read_choice(cfg)


def load_segmenter(cfg: DictConfig, folder: Path) -> Segmenter:
    if not (folder / "plans.json").is_file():
        from mlops.datasets import inventory

        raise PipelineError(
            f"no trained model in {folder}; train one with `mlops train --fold 0` "
            f"(or point to an nnU-Net results folder with --model); {inventory(cfg)}"
        )
    folds = None if cfg.predict.folds is None else [f if f == "all" else int(f) for f in cfg.predict.folds]
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
        from mlops import nnunet

        seg.postprocessing, steps = nnunet.load_postprocessing(Path(choice.postprocessing))
        logger.info(
            f"find-best's choice: folds {choice.folds}, post-processing {steps or 'none'} "
            f"(cross-validation Dice {choice.dice_before_pp:.4f} -> {choice.dice_after_pp:.4f})"
        )
    from mlops.evaluate import model_validation_warnings

    for warning in model_validation_warnings(folder, list(seg.folds)):
        logger.warning(warning)
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


@dataclass
class LoadedCase:
    """A case decoded, checked and preprocessed, waiting for the network."""

    src: Path
    dst: Path
    image: nib.Nifti1Image
    prepared: Prepared
    started: float


def group_channels(files: list[Path], num_channels: int) -> tuple[list[Path], dict[Path, list[Path]]]:
    """nnU-Net's layout of multi-channel cases: ``case_0000``, ``case_0001``, ... are the channels of ``case``.

    Returns the first file of each case (in order) and each case's channel files; a case with a channel missing
    is an error naming it (a 4D file stays one case)."""
    cases: dict[str, dict[int, Path]] = {}
    singles: list[Path] = []
    for f in files:
        m = CHANNEL_ANY.search(f.name)
        if m is None:
            singles.append(f)
            continue
        cases.setdefault(f.name[: m.start()], {})[int(m.group(1))] = f
    firsts, groups = list(singles), {}
    for case, channels in sorted(cases.items()):
        if list(channels) == [0] and _is_4d(channels[0]):
            firsts.append(channels[0])  # one 4D file named _0000: all channels in one file
            continue
        missing = [f"{case}_{c:04d}" for c in range(num_channels) if c not in channels]
        extra = [channels[c].name for c in sorted(channels) if c >= num_channels]
        if missing or extra:
            raise InputError(
                f"{case}: the model takes {num_channels} channels (_0000.._{num_channels - 1:04d}); "
                + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"),
                400,
            )
        ordered = [channels[c] for c in range(num_channels)]
        firsts.append(ordered[0])
        groups[ordered[0]] = ordered
    return sorted(firsts), groups


def _is_4d(path: Path) -> bool:
    try:
        return len(nib.load(path).shape) == 4  # header only
    except Exception:
        return False  # unreadable: reported with its name when the case is read


def _load_channels(files: list[Path], max_voxels: int | None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Channel files of one case stacked channels-last, after checking they share one grid."""
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


def load_case(
    segmenter: Segmenter,
    src: Path,
    dst: Path,
    max_voxels: int | None,
    budget: Budget | None = None,
    channel_files: list[Path] | None = None,
) -> LoadedCase:
    """Decode, check (header first, then data) and preprocess one file: the work that overlaps the network's."""
    t0 = time.perf_counter()
    if channel_files and len(channel_files) > 1:
        img, data = _load_channels(channel_files, max_voxels)
        if budget is not None:
            budget.check(str(src), data.shape, tuple(float(z) for z in img.header.get_zooms()[:3]), data.itemsize)
    else:
        img = load_nifti(src, max_voxels, budget)
        data = check_volume(img, str(src), segmenter.num_channels, budget)
    prepared = segmenter.prepare(data, tuple(float(z) for z in img.header.get_zooms()[:3]))
    return LoadedCase(src, dst, img, prepared, t0)


def write_case(
    segmenter: Segmenter,
    case: LoadedCase,
    logits: torch.Tensor,
    signals: dict | None = None,
    save_probabilities: bool = False,
) -> CasePrediction:
    """nnU-Net's export of the logits to the input's grid, saved atomically with the input's geometry; with
    ``save_probabilities`` also ``<case>.npz`` (``probabilities``: classes x z x y x) and ``<case>.pkl`` (the
    case's properties), nnU-Net's ``--save_probabilities`` layout."""
    if save_probabilities:
        import pickle

        seg, probs = segmenter.finish_with_probabilities(case.prepared, logits)
        stem = case.dst.parent / case.dst.name.split(".nii")[0]
        case.dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = stem.with_name(f".{stem.name}.part.npz")
        try:
            np.savez_compressed(tmp, probabilities=probs.astype(np.float32))
            tmp.replace(stem.with_suffix(".npz"))
        finally:
            tmp.unlink(missing_ok=True)
        stem.with_suffix(".pkl").write_bytes(pickle.dumps(case.prepared.props))
    else:
        seg = segmenter.finish(case.prepared, logits)
    out = segmentation_like(seg, case.image)
    case.dst.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii" if case.dst.name.lower().endswith(".nii") else ".nii.gz"  # nibabel compresses by the suffix
    tmp = case.dst.with_name(f".{case.dst.name}.part{suffix}")
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


COLLISION_HINT = "\nRename those files, or segment them from separate folders."


def predict(
    cfg: DictConfig,
    source: Path,
    output: Path | None = None,
    model: Path | None = None,
    tta: bool | None = None,
    save_probabilities: bool = False,
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
        check_output_folder(out_dir, source)
        targets = [(p, out_dir / output_name(p)) for p in inputs]
        check_collisions(((str(p), str(d)) for p, d in targets), COLLISION_HINT)
    else:
        default = source.with_name(output_name(source).replace(".nii.gz", "_seg.nii.gz"))
        targets = [(source, output or default)]
        check_output_file(targets[0][1], [source])
    segmenter = load_segmenter(cfg, model_dir(cfg, model))
    max_voxels = int(cfg.predict.max_voxels) if cfg.predict.get("max_voxels") else None
    budget = None
    if cfg.predict.get("max_request_mib"):
        budget = Budget(ModelGrid.of(segmenter), int(float(cfg.predict.max_request_mib) * 2**20))
    groups: dict[Path, list[Path]] = {}
    if segmenter.num_channels > 1:
        if source.is_dir():
            firsts, groups = group_channels([p for p, _ in targets], segmenter.num_channels)
            out_dir = targets[0][1].parent
            targets = [(p, out_dir / output_name(p)) for p in firsts]
            check_collisions(((str(p), str(d)) for p, d in targets), COLLISION_HINT)
        elif CHANNEL_SUFFIX.search(source.name):  # case_0000.nii.gz given: its sibling channels belong to it
            prefix = CHANNEL_SUFFIX.sub("", source.name)
            siblings = [p for p in source.parent.iterdir() if CHANNEL_ANY.search(p.name)
                        and p.name[: CHANNEL_ANY.search(p.name).start()] == prefix]  # fmt: skip
            _, groups = group_channels(sorted(siblings), segmenter.num_channels)
            check_output_file(targets[0][1], [source, *groups.get(source, [])])
    member_mib = float(cfg.monitor.max_member_mib)
    if len(targets) == 1:
        case = load_case(segmenter, *targets[0], max_voxels, budget, groups.get(targets[0][0]))
        return [write_case(segmenter, case, *observe(segmenter, case.prepared, tta, None, member_mib),
                           save_probabilities)]  # fmt: skip

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
        loads = {0: loader.submit(load_case, segmenter, *targets[0], max_voxels, budget, groups.get(targets[0][0]))}
        writing: tuple[Path, Future[CasePrediction]] | None = None
        for i, (src, _) in enumerate(track(targets, "Segmenting", total=len(targets))):
            if i + 1 < len(targets):  # decode + preprocess the next case while this one runs
                nxt = targets[i + 1]
                loads[i + 1] = loader.submit(load_case, segmenter, *nxt, max_voxels, budget, groups.get(nxt[0]))
            try:
                case = loads.pop(i).result()
                logits, signals = observe(segmenter, case.prepared, tta, None, member_mib)
            except Exception as exc:
                failed(src, exc)
                continue
            collect(writing)
            writing = (src, writer.submit(write_case, segmenter, case, logits, signals, save_probabilities))
        collect(writing)
    if failures:
        raise InputError(
            f"{len(failures)} of {len(targets)} file(s) could not be segmented:\n  - " + "\n  - ".join(failures)
        )
    return results
