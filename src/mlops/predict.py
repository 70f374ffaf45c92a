"""`mlops predict`: segment NIfTI files or folders with a trained nnU-Net model kept in memory.

Outputs carry the input's exact geometry (shape, affine, qform/sform and codes, spacing) and are written atomically.
In a folder, a bad file is reported and skipped; the others are still segmented, and the run fails at the end.
"""

from __future__ import annotations

import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from loguru import logger
from omegaconf import DictConfig

from mlops.inference import Segmenter
from mlops.models import model_dir
from mlops.outputs import check_collisions, check_output_file, check_output_folder
from mlops.pipeline import Case, budget, finish_case, load_segmenter, read_case, run_network
from mlops.progress import track
from mlops.volumes import CHANNEL_ANY, CHANNEL_SUFFIX, Budget, InputError, is_nifti_name, output_name


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


def write_case(
    segmenter: Segmenter,
    src: Path,
    dst: Path,
    case: Case,
    logits: torch.Tensor,
    signals: dict,
    save_probabilities: bool = False,
) -> CasePrediction:
    """The finished case saved atomically with the input's geometry; with ``save_probabilities`` also ``<case>.npz``
    (``probabilities``: classes x z x y x) and ``<case>.pkl`` (the case's properties), nnU-Net's
    ``--save_probabilities`` layout."""
    result = finish_case(segmenter, case, logits, signals, probabilities=save_probabilities)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if result.probabilities is not None:
        stem = dst.parent / dst.name.split(".nii")[0]
        tmp = stem.with_name(f".{stem.name}.part.npz")
        try:
            np.savez_compressed(tmp, probabilities=result.probabilities.astype(np.float32))
            tmp.replace(stem.with_suffix(".npz"))
        finally:
            tmp.unlink(missing_ok=True)
        stem.with_suffix(".pkl").write_bytes(pickle.dumps(case.prepared.props))
    suffix = ".nii" if dst.name.lower().endswith(".nii") else ".nii.gz"  # nibabel compresses by the suffix
    tmp = dst.with_name(f".{dst.name}.part{suffix}")
    try:
        nib.save(result.image, tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return CasePrediction(
        src, dst, tuple(result.labels.shape), result.volumes, result.seconds, dict(segmenter.labels),
        segmenter.model_dir.name, [str(f) for f in segmenter.folds], result.signals,
    )  # fmt: skip


def load_case(
    segmenter: Segmenter, src: Path, max_voxels: int | None, limits: Budget | None, channels: list[Path] | None
) -> Case:
    """One case of `mlops predict`: its file, or its channel files."""
    return read_case(segmenter, channels if channels and len(channels) > 1 else [src], max_voxels, limits)


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
    limits = budget(segmenter, cfg.predict.get("max_request_mib"))
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
        src, dst = targets[0]
        case = load_case(segmenter, src, max_voxels, limits, groups.get(src))
        logits, signals = run_network(segmenter, case, tta, None, member_mib)
        return [write_case(segmenter, src, dst, case, logits, signals, save_probabilities)]

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
        loads = {0: loader.submit(load_case, segmenter, targets[0][0], max_voxels, limits, groups.get(targets[0][0]))}
        writing: tuple[Path, Future[CasePrediction]] | None = None
        for i, (src, dst) in enumerate(track(targets, "Segmenting", total=len(targets))):
            if i + 1 < len(targets):  # decode + preprocess the next case while this one runs
                nxt = targets[i + 1][0]
                loads[i + 1] = loader.submit(load_case, segmenter, nxt, max_voxels, limits, groups.get(nxt))
            try:
                case = loads.pop(i).result()
                logits, signals = run_network(segmenter, case, tta, None, member_mib)
            except Exception as exc:
                failed(src, exc)
                continue
            collect(writing)
            writing = (src, writer.submit(write_case, segmenter, src, dst, case, logits, signals, save_probabilities))
        collect(writing)
    if failures:
        raise InputError(
            f"{len(failures)} of {len(targets)} file(s) could not be segmented:\n  - " + "\n  - ".join(failures)
        )
    return results
