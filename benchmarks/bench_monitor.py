"""Does monitoring see what hurts the model? The 30 real Task04 test scans, clean and corrupted, through the engine.

For each condition (clean, Gaussian noise at 3 levels, a bias field, 3 mm slices, a flipped axis, intensity x100):
the drift verdict of the inputs (and outputs) against the model's reference profile, the change of each output
signal's median against the clean scans, and the mean Dice against the reference test labels; then the AUROC of each
output signal for telling cases with Dice < 0.7 from the rest, over every condition's cases together.

python benchmarks/bench_monitor.py --model MODEL_FOLDER [--task TASK] [--labels LABELS] [--no-tta] [--backend B]
    [OVERRIDES: monitor.min_shift_sd=0 ...]

MODEL_FOLDER needs a reference profile (`mlops monitor profile`); Task and labels default to ../shared/data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from mlops.config import load_config
from mlops.inference import Segmenter
from mlops.monitoring.compare import DriftSummary, compare, thresholds
from mlops.monitoring.profile import profile_reference, read_profile
from mlops.monitoring.signals import SIGNAL_COLUMNS, observe
from mlops.monitoring.stats import normalised_stats, orientation, raw_stats
from mlops.workspace import task_images

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
Case = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]  # image, labels, affine, spacing
Corruption = Callable[[Case, np.random.Generator], Case]


def noise(level: float) -> Corruption:
    def apply(c: Case, rng: np.random.Generator) -> Case:
        img, lab, aff, sp = c
        spread = float(np.percentile(img, 99) - np.percentile(img, 1))
        return img + rng.normal(0, level * spread, img.shape).astype(np.float32), lab, aff, sp

    return apply


def bias_field(c: Case, rng: np.random.Generator) -> Case:
    """A smooth multiplicative field from 0.6 to 1.4 across the volume (linear + quadratic), as from a coil."""
    img, lab, aff, sp = c
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in img.shape), indexing="ij")
    field = 1 + 0.25 * grids[0] + 0.15 * grids[1] ** 2 - 0.1 * grids[2]
    field = 0.6 + 0.8 * (field - field.min()) / (np.ptp(field) or 1)
    return (img * field).astype(np.float32), lab, aff, sp


def thick_slices(c: Case, rng: np.random.Generator) -> Case:
    """Every third slice along the last axis, spacing x3: a 3 mm acquisition of the 1 mm scan."""
    img, lab, aff, sp = c
    aff = aff.copy()
    aff[:3, 2] *= 3
    return img[:, :, ::3], lab[:, :, ::3], aff, (sp[0], sp[1], sp[2] * 3)


def flipped(c: Case, rng: np.random.Generator) -> Case:
    """The first voxel axis stored reversed (affine updated: the same anatomy, another orientation code)."""
    img, lab, aff, sp = c
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, img.shape[0] - 1
    return img[::-1].copy(), lab[::-1].copy(), aff @ flip, sp


def scaled(c: Case, rng: np.random.Generator) -> Case:
    img, lab, aff, sp = c
    return img * 100, lab, aff, sp


CONDITIONS: dict[str, Corruption | None] = {
    "clean": None,
    "noise 5%": noise(0.05),
    "noise 10%": noise(0.10),
    "noise 20%": noise(0.20),
    "bias field": bias_field,
    "3 mm slices": thick_slices,
    "flipped axis": flipped,
    "intensity x100": scaled,
}


def dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    scores = []
    for v in labels:
        a, b = pred == v, ref == v
        total = int(a.sum() + b.sum())
        scores.append(1.0 if total == 0 else 2 * int((a & b).sum()) / total)
    return float(np.mean(scores))


def auroc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def named(summary: DriftSummary, columns: list[str]) -> str:
    """'2: norm_noise (3.1), spacing_z (const. ref.)': each statistic with its shift in reference SD."""
    by_name = {c.column: c for c in summary.columns}
    shown = [f"{c} ({by_name[c].shift_text or 'unseen code'})" for c in columns[:5]]
    return f"{len(columns)}: " + ", ".join(shown) + (" ..." if len(columns) > 5 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--task", type=Path, default=SHARED / "Task04_Hippocampus")
    parser.add_argument("--labels", type=Path, default=SHARED / "Task04_Hippocampus_labelsTs")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--backend", default="auto", help="predict.backend (auto: what `mlops predict` would use)")
    parser.add_argument("overrides", nargs="*", help="config overrides for the verdict, e.g. monitor.min_shift_sd=0")
    args = parser.parse_args()
    seg = Segmenter(args.model, tta=not args.no_tta, backend=args.backend)
    profile = read_profile(args.model, seg.folds)
    reference = profile_reference(profile)
    fg = [v for v in seg.labels if v != 0]
    _, test = task_images(args.task)
    rng = np.random.default_rng(0)
    clean_cases = []
    for path in test:
        img = nib.load(path)
        lab = nib.load(args.labels / path.name)
        clean_cases.append((np.asanyarray(img.dataobj).astype(np.float32), np.asanyarray(lab.dataobj).astype(np.uint8),
                            img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])))  # fmt: skip
    settings = thresholds(load_config(args.overrides))  # the verdict `mlops drift` would give
    results, pooled = {}, []
    for name, corrupt in CONDITIONS.items():
        t0 = time.perf_counter()
        rows, dices = [], []
        for case in clean_cases:
            img, lab, aff, sp = corrupt(case, rng) if corrupt else case
            prepared = seg.prepare(img, sp)
            logits, signals = observe(seg, prepared)
            pred = seg.finish(prepared, logits)
            d = dice(pred, lab, fg)
            row = {**raw_stats(img, sp), "orientation": orientation(aff), **normalised_stats(prepared.data.numpy())}
            rows.append({**row, **signals})
            dices.append(d)
            pooled.append((signals, d))
        summary = compare(reference, rows, model=profile["model"], **settings)
        results[name] = (summary, rows, dices, time.perf_counter() - t0)
    clean_rows = results["clean"][1]

    def median(rows: list[dict], key: str) -> float:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.median(vals)) if vals else float("nan")

    out = sys.stdout
    cols = ["confidence_foreground", "entropy_foreground", "agreement_dice_mean"]
    out.write(f"model {profile['model']} ({profile['model_key']}), {len(test)} test scans, "
              f"reference {len(profile['reference'])} training + {len(profile['validation'])} validation cases, "
              f"TTA {'off' if args.no_tta else 'on'}, {seg.backend} {seg.precision}\n")  # fmt: skip
    out.write("| condition | verdict | cases out of range | drifted statistics (shift in reference SD) | "
              + "small shifts | " + " | ".join(f"{c} (vs clean)" for c in cols)
              + " | mean Dice | Dice drop | s |\n|" + "---|" * (8 + len(cols)) + "\n")  # fmt: skip
    clean_dice = float(np.mean(results["clean"][2]))
    for name, (summary, rows, dices, seconds) in results.items():
        changes = []
        for c in cols:
            cur, ref = median(rows, c), median(clean_rows, c)
            changes.append(f"{cur:.3f} ({cur - ref:+.3f})")
        drifted, small = named(summary, summary.drifted_columns), named(summary, summary.small_shifts)
        out.write(f"| {name} | {summary.verdict} | {len(summary.cases_out_of_range)} | {drifted} | {small} | "
                  f"{' | '.join(changes)} | {np.mean(dices):.3f} | {clean_dice - np.mean(dices):+.3f} | "
                  f"{seconds:.0f} |\n")  # fmt: skip
    bad = [d < 0.7 for _, d in pooled]
    out.write(f"\nAUROC for Dice < 0.7 ({sum(bad)} of {len(bad)} cases), higher = the signal flags them:\n")
    for c in SIGNAL_COLUMNS:
        vals = [(s.get(c), b) for (s, _), b in zip(pooled, bad, strict=True) if s.get(c) is not None]
        if not vals:
            continue
        sign = 1 if c.startswith("entropy") else -1  # low confidence / agreement flags a bad case
        out.write(f"  {c}: {auroc([sign * v for v, _ in vals], [b for _, b in vals]):.3f} (n={len(vals)})\n")


if __name__ == "__main__":
    main()
