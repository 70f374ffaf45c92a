"""Dice per label, per case and averaged: from nnU-Net's validation summary or from two folders of NIfTI files.

Follows nnU-Net's convention: a label absent from both prediction and reference has an undefined (NaN) Dice for that
case and is left out of the means, rather than counted as a perfect 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from loguru import logger

from mlops.errors import DatasetError
from mlops.nnunet import confusion_counts
from mlops.volumes import NIFTI_SUFFIXES, strip_suffix

METRICS = ("dice", "iou", "precision", "recall", "volume_error_mm3", "relative_volume_error", "hd95_mm")


@dataclass
class DiceReport:
    source: str
    labels: dict[str, str]  # label value (as str) -> name
    num_cases: int
    mean: dict[str, float]  # label name -> mean Dice over cases where it is defined
    foreground_mean: float | None
    per_case: list[dict]  # {"case": id, "dice": {name: value or None}, "metrics": {name: {metric: value}}}
    # label name -> metric -> mean over the cases where it is defined (folder evaluation; empty otherwise)
    metrics_mean: dict[str, dict[str, float | None]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # reference cases without a prediction (left out)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False)


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _build(source: str, labels: dict[int, str], per_case: list[tuple[str, dict[int, float]]]) -> DiceReport:
    names = {v: labels.get(v, f"label_{v}") for v in sorted(labels) if v != 0}
    rows = [
        {"case": case, "dice": {names[v]: (None if math.isnan(d) else round(d, 6)) for v, d in dice.items()}}
        for case, dice in per_case
    ]
    mean = {names[v]: _nanmean([dice[v] for _, dice in per_case]) for v in names}
    defined = [m for m in mean.values() if m is not None]
    return DiceReport(
        source=source,
        labels={str(v): n for v, n in names.items()},
        num_cases=len(per_case),
        mean={k: (round(v, 6) if v is not None else None) for k, v in mean.items()},
        foreground_mean=round(float(np.mean(defined)), 6) if defined else None,
        per_case=rows,
    )


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = pred == label, ref == label
    denom = int(p.sum()) + int(r.sum())
    return float("nan") if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom


def _volumes(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    return {
        strip_suffix(p.name): p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
    }


def label_metrics(
    pred: np.ndarray, ref: np.ndarray, label: int, spacing: tuple[float, ...], hd95: bool = False
) -> dict[str, float]:
    """Dice, IoU, precision, recall, volume error (mm³ and relative) and optionally HD95 (mm) of one label.

    Counts come from nnU-Net's ``compute_tp_fp_fn_tn``. Undefined values are NaN: Dice/IoU when the label is in
    neither, precision with no predicted voxel, recall and relative volume error with no reference voxel, HD95
    unless both have the label.
    """
    p, r = pred == label, ref == label
    tp, fp, fn, _ = confusion_counts(r, p)
    nan = float("nan")
    voxel = float(np.prod(spacing))
    out = {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "volume_error_mm3": (int(p.sum()) - int(r.sum())) * voxel,
        "relative_volume_error": (int(p.sum()) - int(r.sum())) / int(r.sum()) if r.any() else nan,
    }
    if hd95:
        out["hd95_mm"] = hausdorff95(p, r, spacing) if p.any() and r.any() else nan
    return out


def hausdorff95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th percentile of the symmetric surface distances (mm) between masks ``a`` and ``b`` (both non-empty)."""
    from scipy import ndimage

    def surface(m: np.ndarray) -> np.ndarray:
        return m & ~ndimage.binary_erosion(m, structure=np.ones((3,) * m.ndim), border_value=0)

    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return float(np.percentile(np.concatenate([to_b[sa], to_a[sb]]), 95))


