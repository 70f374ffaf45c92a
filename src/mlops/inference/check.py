"""The parity check behind ``auto``: which backend x precision gives nnU-Net's answer on this model, and how fast here.

`mlops export` runs it on a few of the fold's validation cases (or the images it is given): every combination this
CPU runs natively, against nnU-Net's own predictor on the same preprocessed case. A combination passes when, on every
case, each label's Dice is >= 0.99 (or at most 3 voxels differ: a near-tie flip or two in a tiny structure) and the
mean Dice over cases and labels is >= 0.995 - the rule of the issue and of the real-data tests. The result lives in
the model folder (``inference_check.json``), keyed by the SHA-256 of the checkpoints it was made with, so a retrained
model is never served on an old verdict. ``auto`` then picks the fastest combination that passed (see
:func:`mlops.inference.backends.choose`); without a check it stays at fp32.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from mlops.errors import DatasetError, MlopsError, PipelineError
from mlops.inference import backends
from mlops.inference.export import export_status, weights_sha256
from mlops.inference.record import write_entry
from mlops.inference.segmenter import Segmenter
from mlops.progress import track
from mlops.volumes import is_nifti_name, read_case_arrays
from mlops.workspace import task_images, validation_cases

MIN_DICE, MIN_MEAN_DICE, NEAR_TIE_VOXELS = 0.99, 0.995, 3
Case = tuple[str, np.ndarray, tuple[float, ...]]  # name, image (i, j, k[, c]), spacing (i, j, k)


@dataclass
class ComboResult:
    backend: str
    precision: str
    passed: bool
    min_dice: float
    mean_dice: float
    max_voxels_differ: int
    seconds_per_case: float
    speed_vs_nnunet: float  # seconds per case / nnU-Net predictor's seconds per case (< 1: faster)


def cpu_name() -> str:
    """The CPU model, as the check's timings hold for it (Linux /proc/cpuinfo, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def candidates(exported: set[str]) -> list[backends.Choice]:
    """Every combination this CPU runs natively with the exports at hand; bf16 only with native instructions."""
    runnable = ["torch", *(b for b in ("openvino", "onnxruntime") if backends.EXPORT_FORMAT[b] in exported)]
    return [backends.Choice(b, "fp32") for b in runnable] + [
        backends.Choice(b, "bf16") for b in runnable if b != "onnxruntime" and backends.native_bf16(b)
    ]


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> tuple[float, int]:
    x, y = a == label, b == label
    total = int(x.sum() + y.sum())
    return (1.0 if total == 0 else 2.0 * float((x & y).sum()) / total), int((x != y).sum())


def run_check(
    model_dir: Path,
    folds: list[int | str],
    checkpoint: str,
    cases: list[Case],
    tta: bool = True,
    tile_step_size: float = 0.5,
) -> dict:
    """Time and score every candidate combination on ``cases``; write and return the model folder's check entry.

    Each case is preprocessed once; every combination (nnU-Net's predictor first, the reference) runs the network and
    nnU-Net's export on it. One untimed warm-up pass per combination (OpenVINO compiles on first use)."""
    if not cases:
        raise PipelineError(f"{model_dir}: no cases for the parity check")
    reference = Segmenter(model_dir, folds, checkpoint, device="cpu", tta=tta, tile_step_size=tile_step_size,
                          backend="nnunet")  # fmt: skip
    checkpoints = reference.model.checkpoint_files()
    exported = set.intersection(*(export_status(c)[0] for c in checkpoints))
    combos = candidates(exported)
    prepared = [(name, reference.prepare(data, spacing)) for name, data, spacing in cases]
    labels = [v for v in reference.labels if v]

    def timed(seg: Segmenter) -> tuple[list[np.ndarray], float]:
        seg.finish(prepared[0][1], seg.logits(prepared[0][1]))  # warm-up
        outs, t0 = [], time.perf_counter()
        for _, case in prepared:
            outs.append(seg.finish(case, seg.logits(case)))
        return outs, (time.perf_counter() - t0) / len(prepared)

    truth, ref_seconds = timed(reference)
    del reference
    results = []
    for combo in track(combos, description="Parity check (backend x precision)"):
        seg = Segmenter(model_dir, folds, checkpoint, device="cpu", tta=tta, tile_step_size=tile_step_size,
                        backend=combo.backend, precision=combo.precision)  # fmt: skip
        outs, seconds = timed(seg)
        del seg
        scores = [_dice(got, ref, v) for got, ref in zip(outs, truth, strict=True) for v in labels]
        dices = [d for d, _ in scores]
        near = all(d >= MIN_DICE or n <= NEAR_TIE_VOXELS for d, n in scores)
        passed = near and float(np.mean(dices)) >= MIN_MEAN_DICE
        results.append(ComboResult(combo.backend, combo.precision, passed, round(min(dices), 5),
                                   round(float(np.mean(dices)), 5), max(n for _, n in scores), round(seconds, 4),
                                   round(seconds / ref_seconds, 3)))  # fmt: skip
    entry = {
        "weights_sha256": weights_sha256(checkpoints),
        "folds": [str(f) for f in folds],
        "checkpoint": checkpoint,
        "cases": [case[0] for case in cases],
        "tta": tta,
        "cpu": cpu_name(),
        "cpu_bf16": backends.cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        "nnunet_seconds_per_case": round(ref_seconds, 4),
        "rule": f"per case and label Dice >= {MIN_DICE} (or <= {NEAR_TIE_VOXELS} voxels differ), "
        f"mean Dice >= {MIN_MEAN_DICE}, against nnU-Net's own predictor",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [asdict(r) for r in results],
    }
    write_entry(Path(model_dir), entry)
    return entry


def check_images(cfg: object, model_dir: Path, fold: int | str, count: int, images: Path | None = None) -> list[Path]:
    """Up to ``count`` images to check on, evenly spread: from ``images`` (a folder) when given, else the fold's
    validation cases of the prepared dataset (cases the network did not train on), else none."""
    if images is not None:
        if not Path(images).is_dir():
            raise DatasetError(f"{images}: not a folder of images for the parity check")
        found = sorted(p for p in Path(images).iterdir() if is_nifti_name(p.name))
        first_channels = [p for p in found if p.name.split(".")[0].endswith("_0000")]
        found = first_channels or found  # nnU-Net's layout (case_0000, case_0001, ...): one entry per case
    else:
        # The model's own dataset (plans.json names it), in this machine's nnU-Net folders: its raw images and splits.
        paths = cfg.paths  # type: ignore[attr-defined]
        try:
            name = json.loads((Path(model_dir) / "plans.json").read_text())["dataset_name"]
            train, _ = task_images(Path(str(paths.raw)) / name, require_test=False)
        except (OSError, ValueError, KeyError, MlopsError) as exc:
            logger.warning(f"No images for the parity check ({exc}); give some with --check-images")
            return []
        splits = Path(str(paths.preprocessed)) / name / "splits_final.json"
        found = validation_cases(Path(model_dir), splits, fold, train)
    if len(found) <= count:
        return found
    step = len(found) / count
    return [found[int(i * step)] for i in range(count)]


def load_check_cases(paths: list[Path], channels: int) -> list[Case]:
    """(name, data, spacing) of each case to check on; errors name the file."""
    cases = []
    for path in paths:
        data, spacing, _ = read_case_arrays(path, channels)
        cases.append((path.name, data, spacing))
    return cases