def score_folders(
    pred_dir: Path, ref_dir: Path, labels: dict[int, str] | None = None, hd95: bool = False
) -> DiceReport:
    """Score every reference case against the prediction of the same name; cases without a prediction are left
    out with a warning naming them (an error only when none has one)."""
    from loguru import logger

    preds, refs = _volumes(pred_dir), _volumes(ref_dir)
    if not refs:
        raise DatasetError(f"{ref_dir}: no reference .nii/.nii.gz files")
    missing = sorted(set(refs) - set(preds))
    if len(missing) == len(refs):
        raise DatasetError(f"{pred_dir}: no prediction for any of the {len(refs)} reference case(s) in {ref_dir}")
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        logger.warning(
            f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} reference case(s), left out: {shown}"
        )
    loaded = []
    for case, ref_path in refs.items():
        if case in missing:
            continue
        ref_img = nib.load(ref_path)
        ref = np.asanyarray(ref_img.dataobj)
        pred = np.asanyarray(nib.load(preds[case]).dataobj)
        if pred.shape != ref.shape:
            raise DatasetError(f"{preds[case]}: shape {pred.shape} differs from reference {ref.shape} ({ref_path})")
        spacing = tuple(float(z) for z in ref_img.header.get_zooms()[: ref.ndim])
        loaded.append((case, np.rint(pred).astype(np.int64), np.rint(ref).astype(np.int64), spacing))
    if labels is None:
        values = sorted(set().union(*(np.unique(r).tolist() for _, _, r, _ in loaded)) - {0})
        labels = {v: f"label_{v}" for v in values}
    fg = [v for v in sorted(labels) if v != 0]
    metrics = [(case, {v: label_metrics(p, r, v, sp, hd95) for v in fg}) for case, p, r, sp in loaded]
    report = _build(f"{pred_dir} vs {ref_dir}", labels, [(c, {v: m[v]["dice"] for v in fg}) for c, m in metrics])
    names = {v: labels.get(v, f"label_{v}") for v in fg}
    clean = lambda x: None if math.isnan(x) else round(float(x), 6)  # noqa: E731
    for row, (_, m) in zip(report.per_case, metrics, strict=True):
        row["metrics"] = {names[v]: {k: clean(x) for k, x in m[v].items()} for v in fg}
    keys = [k for k in METRICS if k != "hd95_mm" or hd95]
    report.metrics_mean = {
        names[v]: {k: (None if (x := _nanmean([m[v][k] for _, m in metrics])) is None else round(x, 6)) for k in keys}
        for v in fg
    }
    report.missing = missing
    return report


def from_nnunet_summary(summary: Path, labels: dict[int, str]) -> DiceReport:
    """Read nnU-Net's ``validation/summary.json`` (written by its own evaluation after training)."""
    if not summary.is_file():
        raise DatasetError(f"{summary}: no nnU-Net validation summary; has this fold finished training and validation?")
    data = json.loads(summary.read_text())
    fg = [v for v in sorted(labels) if v != 0]
    per_case = []
    for row in data["metric_per_case"]:
        case = strip_suffix(Path(row["reference_file"]).name)
        per_case.append((case, {v: float(row["metrics"].get(str(v), {}).get("Dice", float("nan"))) for v in fg}))
    return _build(str(summary), labels, per_case)


NEAR_ZERO_DICE = 0.05  # below this a label is effectively not segmented (chance level on hippocampus is ~0.03)


def weak_labels(report: DiceReport, threshold: float = NEAR_ZERO_DICE) -> dict[str, float]:
    """Labels whose mean Dice is below ``threshold``: a model that misses them must not go out silently."""
    return {name: value for name, value in report.mean.items() if value is not None and value < threshold}


def model_validation_warnings(model_dir: Path, folds: list[int | str], threshold: float = NEAR_ZERO_DICE) -> list[str]:
    """One warning per fold of ``model_dir`` whose nnU-Net validation has a label with a near-zero Dice."""
    warnings = []
    try:
        labels = labels_from_dataset_json(model_dir / "dataset.json")
    except (OSError, ValueError, KeyError, DatasetError) as exc:
        logger.warning(f"{model_dir / 'dataset.json'}: unreadable ({exc}); validation Dice not checked")
        return warnings
    for fold in folds:
        summary = model_dir / f"fold_{fold}" / "validation" / "summary.json"
        if not summary.is_file():
            continue
        try:
            weak = weak_labels(from_nnunet_summary(summary, labels), threshold)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning(f"{summary}: unreadable nnU-Net validation summary ({type(exc).__name__}: {exc})")
            continue
        if weak:
            shown = ", ".join(f"{n} {v:.3f}" for n, v in weak.items())
            warnings.append(
                f"{model_dir.name} fold {fold}: validation Dice near zero ({shown} < {threshold}); this model "
                "does not segment those labels: train longer (e.g. train=cpu, or nnU-Net's schedule on a GPU)"
            )
    return warnings


def write_report(report: DiceReport, out_dir: Path, stem: str) -> Path:
    """Write ``report`` as ``<out_dir>/<stem>.json``."""
    path = out_dir / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.to_json())
    return path


def labels_from_dataset_json(path: Path) -> dict[int, str]:
    """dataset.json ``labels`` as value -> name: nnU-Net v2's (name -> int) or the Decathlon's ("1" -> name).
    Region-based labels are not supported here."""
    raw = json.loads(path.read_text())["labels"]
    out: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, str) and name.isdigit():  # the Decathlon's own dataset.json
            name, value = value, int(name)
        if not isinstance(value, int):
            raise DatasetError(f"{path}: region-based label {name}={value} is not supported by mlops evaluate")
        out[value] = name
    return out
